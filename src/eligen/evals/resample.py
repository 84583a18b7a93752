"""OpenCV's default 8-bit resize (``cv2.resize(image, (w, h))``, bilinear), reproduced in numpy for COCO-MIG, whose
evaluation scores every image at 512x512 after that call (docs/design.md section 13).

Two paths, as OpenCV takes them:

- **an exact halving** (1024 -> 512): OpenCV swaps bilinear for its fast area average, so each output pixel is the
  mean of its 2x2 block rounded half up, ``(a + b + c + d + 2) >> 2``;
- **any other size**: bilinear with 11-bit fixed-point weights (``round(2048 (1 - f))`` and ``round(2048 f)`` per
  axis, the sample at ``(x + 0.5) s - 0.5``, clamped at the borders); a horizontal pass into integers, then the
  vertical blend ``((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16) + 2 >> 2`` as OpenCV's vectorised loop computes it.

``benchmarks/cocomig_opencv_check.py`` compares both with OpenCV itself (not a dependency): every reduction to 512
it tried is equal pixel for pixel; an enlargement (an image smaller than 512, e.g. the tiny test model's) differs by
one level on under 1 % of the pixels (OpenCV enlarges through another vectorised loop).
"""

from __future__ import annotations

import numpy as np

COEF_BITS = 11
COEF_SCALE = 1 << COEF_BITS


def _weights(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: the first source index and the two fixed-point weights ``(target, 2)``."""
    scale = source / target
    position = (np.arange(target, dtype=np.float64) + 0.5) * scale - 0.5
    start = np.floor(position)
    fraction = position - start
    start = start.astype(np.int64)
    low = start < 0
    fraction[low], start[low] = 0.0, 0
    high = start >= source - 1
    fraction[high], start[high] = 0.0, source - 1
    weights = np.stack([np.rint((1.0 - fraction) * COEF_SCALE), np.rint(fraction * COEF_SCALE)], axis=-1)
    return start, weights.astype(np.int64)


def _bilinear(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    source = pixels.astype(np.int64)
    x0, wx = _weights(pixels.shape[1], width)
    x1 = np.minimum(x0 + 1, pixels.shape[1] - 1)
    rows = source[:, x0] * wx[:, 0, None] + source[:, x1] * wx[:, 1, None]  # (H_src, width, 3), scale 2048
    y0, wy = _weights(pixels.shape[0], height)
    y1 = np.minimum(y0 + 1, pixels.shape[0] - 1)
    top = ((rows[y0] >> 4) * wy[:, 0, None, None]) >> 16
    bottom = ((rows[y1] >> 4) * wy[:, 1, None, None]) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def resize_like_opencv(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(height, width, C)`` uint8, as ``cv2.resize(pixels, (width, height))`` makes it."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected (H, W, C) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    if pixels.shape[:2] == (height, width):
        return pixels.copy()
    if pixels.shape[:2] == (2 * height, 2 * width):
        blocks = pixels.astype(np.int64).reshape(height, 2, width, 2, -1).sum(axis=(1, 3))
        return ((blocks + 2) >> 2).astype(np.uint8)
    return _bilinear(pixels, width, height)

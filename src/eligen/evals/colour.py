"""COCO-MIG's colour check, pure numpy, exactly as MIG-Bench's ``eval_mig.py`` makes it (docs/design.md section 13).

HSV is OpenCV's 8-bit conversion (``cv2.cvtColor(..., COLOR_BGR2HSV)`` on 8-bit pixels), reproduced integer for
integer by :func:`rgb_to_hsv8`: hue 0-179 (degrees / 2), saturation and value 0-255, from OpenCV's fixed-point tables
(12 fraction bits), not from a float formula rounded afterwards (the two differ by one step on some colours). A pixel
shows a colour when each of its three channels lies in one of the colour's inclusive ranges (``cv2.inRange``); red
wraps round hue 0, so it has two. :data:`HSV_RANGES` is the script's active table; the older table it keeps commented
out (wider: red H <= 6 or >= 156 with S >= 43 and V >= 35, blue 78-124, ...) is not used by the benchmark.

An instance has the right colour when at least 20 % of the pixels of its segmentation mask show it
(:func:`mask_colour`); an empty mask never has.
"""

from __future__ import annotations

import numpy as np

# colour -> list of ((h_low, s_low, v_low), (h_high, s_high, v_high)), inclusive; eval_mig.py's active ``color_dict``
HSV_RANGES: dict[str, list[tuple[tuple[int, int, int], tuple[int, int, int]]]] = {
    "red": [((0, 50, 70), (9, 255, 255)), ((159, 50, 70), (180, 255, 255))],
    "blue": [((90, 50, 70), (128, 255, 255))],
    "yellow": [((25, 50, 70), (35, 255, 255))],
    "green": [((36, 50, 70), (89, 255, 255))],
    "black": [((0, 0, 0), (180, 255, 30))],
    "white": [((0, 0, 221), (180, 43, 255))],
    "brown": [((6, 43, 35), (25, 255, 255))],
}
COLOUR_THRESHOLD = 0.2  # the share of mask pixels that must show the colour (compared exactly, in integers below)

_SHIFT = 12  # OpenCV's hsv_shift
_HALF = 1 << (_SHIFT - 1)


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``sdiv_table`` and ``hdiv_table180``: round((255 << 12) / v) and round((180 << 12) / (6 d)), 0 at 0
    (no value of either lands on a half, so the rounding mode does not matter)."""
    index = np.arange(256, dtype=np.float64)
    safe = np.where(index > 0, index, 1.0)
    sdiv = np.where(index > 0, np.rint((255 << _SHIFT) / safe), 0).astype(np.int64)
    hdiv = np.where(index > 0, np.rint((180 << _SHIFT) / (6.0 * safe)), 0).astype(np.int64)
    return sdiv, hdiv


_SDIV, _HDIV = _tables()


def rgb_to_hsv8(pixels: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB -> ``(..., 3)`` int64 HSV exactly as OpenCV's 8-bit ``COLOR_RGB2HSV`` (hue 0-179)."""
    rgb = np.asarray(pixels)
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected 8-bit pixels, got {rgb.dtype}")
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    s = (diff * _SDIV[v] + _HALF) >> _SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + _HALF) >> _SHIFT  # an arithmetic shift: floors negative values, as OpenCV's does
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1)


def colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` bool: the pixels that show ``colour`` (one of :data:`HSV_RANGES`)."""
    if colour not in HSV_RANGES:
        raise ValueError(f"unknown COCO-MIG colour {colour!r}; known: {', '.join(HSV_RANGES)}")
    hsv = rgb_to_hsv8(pixels)
    keep = np.zeros(hsv.shape[:-1], dtype=bool)
    for low, high in HSV_RANGES[colour]:
        keep |= np.all((hsv >= np.asarray(low)) & (hsv <= np.asarray(high)), axis=-1)
    return keep


def colour_fraction(pixels: np.ndarray, colour: str) -> float:
    """The fraction of ``pixels`` (``(H, W, 3)`` uint8 RGB) showing ``colour``; 0 for no pixels."""
    mask = colour_mask(pixels, colour)
    return float(mask.mean()) if mask.size else 0.0


def mask_colour(pixels: np.ndarray, mask: np.ndarray, colour: str) -> tuple[float | None, bool]:
    """``(fraction, ok)`` for an instance's segmentation ``mask`` (``(H, W)`` bool) on ``pixels`` (``(H, W, 3)``
    uint8 RGB): the share of mask pixels showing ``colour`` (None for an empty mask) and whether it reaches 20 %
    (``5 * shown >= total``, the benchmark's ``shown / total >= 0.2`` without rounding)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != pixels.shape[:2]:
        raise ValueError(f"a {mask.shape} mask for a {pixels.shape[:2]} image")
    total = int(mask.sum())
    if total == 0:
        return None, False
    shown = int((colour_mask(pixels, colour) & mask).sum())
    return shown / total, 5 * shown >= total

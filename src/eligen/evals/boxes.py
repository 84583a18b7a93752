"""Box maths of the benchmarks, pure numpy. Boxes are ``(x0, y0, x1, y1)``.

Benchmark layouts keep their boxes *normalised* (fractions of the width and height), so a box becomes pixels only
against the image it is scored on (:func:`pixel_box`). A box already in pixels carries the size it was drawn at;
:func:`rescale_box` moves it to another size of the same aspect ratio and refuses any other (the LayoutSAM-Eval
pitfall: boxes scaled for 1024 pixels cropped from a 512-pixel image score 0.32 spatial instead of 0.93).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]
ASPECT_TOLERANCE = 0.01  # relative difference of height/width ratios treated as the same aspect


def box_numbers(box: Any, where: str) -> Box:
    """A box of a benchmark file as four finite floats; a ValueError naming ``where`` for anything else (an object,
    text, NaN, a number instead of a list)."""
    if hasattr(box, "tolist"):
        box = box.tolist()
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"{where}: a box is a list of 4 numbers (x0, y0, x1, y1), got {box!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise ValueError(f"{where}: a box holds 4 finite numbers (x0, y0, x1, y1), got {list(box)!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0, y0, x1, y1


def check_normalised(box: Any, where: str) -> Box:
    """A normalised box as floats, clipped to [0, 1]; a ValueError naming ``where`` if it is not four finite
    numbers, or empty or inverted."""
    x0, y0, x1, y1 = (min(1.0, max(0.0, v)) for v in box_numbers(box, where))
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{where}: the box {list(box)!r} is empty or inverted (need x1 > x0 and y1 > y0)")
    return x0, y0, x1, y1


def normalise(box: Sequence[float], width: float, height: float) -> Box:
    """A pixel box drawn on a ``width`` x ``height`` canvas as fractions of that canvas."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 / width, y0 / height, x1 / width, y1 / height


def pixel_box(box: Sequence[float], width: int, height: int) -> Box:
    """A normalised box in pixels of a ``width`` x ``height`` image, at least one pixel wide and high, inside it."""
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = min(x0 * width, width - 1.0), min(y0 * height, height - 1.0)
    return left, top, max(x1 * width, left + 1.0), max(y1 * height, top + 1.0)


def rescale_box(box: Sequence[float], drawn_at: tuple[int, int], scored_at: tuple[int, int]) -> Box:
    """A pixel box drawn on a ``drawn_at = (width, height)`` image moved to a ``scored_at`` image.

    Same size: unchanged. Same aspect ratio: scaled. Another aspect ratio: refused, since no scaling of the box
    can say which pixels the generator was asked to fill.
    """
    (w0, h0), (w1, h1) = drawn_at, scored_at
    if (w0, h0) == (w1, h1):
        return tuple(float(v) for v in box)  # type: ignore[return-value]
    if abs(h1 / w1 - h0 / w0) > ASPECT_TOLERANCE * (h0 / w0):
        raise ValueError(f"a box drawn at {w0}x{h0} cannot be scored on a {w1}x{h1} image (another aspect ratio); "
                         "score the images at the size they were generated at")
    sx, sy = w1 / w0, h1 / h0
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


def crop_bounds(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel bounds of a pixel box for ``PIL.Image.crop``: floor of the start, ceil of the end, inside the
    image and at least one pixel."""
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = int(np.clip(np.floor(x0), 0, width - 1)), int(np.clip(np.floor(y0), 0, height - 1))
    right, bottom = int(np.clip(np.ceil(x1), left + 1, width)), int(np.clip(np.ceil(y1), top + 1, height))
    return left, top, right, bottom


def box_iou(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of box ``a`` ``(4,)`` with each of ``b`` ``(N, 4)``: ``(N,)`` float64 (0 where the union is empty)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first; a box goes when its IoU with a kept one is
    above ``threshold``. ``boxes`` ``(N, 4)``, ``scores`` ``(N,)``."""
    boxes, scores = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        best = order.pop(0)
        keep.append(int(best))
        if order:
            overlaps = box_iou(boxes[best], boxes[order])
            order = [i for i, o in zip(order, overlaps, strict=True) if o <= threshold]
    return keep

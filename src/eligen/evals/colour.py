"""COCO-MIG's colour check, pure numpy: which pixels show a named colour, judged in HSV.

HSV follows the 8-bit convention the benchmark's ranges are written in: hue 0-179 (degrees / 2), saturation and
value 0-255. A pixel shows a colour when each of its three channels lies in one of the colour's inclusive ranges
(red wraps around hue 0, so it has two). The ranges are COCO-MIG's own (MIG-Bench's evaluation).
"""

from __future__ import annotations

import numpy as np

# colour -> list of ((h_low, s_low, v_low), (h_high, s_high, v_high)), inclusive
HSV_RANGES: dict[str, list[tuple[tuple[int, int, int], tuple[int, int, int]]]] = {
    "red": [((0, 43, 35), (6, 255, 255)), ((156, 43, 35), (180, 255, 255))],
    "brown": [((6, 43, 35), (25, 255, 255))],
    "yellow": [((20, 43, 35), (34, 255, 255))],
    "green": [((35, 43, 35), (77, 255, 255))],
    "blue": [((78, 43, 35), (124, 255, 255))],
    "black": [((0, 0, 0), (180, 255, 35))],
    "white": [((0, 0, 221), (180, 43, 255))],
}


def rgb_to_hsv8(pixels: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 RGB -> ``(..., 3)`` int HSV with hue 0-179, saturation and value 0-255 (rounded)."""
    rgb = np.asarray(pixels, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    spread = value - rgb.min(axis=-1)
    saturation = np.where(value > 0, spread / np.where(value > 0, value, 1) * 255.0, 0.0)
    safe = np.where(spread > 0, spread, 1)
    hue = np.where(value == r, 60.0 * (g - b) / safe,
                   np.where(value == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    hue = np.where(spread > 0, np.mod(hue, 360.0), 0.0)
    return np.stack([np.round(hue / 2.0) % 180, np.round(saturation), np.round(value)], axis=-1).astype(np.int64)


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

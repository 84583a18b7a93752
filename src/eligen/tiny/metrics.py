"""ShapesBench scoring (docs/design.md section 8): segment each entity by its colour and compare with its mask.

Pure numpy. The rules, fixed before any training (they move IoU by about 0.1):

- **Colour segmentation** (:func:`colour_segment`): a pixel belongs to colour ``c`` when its Euclidean RGB
  distance to ``c`` is below ``threshold`` (default 60) *and* strictly smaller than its distance to every
  other reference colour: every other palette colour in :data:`eligen.tiny.world.COLOURS` and every
  background base colour in :data:`eligen.tiny.world.BACKGROUNDS`. Ties belong to nobody, so the segments
  of the palette colours are pairwise disjoint.
- **IoU** (:func:`iou`): ``|A & B| / |A | B|``; both empty -> 1.0 (nothing to find, nothing predicted).
- **Per entity** (:func:`entity_scores`): ``iou`` between the entity colour's segment over the *whole* image
  and the conditioning mask; ``hit`` when ``iou > 0.5``; ``colour_ok`` when, among the mask's pixels that
  segment as some palette colour, the entity's colour is strictly the most frequent (no such pixels, or a
  tie for first place, -> False).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..entities import binarize_mask
from .world import BACKGROUNDS, COLOURS

DEFAULT_THRESHOLD = 60.0
HIT_IOU = 0.5


def as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """A PIL image or ``(H, W, 3)`` array as ``(H, W, 3)`` uint8 (other dtypes must already hold 0-255)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {array.shape}")
    return array


def _distance(pixels: np.ndarray, colour: Sequence[float]) -> np.ndarray:
    """``(H, W, 3)`` -> ``(H, W)`` float64 Euclidean RGB distance to ``colour``."""
    diff = pixels.astype(np.float64) - np.asarray(colour, dtype=np.float64)
    return np.sqrt((diff * diff).sum(axis=-1))


def reference_colours() -> list[tuple[int, int, int]]:
    """Every colour a pixel is compared with: the object palette, then the background base colours."""
    return list(COLOURS.values()) + list(BACKGROUNDS.values())


def colour_segment(image: np.ndarray | Image.Image, colour: Sequence[int],
                   threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Pixels of ``image`` (``(H, W, 3)`` uint8) that show ``colour``: ``(H, W)`` bool.

    On when the distance to ``colour`` is ``< threshold`` and ``<`` the distance to every other reference
    colour (palette and backgrounds; a reference equal to ``colour`` is skipped).
    """
    pixels = as_rgb_array(image)
    target = tuple(int(v) for v in colour)
    near = _distance(pixels, target)
    keep = near < threshold
    for other in reference_colours():
        if tuple(other) != target:
            keep &= near < _distance(pixels, other)
    return keep


def label_image(image: np.ndarray | Image.Image, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Palette index per pixel (order of :data:`COLOURS`), -1 for background or unassigned: ``(H, W)`` int64."""
    pixels = as_rgb_array(image)
    labels = np.full(pixels.shape[:2], -1, dtype=np.int64)
    for index, colour in enumerate(COLOURS.values()):
        labels[colour_segment(pixels, colour, threshold)] = index
    return labels


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two same-shape bool masks; 1.0 when both are empty, 0.0 when one is."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def dominant_colour(labels: np.ndarray, mask: np.ndarray) -> str | None:
    """The palette colour strictly most frequent among ``labels`` (``(H, W)``, from :func:`label_image`) inside
    ``mask``; None when the mask holds no palette pixel or two colours tie for first place."""
    counts = np.bincount(labels[mask & (labels >= 0)], minlength=len(COLOURS))
    best = int(counts.max())
    if best == 0 or int((counts == best).sum()) > 1:
        return None
    return list(COLOURS)[int(counts.argmax())]


def entity_scores(image: np.ndarray | Image.Image, layout_masks: Sequence[Any], colours: Sequence[str],
                  threshold: float = DEFAULT_THRESHOLD) -> list[dict[str, Any]]:
    """Score each entity of one generated image.

    ``image``: ``(H, W, 3)`` uint8 (or PIL). ``layout_masks``: one ``(H, W)`` mask per entity (anything
    :func:`eligen.entities.binarize_mask` reads; it must be at the image size). ``colours``: the entity's
    palette colour name, same order. Returns per entity ``{"colour", "iou", "colour_ok", "hit", "dominant",
    "mask_area", "segment_area"}`` (rules in the module docstring).
    """
    if len(layout_masks) != len(colours):
        raise ValueError(f"{len(layout_masks)} masks but {len(colours)} colours")
    unknown = [c for c in colours if c not in COLOURS]
    if unknown:
        raise ValueError(f"unknown colour(s) {unknown}; known: {', '.join(COLOURS)}")
    pixels = as_rgb_array(image)
    labels = label_image(pixels, threshold)
    scores = []
    for index, (raw, name) in enumerate(zip(layout_masks, colours, strict=True)):
        mask = binarize_mask(raw, index=index)
        if mask.shape != pixels.shape[:2]:
            raise ValueError(f"entity {index}: mask shape {mask.shape} differs from the image's {pixels.shape[:2]}")
        segment = labels == list(COLOURS).index(name)
        dominant = dominant_colour(labels, mask)
        value = iou(segment, mask)
        scores.append({"colour": name, "iou": value, "colour_ok": dominant == name, "hit": value > HIT_IOU,
                       "dominant": dominant, "mask_area": int(mask.sum()), "segment_area": int(segment.sum())})
    return scores


def summarise(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over entities (pooled across images): ``miou``, ``colour_accuracy`` (fraction ``colour_ok``),
    ``recall`` (fraction ``hit``) and the entity count ``n``; the means are NaN when ``n`` is 0."""
    n = len(scores)
    if n == 0:
        return {"miou": float("nan"), "colour_accuracy": float("nan"), "recall": float("nan"), "n": 0}
    return {"miou": float(np.mean([s["iou"] for s in scores])),
            "colour_accuracy": float(np.mean([bool(s["colour_ok"]) for s in scores])),
            "recall": float(np.mean([bool(s["hit"]) for s in scores])),
            "n": n}

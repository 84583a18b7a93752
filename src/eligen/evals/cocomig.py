"""COCO-MIG scoring (docs/design.md section 13): an open-vocabulary detector finds each instance, then its colour is
checked.

Per instance (its box in pixels of the generated image, its object noun, its colour):

- the detector is asked for the noun alone; the instance's **IoU** is the largest IoU between its box and any
  detection (0 without detections);
- it is **detected** when that IoU is at least 0.5; then the pixels of the best-matching detection are checked
  for the colour (:mod:`eligen.evals.colour`): **colour_ok** when at least 20% of them show it;
- it **succeeds** when detected and colour_ok. Its **mIoU contribution** is its IoU, except that a detected
  instance of the wrong colour contributes 0 (an undetected one keeps its IoU below 0.5, as in the benchmark).

Per level (L2-L6: the number of instances of a layout) and overall: **I-SR** is the fraction of instances that
succeed, **SR** the fraction of images whose instances all succeed, **mIoU** the mean contribution; in percent.
The benchmark segments the instance with SAM before the colour check; here the detection's box is used as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .boxes import Box, box_iou, crop_bounds
from .colour import colour_fraction

IOU_THRESHOLD = 0.5
COLOUR_THRESHOLD = 0.2
LEVELS = (2, 3, 4, 5, 6)
# third-party figures for EliGen on COCO-MIG (ContextGen, ICLR 2026)
PUBLISHED = {"EliGen, published (ContextGen, ICLR 2026)": {"isr": 64.12, "sr": 26.00, "miou": 59.23}}


class Detector(Protocol):
    def detect(self, image, label: str) -> list[tuple[Box, float]]:
        """Boxes (pixels of ``image``) and scores of the detections of ``label``."""
        ...


def score_instance(detections: Sequence[tuple[Sequence[float], float]], box: Sequence[float], pixels: np.ndarray,
                   colour: str, iou_threshold: float = IOU_THRESHOLD,
                   colour_threshold: float = COLOUR_THRESHOLD) -> dict[str, Any]:
    """One instance's scores. ``detections``: ``[(box, score)]`` in pixels; ``box``: the instance's pixel box;
    ``pixels``: the image, ``(H, W, 3)`` uint8 RGB."""
    if not detections:
        return {"iou": 0.0, "detected": False, "colour_fraction": None, "colour_ok": False, "success": False,
                "miou": 0.0, "matched": None}
    boxes = np.asarray([d[0] for d in detections], dtype=np.float64)
    ious = box_iou(box, boxes)
    best = int(np.argmax(ious))
    iou, matched = float(ious[best]), [float(v) for v in boxes[best]]
    if iou < iou_threshold:
        return {"iou": iou, "detected": False, "colour_fraction": None, "colour_ok": False, "success": False,
                "miou": iou, "matched": matched}
    left, top, right, bottom = crop_bounds(matched, pixels.shape[1], pixels.shape[0])
    fraction = colour_fraction(pixels[top:bottom, left:right], colour)
    ok = fraction >= colour_threshold
    return {"iou": iou, "detected": True, "colour_fraction": fraction, "colour_ok": ok, "success": ok,
            "miou": iou if ok else 0.0, "matched": matched}


def _rates(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    images: dict[int, bool] = {}
    for r in rows:
        images[r["layout"]] = images.get(r["layout"], True) and bool(r["success"])
    n = len(rows)
    return {"isr": float(np.mean([bool(r["success"]) for r in rows]) * 100) if n else float("nan"),
            "sr": float(np.mean(list(images.values())) * 100) if images else float("nan"),
            "miou": float(np.mean([r["miou"] for r in rows]) * 100) if n else float("nan"),
            "instances": n, "images": len(images)}


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"all": rates, "L2": rates, ..., "L6": rates}``; rates: ``isr``, ``sr``, ``miou`` (percent), counts.
    Levels outside L2-L6 count in ``all`` only."""
    out = {"all": _rates(rows)}
    for level in LEVELS:
        out[f"L{level}"] = _rates([r for r in rows if r["level"] == level])
    return out


def format_table(summary: dict[str, Any], label: str) -> str:
    def cells(s: dict[str, Any]) -> str:
        return " | ".join("-" if s[k] != s[k] else f"{s[k]:.2f}" for k in ("isr", "sr", "miou"))

    lines = ["| COCO-MIG | I-SR | SR | mIoU | instances | images |", "|---|---|---|---|---|---|"]
    for level in LEVELS:
        s = summary[f"L{level}"]
        lines.append(f"| {label}, L{level} | {cells(s)} | {s['instances']} | {s['images']} |")
    s = summary["all"]
    lines.append(f"| **{label}, all** | {cells(s)} | {s['instances']} | {s['images']} |")
    for name, numbers in PUBLISHED.items():
        lines.append(f"| {name} | {numbers['isr']:.2f} | {numbers['sr']:.2f} | {numbers['miou']:.2f} | - | - |")
    return "\n".join(lines)


def verdict(row: dict[str, Any]) -> str:
    if row["success"]:
        return f"ok IoU {row['iou']:.2f}"
    if row["detected"]:
        return f"wrong colour ({(row['colour_fraction'] or 0) * 100:.0f}%)"
    return f"missed IoU {row['iou']:.2f}"

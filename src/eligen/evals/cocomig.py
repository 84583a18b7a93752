"""COCO-MIG scoring as MIG-Bench's ``eval_mig.py`` does it (docs/design.md section 13).

Every image is first resized to 512x512 the way the script's OpenCV call does (:mod:`eligen.evals.resample`); each
instance's ground-truth box is its normalised box times 512. Per instance (object noun, colour):

- the detector is asked for the noun alone on the 512x512 image; the instance's **IoU** is the largest IoU between
  its box and any detection (0 without detections);
- it is **detected** when that IoU is at least 0.5; only then SAM segments the *ground-truth* box (the best of its
  three masks, :mod:`eligen.evals.segment`) and the mask's pixels are checked for the colour
  (:func:`eligen.evals.colour.mask_colour`): **colour_ok** when at least 20 % of them show it;
- it **succeeds** when detected and colour_ok. Its **mIoU contribution** is its IoU, except that a detected
  instance of the wrong colour contributes 0 (an undetected one keeps its IoU below 0.5, as the script does).

Per level (L2-L6: the number of instances of a layout) and overall: **I-SR** is the fraction of instances that
succeed, **SR** the fraction of images whose instances all succeed, **mIoU** the mean contribution; in percent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .boxes import Box, box_iou
from .colour import mask_colour
from .layouts import BenchLayout
from .published import COCOMIG as PUBLISHED
from .resample import resize_like_opencv

IOU_THRESHOLD = 0.5
PROTOCOL_SIZE = 512  # the script scores every image at 512x512
LEVELS = (2, 3, 4, 5, 6)


class Detector(Protocol):
    def detect(self, image, label: str) -> list[tuple[Box, float]]:
        """Boxes (pixels of ``image``) and scores of the detections of ``label``."""
        ...


def protocol_pixels(image: Image.Image) -> np.ndarray:
    """The image as the script scores it: RGB, resized to 512x512 by OpenCV's rule, ``(512, 512, 3)`` uint8."""
    return resize_like_opencv(np.asarray(image.convert("RGB")), PROTOCOL_SIZE, PROTOCOL_SIZE)


def protocol_box(box: Sequence[float]) -> np.ndarray:
    """A normalised ground-truth box in pixels of the 512x512 image (the script's ``bbox * 512``, not rounded)."""
    return np.asarray([float(v) for v in box], dtype=np.float64) * PROTOCOL_SIZE


def score_instance(detections: Sequence[tuple[Sequence[float], float]], box: Sequence[float] | np.ndarray,
                   pixels: np.ndarray, colour: str, segment: Callable[[Any], np.ndarray],
                   iou_threshold: float = IOU_THRESHOLD) -> dict[str, Any]:
    """One instance's scores. ``detections``: ``[(box, score)]`` in pixels of ``pixels``; ``box``: the instance's
    ground-truth box in the same pixels; ``pixels``: ``(H, W, 3)`` uint8 RGB; ``segment(box)``: SAM's best mask of
    ``box`` (asked only for a detected instance)."""
    missed = {"colour_fraction": None, "colour_ok": False, "success": False, "mask_pixels": None}
    if not detections:
        return {"iou": 0.0, "detected": False, "miou": 0.0, "matched": None, **missed}
    boxes = np.asarray([d[0] for d in detections], dtype=np.float64)
    ious = box_iou(box, boxes)
    best = int(np.argmax(ious))
    iou, matched = float(ious[best]), [float(v) for v in boxes[best]]
    if iou < iou_threshold:
        return {"iou": iou, "detected": False, "miou": iou, "matched": matched, **missed}
    mask = segment(box)
    fraction, ok = mask_colour(pixels, mask, colour)
    return {"iou": iou, "detected": True, "colour_fraction": fraction, "colour_ok": ok, "success": ok,
            "miou": iou if ok else 0.0, "matched": matched, "mask_pixels": int(np.asarray(mask).sum())}


class Judge:
    """What COCO-MIG's scoring needs: a detector and a segmenter (and whether the segmenter is the benchmark's)."""

    def __init__(self, detector: Detector, segmenter, comparable_segmenter: bool = True) -> None:
        self.detector, self.segmenter, self.comparable_segmenter = detector, segmenter, comparable_segmenter


def score_layout(judge: Judge, image: Image.Image, layout: BenchLayout, boxes: list,
                 iou_threshold: float = IOU_THRESHOLD) -> list[dict[str, Any]]:
    """Every instance of ``layout`` on ``image`` (``boxes``: the pixel boxes the generator was given, for the
    report; the scoring uses the benchmark's boxes at 512)."""
    pixels = protocol_pixels(image)
    scored = Image.fromarray(pixels)
    detections: dict[str, list] = {}
    rows = []
    for index, (entity, given) in enumerate(zip(layout.entities, boxes, strict=True)):
        if entity.name not in detections:
            detections[entity.name] = judge.detector.detect(scored, entity.name)
        box = protocol_box(entity.box)
        scores = score_instance(detections[entity.name], box, pixels, entity.colour or "",
                                lambda b: judge.segmenter.segment(scored, b), iou_threshold)
        rows.append({"layout": layout.index, "key": layout.key, "entity": index, "name": entity.name,
                     "prompt": entity.prompt, "box": [round(float(v), 3) for v in given], "level": layout.level,
                     "colour": entity.colour, "box_512": [round(float(v), 3) for v in box], **scores,
                     "detections": len(detections[entity.name])})
    return rows


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


COLUMNS = ("isr", "sr", "miou")
HEADER = "| COCO-MIG | I-SR | SR | mIoU | instances | images |"


def format_row(label: str, rates: dict[str, Any]) -> str:
    cells = " | ".join("-" if rates[k] != rates[k] else f"{rates[k]:.2f}" for k in COLUMNS)
    return f"| {label} | {cells} | {rates.get('instances', '-')} | {rates.get('images', '-')} |"


def format_table(summary: dict[str, Any], label: str) -> str:
    lines = [HEADER, "|---|---|---|---|---|---|"]
    lines += [format_row(f"{label}, L{level}", summary[f"L{level}"]) for level in LEVELS]
    lines.append(format_row(f"**{label}, all**", summary["all"]))
    lines += [format_row(p.label, p.numbers) for p in PUBLISHED]
    return "\n".join(lines)


def verdict(row: dict[str, Any]) -> str:
    if row["success"]:
        return f"ok IoU {row['iou']:.2f}"
    if row["detected"]:
        return f"wrong colour ({(row['colour_fraction'] or 0) * 100:.0f}%)"
    return f"missed IoU {row['iou']:.2f}"

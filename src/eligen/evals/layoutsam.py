"""LayoutSAM-Eval scoring as CreatiLayout's ``score_layoutsam_benchmark.py`` does it (docs/design.md section 13).

Per layout image:

1. the image is read as the protocol reads it: the protocol's images are JPEG files (saved with PIL's defaults), so
   the PNG is passed through the same JPEG encoding first (:func:`as_protocol_jpeg`);
2. each box is cropped with the protocol's arithmetic: the normalised box (3 decimals, float32) times the image's
   size, truncated to integers (:func:`protocol_crop`);
3. the judge sees the crop and the question :data:`~eligen.evals.protocol_text.LAYOUTSAM_PRESENCE` about the region
   caption; only when it answers yes, the three attribute questions about the detailed caption (both captions with
   every ``/`` removed). A box judged absent scores 0 on all four;
4. an answer counts as yes when the text ``Yes`` or ``yes`` occurs anywhere in it (the protocol's reading: ``YES``
   is a no, and ``No, the eyes are closed.`` a yes).

The table reports per-box averages pooled over all boxes of all layouts, in percent.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..data.vlm import VLMBackend
from .layouts import BenchEntity, BenchLayout
from .protocol_text import LAYOUTSAM_ATTRIBUTE, LAYOUTSAM_PRESENCE
from .published import LAYOUTSAM as PUBLISHED

CRITERIA = ("spatial", "colour", "texture", "shape")
ATTRIBUTES = ("colour", "texture", "shape")
ATTRIBUTE_WORDS = {"colour": "color", "texture": "texture", "shape": "shape"}  # the word the question uses
DECIMALS = 3


def strip_slashes(text: str) -> str:
    """The protocol removes every ``/`` from both captions before asking."""
    return text.replace("/", "")


def presence_question(name: str) -> str:
    return LAYOUTSAM_PRESENCE.substitute(description=strip_slashes(name))


def attribute_question(attribute: str, name: str, detail: str) -> str:
    return LAYOUTSAM_ATTRIBUTE.substitute(description=strip_slashes(name), attribute=ATTRIBUTE_WORDS[attribute],
                                          detail=strip_slashes(detail))


def is_yes(answer: str) -> bool:
    """The protocol's reading: yes when ``Yes`` or ``yes`` occurs anywhere in the answer."""
    return "Yes" in (answer or "") or "yes" in (answer or "")


def as_protocol_jpeg(image: Image.Image) -> Image.Image:
    """``image`` after a round trip through JPEG with PIL's defaults (quality 75), as the protocol's files are."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def protocol_crop(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The crop of a normalised box: each coordinate rounded to 3 decimals, stored as float32 and multiplied by the
    image's size, then truncated (the protocol scales both axes by one square resolution; here x by the width and y
    by the height, the same on square images). At least one pixel wide and high."""
    x0, y0, x1, y1 = (float(np.float32(round(float(v), DECIMALS))) for v in box)
    left, top, right, bottom = int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)
    return left, top, max(right, left + 1), max(bottom, top + 1)


def score_entity(backend: VLMBackend, crop: Image.Image, entity: BenchEntity) -> dict[str, Any]:
    """The four 0/1 scores of one box, and the answers they came from."""
    answers = {"spatial": backend.ask(presence_question(entity.name), crop)}
    scores = {c: 0.0 for c in CRITERIA}
    if is_yes(answers["spatial"]):
        scores["spatial"] = 1.0
        for attribute in ATTRIBUTES:
            answers[attribute] = backend.ask(attribute_question(attribute, entity.name, entity.detail or entity.prompt),
                                             crop)
            scores[attribute] = 1.0 if is_yes(answers[attribute]) else 0.0
    return {**scores, "answers": answers}


def score_layout(judge: VLMBackend, image: Image.Image, layout: BenchLayout, boxes: list) -> list[dict[str, Any]]:
    """Every box of ``layout`` on ``image`` (``boxes``: the pixel boxes the generator was given, for the report)."""
    seen = as_protocol_jpeg(image)
    rows = []
    for index, (entity, box) in enumerate(zip(layout.entities, boxes, strict=True)):
        crop_box = protocol_crop(entity.box, seen.width, seen.height)
        rows.append({"layout": layout.index, "key": layout.key, "entity": index, "name": entity.name,
                     "prompt": entity.prompt, "box": [round(float(v), 3) for v in box], "crop": list(crop_box),
                     **score_entity(judge, seen.crop(crop_box), entity)})
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-box averages in percent (NaN without boxes) and the box count ``boxes``."""
    n = len(rows)
    out: dict[str, Any] = {c: float(np.mean([r[c] for r in rows]) * 100) if n else float("nan") for c in CRITERIA}
    out["boxes"] = n
    out["layouts"] = len({r["layout"] for r in rows})
    return out


COLUMNS = ("spatial", "colour", "texture", "shape")
HEADER = "| LayoutSAM-Eval | spatial | color | texture | shape | boxes |"


def format_row(label: str, summary: dict[str, Any]) -> str:
    cells = " | ".join("-" if summary[c] != summary[c] else f"{summary[c]:.2f}" for c in COLUMNS)
    return f"| {label} | {cells} | {summary.get('boxes', '-')} |"


def format_table(summary: dict[str, Any], label: str) -> str:
    lines = [HEADER, "|---|---|---|---|---|---|", format_row(label, summary)]
    lines += [format_row(p.label, {**p.numbers, "boxes": "-"}) for p in PUBLISHED]
    return "\n".join(lines)


def verdict(row: dict[str, Any]) -> str:
    """A short label for the contact sheet: ``ok`` or the criteria that failed."""
    failed = [c for c in CRITERIA if not row[c]]
    return "ok" if not failed else "absent" if "spatial" in failed else "no " + "/".join(failed)

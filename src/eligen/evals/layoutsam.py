"""LayoutSAM-Eval scoring (docs/design.md section 13): a VLM judges each box's crop.

Per box, on the crop of the generated image inside the box (at the size the image was generated at):

1. **spatial**: is the entity (its short region caption) there? yes -> 1, anything else -> 0;
2. only when it is, **colour**, **texture** and **shape**: is the crop consistent with that attribute of the
   detailed caption (an attribute the caption does not mention counts as consistent)? yes -> 1; otherwise 0.
   A box judged absent scores 0 on all four.

An answer is read as yes when its first "yes" or "no" word is "yes". The table reports the per-box averages
(pooled over all boxes of all layouts), in percent, as the benchmark does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..data.vlm import VLMBackend
from .layouts import BenchEntity

CRITERIA = ("spatial", "colour", "texture", "shape")
ATTRIBUTES = ("colour", "texture", "shape")
# third-party figures for EliGen on the 1k large-box subset of LayoutSAM-Eval (ContextGen, ICLR 2026)
PUBLISHED = {"EliGen, published (ContextGen, ICLR 2026; 1k large-box subset)":
             {"spatial": 94.05, "colour": 83.84, "texture": 87.31, "shape": 87.01}}
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def presence_question(name: str) -> str:
    return (f'Does this image show "{name}"? Answer with one word, "Yes" or "No".')


def attribute_question(attribute: str, name: str, detail: str) -> str:
    word = "color" if attribute == "colour" else attribute
    return (f'Here is a detailed description of "{name}": "{detail}". Is the {word} of the subject in this image '
            f'consistent with that description? If the description does not mention its {word}, answer "Yes". '
            'Answer with one word, "Yes" or "No".')


def is_yes(answer: str) -> bool:
    """True when the first "yes"/"no" word of ``answer`` is "yes" (no such word: False)."""
    match = _YES_NO.search(answer or "")
    return match is not None and match.group(1).lower() == "yes"


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


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-box averages in percent (NaN without boxes) and the box count ``boxes``."""
    n = len(rows)
    out: dict[str, Any] = {c: float(np.mean([r[c] for r in rows]) * 100) if n else float("nan") for c in CRITERIA}
    out["boxes"] = n
    out["layouts"] = len({r["layout"] for r in rows})
    return out


def format_table(summary: dict[str, Any], label: str) -> str:
    lines = ["| LayoutSAM-Eval | spatial | color | texture | shape | boxes |", "|---|---|---|---|---|---|",
             f"| {label} | " + " | ".join(f"{summary[c]:.2f}" for c in CRITERIA) + f" | {summary['boxes']} |"]
    for name, numbers in PUBLISHED.items():
        lines.append(f"| {name} | " + " | ".join(f"{numbers[c]:.2f}" for c in CRITERIA) + " | - |")
    return "\n".join(lines)


def verdict(row: dict[str, Any]) -> str:
    """A short label for the contact sheet: ``ok`` or the criteria that failed."""
    failed = [c for c in CRITERIA if not row[c]]
    return "ok" if not failed else "absent" if "spatial" in failed else "no " + "/".join(failed)

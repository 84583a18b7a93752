"""OverLayBench scoring as its evaluation toolkit's ``OverLayBenchMeter`` does it (docs/design.md section 13).

Per layout image the judge (Qwen2.5-VL-32B-Instruct in the toolkit) answers three questions, each a system message
and the prompt text followed by the whole image (:mod:`eligen.evals.protocol_text`), each answer read as the JSON
inside its first ```` ```json ```` block, else as the whole text, else as nothing (:func:`extract_json`):

- **boxes**: every instance of the layout's categories; per category the predicted boxes (rescaled from the image's
  pixels to the 1024 canvas and truncated, as the toolkit's ``resize_bbox``) are matched greedily to the
  ground-truth boxes by descending IoU; unmatched ground truths score 0. **mIoU** is the mean matched IoU of the
  image's instances, averaged over images; **O-mIoU** (overlap mIoU) the IoU between the intersection of each
  annotated overlapping pair's ground-truth boxes and the intersection of their matched predictions, averaged per
  image, then over images;
- **entities**: whether each instance matches its description; **SR_E** is the share of instances answered "yes"
  (case-insensitive, the whole value), pooled over images;
- **relations**: whether each annotated relation holds; **SR_R** likewise.

The toolkit's prompts take the ground-truth boxes at 1024 pixels (scaled for a 512-pixel image); here they are
scaled to the image's size (the same for 1024 and 512). Answers that are not what the prompt asks for (a list, a
number) count as no prediction, where the toolkit would stop with an error.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .layouts import OVERLAYBENCH_CANVAS, BenchLayout
from .protocol_text import (
    OVERLAYBENCH_BOXES,
    OVERLAYBENCH_ENTITIES,
    OVERLAYBENCH_RELATIONS,
    OVERLAYBENCH_SYSTEM,
)
from .published import OVERLAYBENCH as PUBLISHED

JUDGE_MODEL = "Qwen/Qwen2.5-VL-32B-Instruct"  # the toolkit's judge
_JSON_BLOCK = re.compile(r"```json\s*([\s\S]+?)\s*```")


def extract_json(text: str) -> Any:
    """The toolkit's reading of an answer: the JSON of the first ```json block, else the whole text as JSON, else
    ``{}``."""
    match = _JSON_BLOCK.search(text or "")
    try:
        return json.loads(match.group(1) if match else text)
    except (json.JSONDecodeError, ValueError, TypeError):
        return {}


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """The toolkit's IoU: no clipping of inverted boxes, 0 when the union is not positive (or ``a`` is not 4 long)."""
    if len(a) != 4:
        return 0.0
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0


def rescale(boxes: Any, ratio_x: float, ratio_y: float) -> list[list[int]]:
    """Predicted boxes to the 1024 canvas: each a list of 4 numbers (or number texts) times the ratio, truncated;
    anything else dropped."""
    out = []
    for box in boxes if isinstance(boxes, list) else []:
        if not isinstance(box, list) or len(box) != 4:
            continue
        try:
            values = [float(v) if isinstance(v, str) else v for v in box]
            if not all(isinstance(v, (int, float)) for v in values):
                continue
            out.append([int(v * (ratio_x if i % 2 == 0 else ratio_y)) for i, v in enumerate(values)])
        except (ValueError, OverflowError):
            continue
    return out


def match(truths: list[list[int]], predictions: list[list[int]]) -> tuple[list[float], list, list]:
    """Greedy matching by descending IoU (ties in ground-truth-major order): ``(ious, truths in match order,
    predictions in the same order)``, each as long as ``truths``; unmatched truths get IoU 0 and ``[0, 0, 0, 0]``.
    The unmatched truths follow the matched ones as distinct boxes, then the first truth again for any duplicate."""
    pairs = sorted(((iou(t, p), i, j) for i, t in enumerate(truths) for j, p in enumerate(predictions)),
                   key=lambda x: x[0], reverse=True)
    used_t: set[int] = set()
    used_p: set[int] = set()
    scores, order_t, order_p = [], [], []
    for value, i, j in pairs:
        if i in used_t or j in used_p:
            continue
        used_t.add(i)
        used_p.add(j)
        order_t.append(truths[i])
        order_p.append(predictions[j])
        scores.append(value)
    scores += [0.0] * (len(truths) - len(scores))
    matched = {tuple(t) for t in order_t}
    rest = list(dict.fromkeys(tuple(t) for t in truths if tuple(t) not in matched))
    order_t += [list(t) for t in rest]
    order_t += [truths[0]] * (len(truths) - len(order_t))
    order_p += [[0, 0, 0, 0]] * (len(truths) - len(order_p))
    return scores, order_t, order_p


def _intersection(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])]


def box_scores(annotation: dict[str, Any], predicted: Any, width: int, height: int) -> tuple[float, float | None]:
    """``(image mIoU, image O-mIoU or None without annotated overlaps)`` in [0, 1]."""
    instances = annotation["annotations"]
    truth = {name: [int(v) for v in inst["bbox"]] for name, inst in instances.items()}
    predicted = predicted if isinstance(predicted, dict) else {}
    scores: list[float] = []
    order_t: list = []
    order_p: list = []
    for category in dict.fromkeys(inst["category"] for inst in instances.values()):
        truths = [truth[name] for name, inst in instances.items() if inst["category"] == category]
        found = rescale(predicted.get(category, []), OVERLAYBENCH_CANVAS / width, OVERLAYBENCH_CANVAS / height)
        s, t, p = match(truths, found)
        scores += s
        order_t += t
        order_p += p
    boxes = list(truth.values())
    overlaps = []
    for item in annotation["valid_overlap"]:
        first, second = (order_t.index(boxes[k]) for k in item["overlap_box"][:2])
        overlaps.append(iou(_intersection(order_t[first], order_t[second]),
                            _intersection(order_p[first], order_p[second])))
    return sum(scores) / len(scores), (sum(overlaps) / len(overlaps) if overlaps else None)


def yes_count(expected: Sequence[Any], answers: Any) -> int:
    """How many of the ``expected`` keys the answer marks "yes" (the whole value, any case)."""
    answers = answers if isinstance(answers, dict) else {}
    return sum(1 for key in expected if isinstance(answers.get(key), str) and answers[key].lower() == "yes")


def _scaled(box: Sequence[float], width: int, height: int) -> list[int]:
    if (width, height) == (OVERLAYBENCH_CANVAS, OVERLAYBENCH_CANVAS):
        return list(box)  # type: ignore[arg-type]
    return [int(v / OVERLAYBENCH_CANVAS * (width if i % 2 == 0 else height)) for i, v in enumerate(box)]


def questions(annotation: dict[str, Any], width: int, height: int) -> dict[str, str]:
    """The three prompts for an image of ``width`` x ``height``, worded and filled exactly as the toolkit's."""
    instances = copy.deepcopy(annotation["annotations"])
    for instance in instances.values():
        instance["bbox"] = _scaled(instance["bbox"], width, height)
    categories = sorted({inst["category"] for inst in annotation["annotations"].values()})
    boxes = {name: inst["bbox"] for name, inst in instances.items()}
    return {"boxes": OVERLAYBENCH_BOXES.substitute(categories=repr(categories)),
            "entities": OVERLAYBENCH_ENTITIES.substitute(instances=repr(instances)),
            "relations": OVERLAYBENCH_RELATIONS.substitute(boxes=repr(boxes), relations=repr(annotation["relations"]))}


def messages(prompt: str, image: Image.Image) -> list[dict[str, Any]]:
    """The toolkit's chat: its system message, then the prompt text followed by the image."""
    return [{"role": "system", "content": [OVERLAYBENCH_SYSTEM]}, {"role": "user", "content": [prompt, image]}]


def score_layout(judge, image: Image.Image, layout: BenchLayout, boxes: list) -> list[dict[str, Any]]:
    """One row for the image: its mIoU, O-mIoU, entity and relation answers (``boxes``: the pixel boxes the
    generator was given, for the report)."""
    annotation = layout.annotation or {}
    image = image.convert("RGB")
    asked = questions(annotation, image.width, image.height)
    answers = {kind: judge.chat(messages(text, image)) for kind, text in asked.items()}
    parsed = {kind: extract_json(text) for kind, text in answers.items()}
    miou, omiou = box_scores(annotation, parsed["boxes"], image.width, image.height)
    names, relations = list(annotation["annotations"]), list(annotation["relations"])
    entity_answers = parsed["entities"] if isinstance(parsed["entities"], dict) else {}
    return [{"layout": layout.index, "key": layout.key, "miou": miou, "omiou": omiou,
             "entity_yes": yes_count(names, parsed["entities"]), "entity_total": len(names),
             "relation_yes": yes_count(relations, parsed["relations"]), "relation_total": len(relations),
             "instances": [{"name": e.name, "box": [round(float(v), 3) for v in b],
                            "answer": str(entity_answers.get(e.name, ""))}
                           for e, b in zip(layout.entities, boxes, strict=True)],
             "answers": answers}]


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """mIoU and O-mIoU (means over images), SR_E and SR_R (pooled), in percent; NaN where nothing counts."""
    nan = float("nan")
    overlapping = [r["omiou"] for r in rows if r["omiou"] is not None]
    entities, relations = sum(r["entity_total"] for r in rows), sum(r["relation_total"] for r in rows)
    return {"miou": float(np.mean([r["miou"] for r in rows]) * 100) if rows else nan,
            "omiou": float(np.mean(overlapping) * 100) if overlapping else nan,
            "sr_e": sum(r["entity_yes"] for r in rows) / entities * 100 if entities else nan,
            "sr_r": sum(r["relation_yes"] for r in rows) / relations * 100 if relations else nan,
            "images": len(rows)}


COLUMNS = ("miou", "omiou", "sr_e", "sr_r")
HEADER = "| OverLayBench | mIoU | O-mIoU | SR_E | SR_R | images |"


def _cell(value: Any) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def format_row(label: str, summary: dict[str, Any]) -> str:
    cells = " | ".join(_cell(summary.get(c)) for c in COLUMNS)
    return f"| {label} | {cells} | {summary.get('images', '-')} |"


def format_table(summary: dict[str, Any], label: str) -> str:
    lines = [HEADER, "|---|---|---|---|---|---|", format_row(label, summary)]
    lines += [format_row(p.label, p.numbers) for p in PUBLISHED]
    return "\n".join(lines)


def sheet_items(rows: Sequence[dict[str, Any]]) -> list[tuple[list[float], str]]:
    return [(inst["box"], f"{inst['name']}: {inst['answer'] or '-'}") for r in rows for inst in r["instances"]]

"""Parse and validate the answers of grounding vision-language models into EliGen entities.

EliGen training data is an image, a global caption and entities (a local prompt plus a box). A grounding VLM
produces them in one of two conventions (docs/design.md section 6):

- **Qwen2-VL** writes ``<|object_ref_start|>a red apple<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  with coordinates on a 0-1000 grid of the image (:func:`parse_qwen2_boxes`). An OpenAI-compatible server that
  skips special tokens turns that into ``a red apple(x1,y1),(x2,y2)``, which is read as well.
- **Qwen2.5-VL** writes JSON ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`` in absolute pixels of the image
  *as the model saw it* (its processor resizes images to multiples of 28; pass that size as ``model_size`` when it
  differs from the original), often inside a ```` ```json ```` fence or surrounded by prose
  (:func:`parse_qwen25_json`).

:func:`parse_annotation` reads a whole answer to :data:`ANNOTATE_INSTRUCTIONS` (a caption and entities) and
:func:`parse_plan` an answer to :data:`PLAN_INSTRUCTIONS` (a layout planned from a text prompt); both return an
:class:`Annotation` whose entities went through :func:`validate_entities`. Everything here is pure (``json``,
``re``, ``math``): no model, no network. Whatever text comes back, the only exception raised is
:class:`ParseError`; boxes are always finite.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..entities import Entity, Layout

Box = tuple[float, float, float, float]

CONVENTIONS = ("auto", "qwen2", "qwen25")
QWEN2_GRID = 1000  # Qwen2-VL coordinates lie on a 0-1000 grid of the image

LABEL_KEYS = ("label", "prompt", "description")  # an entity's local prompt in JSON, first non-empty wins
BOX_KEYS = ("bbox_2d", "bbox", "box")
ENTITY_LIST_KEYS = ("entities", "objects")
CAPTION_KEYS = ("caption", "global_prompt", "prompt")  # "prompt" only counts in an object that is not an entity

MAX_JSON_ATTEMPTS = 1000  # failed decode attempts before giving up on finding JSON in an answer
EXCERPT_CHARS = 160

ANNOTATE_INSTRUCTIONS = """\
Describe this image for training an image generator.
1. Write one detailed caption of the whole image (subjects, attributes, setting, style, lighting).
2. List up to {max_entities} distinct, clearly visible entities. For each one give a short local prompt that \
describes only that entity (e.g. "a red apple with a leaf") and its bounding box [x1, y1, x2, y2] in pixels \
(top-left and bottom-right corners). Do not list the same object twice.
Answer with exactly one JSON object and nothing else, in this format:
```json
{{"caption": "a wooden table with a red apple and a blue mug in soft morning light",
  "entities": [{{"label": "a red apple with a leaf", "bbox_2d": [120, 340, 260, 470]}},
               {{"label": "a blue ceramic mug", "bbox_2d": [300, 280, 420, 460]}}]}}
```"""
"""Prompt for Qwen2.5-VL-style annotation; fill it with ``.format(max_entities=...)``.

The answer is read by :func:`parse_annotation`: a JSON object ``{"caption": str, "entities": [{"label": str,
"bbox_2d": [x1, y1, x2, y2]}]}`` in absolute pixels (a bare JSON list of entities plus a ``Caption:`` line is
accepted too).
"""

ANNOTATE_INSTRUCTIONS_QWEN2 = """\
Describe this image for training an image generator.
On the first line write "Caption: " followed by one detailed caption of the whole image (subjects, attributes, \
setting, style, lighting).
Then list up to {max_entities} distinct, clearly visible entities, one per line, each as a short local prompt \
that describes only that entity, grounded with its bounding box:
<|object_ref_start|>a red apple with a leaf<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
Do not list the same object twice."""
"""Prompt for Qwen2-VL-style annotation (``Caption:`` line plus grounding tags, 0-1000 grid); ``.format`` it
with ``max_entities`` and parse the answer with ``parse_annotation(..., convention="qwen2")``."""

PLAN_INSTRUCTIONS = """\
Plan the layout of an image of {width}x{height} pixels for this description:
{prompt}
1. Write one detailed global prompt for the whole image.
2. Place up to {max_entities} distinct entities. For each one give a short local prompt that describes only that \
entity and its bounding box [x1, y1, x2, y2] in pixels of the {width}x{height} image (0 <= x1 < x2 <= {width}, \
0 <= y1 < y2 <= {height}); entities may overlap when that is natural.
Answer with exactly one JSON object and nothing else, in this format:
```json
{{"caption": "the global prompt",
  "entities": [{{"label": "a local prompt", "bbox_2d": [x1, y1, x2, y2]}}]}}
```"""
"""Prompt for planning a layout from text; ``.format(prompt=..., width=..., height=..., max_entities=...)`` and
parse the answer with :func:`parse_plan` (the same JSON shape as :data:`ANNOTATE_INSTRUCTIONS`)."""


# ----------------------------------------------------------------------------------------------------------
# Data model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class GroundedEntity:
    """A local prompt and its box ``(x0, y0, x1, y1)`` in pixel coordinates of the image (x0 < x1, y0 < y1)."""

    prompt: str
    box: Box


@dataclass
class Annotation:
    """A global caption and its grounded entities: one training example, or a planned layout."""

    caption: str
    entities: list[GroundedEntity] = field(default_factory=list)

    def to_record(self, image: str) -> dict[str, Any]:
        """The trainer's JSONL record ``{"image", "prompt", "entities": [{"prompt", "box": [x0, y0, x1, y1]}]}``.

        ``image`` is the image path as it should appear in the data file (relative to that file).
        """
        return {
            "image": image,
            "prompt": self.caption,
            "entities": [{"prompt": e.prompt, "box": [float(v) for v in e.box]} for e in self.entities],
        }

    def to_layout(self, width: int, height: int) -> Layout:
        """A validated :class:`eligen.Layout` of box entities (raises :class:`eligen.LayoutError` if it is not)."""
        layout = Layout(self.caption, width, height,
                        [Entity(e.prompt, box=[float(v) for v in e.box]) for e in self.entities])
        layout.validate()
        return layout


class ParseError(ValueError):
    """A model answer could not be used: says what was expected and quotes the start of what came back."""

    def __init__(self, expected: str, text: Any):
        self.expected = expected
        self.excerpt = _excerpt(text)
        super().__init__(f"expected {expected}; got {self.excerpt}")


def _excerpt(text: Any) -> str:
    if not isinstance(text, str):
        return f"a {type(text).__name__}, not text"
    if not text.strip():
        return "an empty answer"
    short = text.strip()
    if len(short) > EXCERPT_CHARS:
        short = short[:EXCERPT_CHARS] + "..."
    return repr(short)


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise ParseError("the model's answer as a string", text)
    return text


def _check_size(width: Any, height: Any) -> tuple[float, float]:
    """Image size as two positive finite numbers (a caller error, not a parse error, if not)."""
    out = []
    for name, value in (("width", width), ("height", height)):
        number = _finite(value)
        if number is None or number <= 0:
            raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
        out.append(number)
    return out[0], out[1]


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN, infinities and huge integers are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _ordered_box(x0: float, y0: float, x1: float, y1: float) -> Box | None:
    """Corners sorted so that x0 <= x1 and y0 <= y1; None unless all four are finite."""
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


# ----------------------------------------------------------------------------------------------------------
# Qwen2-VL: grounding tags, 0-1000 grid
# ----------------------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
# A label runs to the end tag on the same line and never across another start tag (keeps the scan linear).
_REF_RE = r"<\|object_ref_start\|>(?P<ref>(?:(?!<\|object_ref_(?:start|end)\|>)[^\n])*)<\|object_ref_end\|>"
_BOX_RE = (rf"(?:<\|box_start\|>\s*)?\(\s*(?P<x0>{_NUM})\s*,\s*(?P<y0>{_NUM})\s*\)\s*,?\s*"
           rf"\(\s*(?P<x1>{_NUM})\s*,\s*(?P<y1>{_NUM})\s*\)(?:\s*<\|box_end\|>)?")
_QWEN2_TOKEN = re.compile(rf"{_REF_RE}|(?P<box>{_BOX_RE})")
_SPECIAL_TOKEN = re.compile(r"<\|[a-z_]*\|>")
_SEPARATORS = re.compile(r"[\s,;:.\-]*")
_LIST_MARKER = re.compile(r"^(?:[-*•>]+|\d{1,3}[.)])\s+")
_LABEL_JUNK = " \t\r\n\"'`*_:=,;([{-"


def _clean_label(text: str) -> str:
    """A label from free text: special tokens, list markers, quotes and trailing separators removed."""
    label = _SPECIAL_TOKEN.sub("", text).strip()
    label = _LIST_MARKER.sub("", label)
    return label.strip(_LABEL_JUNK).strip()


def _grid_number(text: str) -> float:
    try:
        return float(text)
    except (OverflowError, ValueError):  # the regex only admits numbers; this is belt and braces
        return math.nan


def parse_qwen2_boxes(text: str, width: int, height: int) -> list[GroundedEntity]:
    """Entities from Qwen2-VL grounding output; boxes scaled from the 0-1000 grid to pixels (``x * width / 1000``).

    Each ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` takes its label from the ``<|object_ref_start|>...
    <|object_ref_end|>`` before it; without those tags, from the text before it on the same line (list markers
    and trailing ``:`` removed). Several boxes in a row on one line share one label. The box tags themselves may be
    missing (a server that skips special tokens). Corners are sorted; boxes with non-finite numbers are dropped;
    boxes are not clipped here (see :func:`validate_entities`). Raises :class:`ParseError` if no box is found.
    """
    text = _check_text(text)
    width_f, height_f = _check_size(width, height)
    entities: list[GroundedEntity] = []
    found = False
    label: str | None = None  # label of the previous ref or box, shared by boxes that follow directly
    after_ref = False
    last_end = 0
    for match in _QWEN2_TOKEN.finditer(text):
        gap = text[last_end:match.start()]
        last_end = match.end()
        if match.group("box") is None:
            label = _clean_label(match.group("ref")) or None
            after_ref = True
            continue
        found = True
        same_line = _clean_label(gap.rsplit("\n", 1)[-1])
        if "\n" not in gap:  # a ref label wins over text before the box; a bare run of boxes shares a label
            current = label if label is not None and (after_ref or _SEPARATORS.fullmatch(gap)) else same_line
        else:  # a box on a new line takes the text before it on that line, else the ref just above it
            current = same_line or (label if after_ref and label is not None else "")
        label, after_ref = current or None, False
        x0, y0, x1, y1 = (_grid_number(match.group(k)) for k in ("x0", "y0", "x1", "y1"))
        box = _ordered_box(x0 * width_f / QWEN2_GRID, y0 * height_f / QWEN2_GRID,
                           x1 * width_f / QWEN2_GRID, y1 * height_f / QWEN2_GRID)
        if box is not None:
            entities.append(GroundedEntity(current, box))
    if not found:
        raise ParseError("Qwen2-VL grounding boxes like '<|object_ref_start|>label<|object_ref_end|>"
                         "<|box_start|>(x1,y1),(x2,y2)<|box_end|>' on a 0-1000 grid", text)
    return entities


# ----------------------------------------------------------------------------------------------------------
# Qwen2.5-VL: JSON with absolute bbox_2d
# ----------------------------------------------------------------------------------------------------------

_DECODER = json.JSONDecoder()
_JSON_START = re.compile(r"[\[{]")


def _json_values(text: str) -> Iterator[Any]:
    """Every JSON array or object embedded in ``text``, left to right, not overlapping.

    Fences and prose are skipped; a truncated list still yields its complete objects one by one.
    """
    position, failures = 0, 0
    while failures < MAX_JSON_ATTEMPTS:
        found = _JSON_START.search(text, position)
        if found is None:
            return
        start = found.start()
        try:
            value, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):  # JSONDecodeError, too many digits, absurd nesting
            failures += 1
            position = start + 1
            continue
        yield value
        position = end


def _has_box(value: Any) -> bool:
    return isinstance(value, dict) and any(key in value for key in BOX_KEYS)


def _json_items(value: Any) -> list[Any]:
    """Entity candidates in one decoded JSON value: a list of objects, a wrapper object, or a single object."""
    if isinstance(value, list):
        return [item for item in value if isinstance(item, dict)]
    if isinstance(value, dict):
        for key in ENTITY_LIST_KEYS:
            if isinstance(value.get(key), list):
                return [item for item in value[key] if isinstance(item, dict)]
        if _has_box(value):
            return [value]
    return []


def _json_label(item: dict) -> str:
    for key in LABEL_KEYS:
        value = item.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _json_box(item: dict, sx: float, sy: float) -> Box | None:
    """The item's ``bbox_2d`` (``[x1, y1, x2, y2]`` or ``[[x1, y1], [x2, y2]]``) scaled by ``(sx, sy)``."""
    raw = next((item[key] for key in BOX_KEYS if key in item), None)
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(p, list) and len(p) == 2 for p in raw):
        raw = [*raw[0], *raw[1]]
    if not isinstance(raw, list) or len(raw) != 4:
        return None
    numbers = [_finite(v) for v in raw]
    if any(v is None for v in numbers):
        return None
    x0, y0, x1, y1 = (v for v in numbers if v is not None)
    return _ordered_box(x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def parse_qwen25_json(text: str, width: int, height: int,
                      model_size: tuple[int, int] | None = None) -> list[GroundedEntity]:
    """Entities from Qwen2.5-VL JSON: objects with ``"bbox_2d": [x1, y1, x2, y2]`` in absolute pixels.

    The local prompt is ``"label"`` (else ``"prompt"``, else ``"description"``). The JSON may be a list, a
    ``{"caption": ..., "entities": [...]}`` object or single objects, inside ```` ```json ```` fences or prose;
    all such values in the answer are read in order. ``model_size`` ``(width, height)`` is the size of the image
    the model saw, when it differs from ``width x height`` (boxes are then rescaled). Corners are sorted; boxes
    with missing or non-finite numbers are dropped; boxes are not clipped here (see :func:`validate_entities`).
    Raises :class:`ParseError` if the answer holds no JSON object with a box.
    """
    text = _check_text(text)
    width_f, height_f = _check_size(width, height)
    seen_w, seen_h = _check_size(*model_size) if model_size is not None else (width_f, height_f)
    sx, sy = width_f / seen_w, height_f / seen_h
    items = [item for value in _json_values(text) for item in _json_items(value) if _has_box(item)]
    if not items:
        raise ParseError('JSON objects with "bbox_2d": [x1, y1, x2, y2] and a "label" (a list, or an object '
                         'with "entities")', text)
    entities = []
    for item in items:
        box = _json_box(item, sx, sy)
        if box is not None:
            entities.append(GroundedEntity(_json_label(item), box))
    return entities


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------

_CAPTION_LINE = re.compile(r"^[ \t*_#>-]*caption[ \t*_]*[:：](?P<rest>.*)$", re.IGNORECASE | re.MULTILINE)
_CAPTION_FIELD = re.compile(r'"caption"\s*:\s*("(?:[^"\\\n]|\\.)*")')
_CAPTION_JUNK = " \t\r\n\"'`*_"


def _json_caption(text: str) -> str | None:
    for value in _json_values(text):
        if not isinstance(value, dict):
            continue
        keys = CAPTION_KEYS if not _has_box(value) else CAPTION_KEYS[:2]
        for key in keys:
            caption = value.get(key)
            if isinstance(caption, str) and caption.strip():
                return caption.strip()
    match = _CAPTION_FIELD.search(text)  # a truncated JSON object still has its caption
    if match:
        try:
            caption = json.loads(match.group(1))
        except ValueError:
            return None
        if isinstance(caption, str) and caption.strip():
            return caption.strip()
    return None


def _line_caption(text: str) -> str | None:
    """The text after ``Caption:`` (markdown emphasis allowed), or the next non-empty line if that is empty."""
    match = _CAPTION_LINE.search(text)
    if match is None:
        return None
    caption = match.group("rest").strip(_CAPTION_JUNK)
    if not caption:
        following = text[match.end():].lstrip("\r\n").split("\n", 1)[0]
        if not following.lstrip().startswith(("{", "[", "<|", "```")):
            caption = following.strip(_CAPTION_JUNK)
    caption = _SPECIAL_TOKEN.sub("", caption).strip()
    return caption or None


def extract_caption(text: str) -> str | None:
    """The caption of an answer: a JSON ``"caption"`` field, else a line starting with ``Caption:``; else None."""
    text = _check_text(text)
    return _json_caption(text) or _line_caption(text)


# ----------------------------------------------------------------------------------------------------------
# Validation and whole answers
# ----------------------------------------------------------------------------------------------------------


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 when both are empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _clipped(box: Any, width: float, height: float) -> Box | None:
    """``box`` clipped to the image, or None if it is not four finite numbers."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError, OverflowError):
        return None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None
    x0, y0, x1, y1 = values
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
            min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def validate_entities(entities: Sequence[GroundedEntity], width: int, height: int, max_entities: int | None = None,
                      min_size: float = 2.0) -> list[GroundedEntity]:
    """Usable entities, in order: boxes clipped to the image, prompts stripped.

    Dropped: empty or whitespace prompts, boxes that are not four finite numbers, boxes smaller than ``min_size``
    pixels on a side after clipping (or empty), and duplicates (the same prompt, case-insensitively, with IoU > 0.9
    to an entity kept earlier). At most ``max_entities`` are kept (None: no cap).
    """
    width_f, height_f = _check_size(width, height)
    if max_entities is not None and max_entities < 0:
        raise ValueError(f"max_entities must be >= 0 or None, got {max_entities}")
    kept: list[GroundedEntity] = []
    boxes_of: dict[str, list[Box]] = {}  # the kept boxes of each prompt: duplicates are looked up, not scanned
    for entity in entities:
        if max_entities is not None and len(kept) >= max_entities:
            break
        prompt = entity.prompt.strip() if isinstance(entity.prompt, str) else ""
        box = _clipped(entity.box, width_f, height_f)
        if not prompt or box is None:
            continue
        side = min(box[2] - box[0], box[3] - box[1])
        if side <= 0 or side < min_size:
            continue
        same = boxes_of.setdefault(prompt.casefold(), [])
        if any(box_iou(other, box) > 0.9 for other in same):
            continue
        same.append(box)
        kept.append(GroundedEntity(prompt, box))
    return kept


def _raw_entities(text: str, width: int, height: int, convention: str,
                  model_size: tuple[int, int] | None) -> tuple[list[GroundedEntity], list[str]]:
    """Parsed (unvalidated) entities in ``convention``; ``auto`` tries JSON, then Qwen2 tags. Also the errors."""
    parsers = {"qwen25": [lambda: parse_qwen25_json(text, width, height, model_size)],
               "qwen2": [lambda: parse_qwen2_boxes(text, width, height)]}
    parsers["auto"] = parsers["qwen25"] + parsers["qwen2"]
    errors: list[str] = []
    entities: list[GroundedEntity] = []
    for parse in parsers[convention]:
        try:
            entities = parse()
        except ParseError as exc:
            errors.append(exc.expected)
            continue
        if validate_entities(entities, width, height, max_entities=1):  # one usable entity is enough to choose
            return entities, errors
    return entities, errors


def parse_annotation(text: str, width: int, height: int, convention: str = "auto", *,
                     max_entities: int | None = None, model_size: tuple[int, int] | None = None) -> Annotation:
    """A caption and validated entities from an answer to :data:`ANNOTATE_INSTRUCTIONS` (or its Qwen2 form).

    ``convention`` is ``"qwen25"`` (JSON, absolute pixels), ``"qwen2"`` (grounding tags, 0-1000 grid) or ``"auto"``
    (JSON first, then Qwen2 tags). The caption is a JSON ``"caption"`` field or a ``Caption:`` line. Entities go
    through :func:`validate_entities` (``max_entities`` caps them); ``model_size`` is passed to
    :func:`parse_qwen25_json`. Raises :class:`ParseError` if there is no caption or no valid entity remains.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown grounding convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
    text = _check_text(text)
    _check_size(width, height)
    raw, errors = _raw_entities(text, width, height, convention, model_size)
    entities = validate_entities(raw, width, height, max_entities=max_entities)
    if not entities:
        if raw or not errors:
            expected = (f"at least one entity with a non-empty prompt and a box of at least 2 pixels inside the "
                        f"{width}x{height} image")
        else:
            expected = " or ".join(errors)
        raise ParseError(expected, text)
    caption = extract_caption(text)
    if caption is None:
        raise ParseError('a caption: a JSON "caption" field or a line starting with "Caption:"', text)
    return Annotation(caption, entities)


def parse_plan(text: str, width: int, height: int, *, max_entities: int | None = None) -> Annotation:
    """A global prompt and validated entities from an answer to :data:`PLAN_INSTRUCTIONS`.

    The answer is JSON ``{"caption": ..., "entities": [{"label": ..., "bbox_2d": [x1, y1, x2, y2]}]}`` in pixels
    of the requested ``width x height`` (``"prompt"`` is accepted for the global prompt too). Raises
    :class:`ParseError` if there is no global prompt or no valid entity remains.
    """
    return parse_annotation(text, width, height, convention="qwen25", max_entities=max_entities)

"""Errors as a person reads them in the page: the page's own words for each field ("Steps", "Global prompt"),
entities counted from 1 as the page shows them, the token grid in tokens (as the preview draws it), never a flag,
a server path or a traceback. Each problem is ``{"message", "entity", "field", "todo"}``: ``entity`` is the
0-based index the page uses to find the entity, ``todo`` marks what a fresh page has simply not filled in yet (an
empty prompt, nothing drawn), which the page shows as a step to do rather than as an error."""

from __future__ import annotations

import re
from typing import Any

from ..entities import LayoutError

LABELS = {
    "prompt": "prompt", "negative_prompt": "Negative prompt", "width": "Width", "height": "Height", "seed": "Seed",
    "entities": "Entities", "mask": "mask", "box": "mask", "polygon": "mask", "mask/box/polygon": "mask",
    "image": "reference image", "image_scale": "reference image scale", "ip_adapter_image": "Reference image",
    "steps": "Steps", "true_cfg": "True CFG", "cfg_mode": "CFG mode", "guidance": "Guidance",
    "max_sequence_length": "Max sequence length", "entities_on_negative": "Entities on negative",
    "entity_tokens": "Entity tokens", "attention": "Attention", "compile": "Compile", "fusion": "Fusion",
    "strength": "Strength", "paste_back": "Paste back", "mask_dilate": "Mask dilate", "mask_blur": "Mask blur",
    "lora_scale": "LoRA scale", "lora": "LoRA", "control_image": "control image", "control_scale": "control scale",
    "background": "Image to inpaint", "mode": "Mode", "text": "Description",
}
FLAG = re.compile(r"--([a-z][a-z0-9-]*)")
LATENT = re.compile(r"covers no token at the (\d+)x(\d+) latent grid of a \d+x\d+ image \(one token = (\d+)x\d+ "
                    r"pixels\); make it larger")
OPTION = re.compile(r"^option '([a-z_]+)' ")
EMPTY_PROMPT = ("prompt is missing or empty", "must be a non-empty string")


def label(field: str | None, entity: int | None = None) -> str:
    """The page's name for ``field`` (of entity ``entity`` when given)."""
    if field is None:
        return ""
    name = LABELS.get(field, field.replace("_", " "))
    if entity is None and field == "prompt":
        return "Global prompt"
    return name[:1].upper() + name[1:] if entity is None else name  # the whole picture's controls: capitalised


def _plain(reason: str) -> str:
    """A library message in the page's words: flags become the controls' names, the latent grid the token grid."""
    reason = FLAG.sub(lambda m: label(m.group(1).replace("-", "_")), reason)
    reason = LATENT.sub(lambda m: f"covers none of the {int(m.group(1)) // 2}×{int(m.group(2)) // 2} tokens (one "
                        f"token = {m.group(3)}×{m.group(3)} pixels); draw a larger area", reason)
    reason = OPTION.sub("", reason)
    return reason.replace(">=", "at least").replace("<=", "at most")


def page_problem(error: Exception, field: str | None = None, entity: int | None = None) -> dict[str, Any]:
    """``error`` as the page shows it. ``field``/``entity`` name the place when the error itself does not."""
    if isinstance(error, LayoutError):
        reason, entity, field = error.reason, error.entity, error.field
    else:
        reason = str(error)
        named = OPTION.match(reason) or FLAG.search(reason)
        if field is None and named:
            field = named.group(1).replace("-", "_")
    text = _plain(reason)
    where = label(field, entity)
    if entity is not None:
        where = f"Entity {entity + 1}" + (f", {where}" if where else "")
    todo = (field == "prompt" and any(s in reason for s in EMPTY_PROMPT)) or "covers no token" in reason
    message = f"{where}: {text}" if where else text[:1].upper() + text[1:]
    return {"message": message, "entity": entity, "field": field, "todo": bool(todo)}


def refusal(message: str, field: str | None = None) -> dict[str, Any]:
    """A problem stated in the page's words already."""
    return {"message": message, "entity": None, "field": field, "todo": False}

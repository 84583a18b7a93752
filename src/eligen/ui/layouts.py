"""The page's layouts and the library's: every layout the page sends is checked by the CLI's own code. Masks
arrive only as PNG data URIs drawn in the page and reference images only as image data URIs, never as paths:
nothing a client sends names a server file, and every image's size is read from its header and held to the app's
pixel cap before anything decodes it."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from ..choices import SCALE_LIMIT
from ..entities import (
    DATA_URI_PREFIX,
    LAYOUT_KEYS,
    Layout,
    LayoutError,
    entity_from_dict,
    layout_from_dict,
    mask_to_png_data_uri,
)
from ..entities import resize_nearest as resize_mask
from ..generate import METADATA_KEY, checked_record
from ..options import EDIT_FIELDS, INPAINT_FIELDS, EditOptions, EntityOptions, InpaintOptions, SamplingOptions
from .messages import page_problem

PAGE_ENTITY_KEYS = frozenset({"prompt", "mask", "box", "polygon", "image", "image_scale", "lora", "lora_scale",
                              "control_image", "control_scale"})
IMAGE_FIELDS = {"image": "reference image", "ip_adapter_image": "reference image",
                "control_image": "control image"}  # the images a page sends inside its layout, as data URIs
REFERENCE_FORMATS = ("png", "jpeg", "webp")
NOT_A_PATH = ("the web app takes {what}s as files chosen in the page, never as paths on the server; "
              "choose the image in the page")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What a page may set for one generation (the option classes it renders its controls from, a seed and the LoRA
# scales); the model, LoRA files, device and outputs belong to the server. Edit mode's own options are shown only
# on an edit model (:data:`EDIT_OPTIONS`).
PAGE_OPTIONS = (SamplingOptions, EntityOptions, InpaintOptions)
EDIT_OPTIONS = (*PAGE_OPTIONS, EditOptions)
PAGE_PARAMS = frozenset({"seed", "lora_scale", "control_scale",
                         *(f.name for cls in EDIT_OPTIONS for f in dataclasses.fields(cls))})
INPAINT_PARAMS = frozenset(INPAINT_FIELDS)
EDIT_PARAMS = frozenset(EDIT_FIELDS)
MODE_PARAMS = {"generate": PAGE_PARAMS - INPAINT_PARAMS - EDIT_PARAMS, "inpaint": PAGE_PARAMS - EDIT_PARAMS,
               "edit": PAGE_PARAMS}  # what each mode's job reads (an edit is an inpainting with its own options)


def problem(error: Exception) -> dict[str, Any]:
    """An error as the page shows it (:func:`eligen.ui.messages.page_problem`)."""
    return page_problem(error)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for: pixels of any image (a layout's size, a mask, an upload, a reference image)
    and entities per layout."""

    max_pixels: int
    max_entities: int = 16
    loras: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the entity LoRAs offered: name -> path


def _header_size(data_uri: str, prefix: str, what: str, index: int | None, field: str) -> tuple[int, int]:
    """The declared ``(width, height)`` of an image data URI, read from its header (nothing decoded yet)."""
    try:
        raw = base64.b64decode(data_uri[len(prefix):], validate=True)
        formats = ["PNG"] if prefix == DATA_URI_PREFIX else [f.upper() for f in REFERENCE_FORMATS]
        with Image.open(io.BytesIO(raw), formats=formats) as image:  # no other decoder is ever reached
            return image.size
    except (binascii.Error, OSError, ValueError):
        raise LayoutError(f"the {what} could not be read as an image", entity=index, field=field) from None


def check_reference_image(value: Any, limits: Limits, index: int | None, field: str) -> None:
    """A reference (or control) image as the page sends it: a ``data:image/<png|jpeg|webp>;base64,`` URI within
    the pixel cap. Anything else is refused without being opened, with one message that never repeats what was
    sent."""
    what = IMAGE_FIELDS.get(field, "reference image")
    prefix = next((f"data:image/{fmt};base64," for fmt in REFERENCE_FORMATS
                   if isinstance(value, str) and value.startswith(f"data:image/{fmt};base64,")), None)
    if prefix is None and isinstance(value, str) and value.startswith("data:"):
        raise LayoutError(f"the {what} is not a PNG, JPEG or WebP file; choose one of those",
                          entity=index, field=field)
    if prefix is None:
        raise LayoutError(NOT_A_PATH.format(what=what), entity=index, field=field)
    width, height = _header_size(value, prefix, what, index, field)
    if width * height > limits.max_pixels:
        raise LayoutError(f"the {what} is {width}x{height}, above this app's {limits.max_pixels} pixels; "
                          "choose a smaller one", entity=index, field=field)


def _check_page_entity(entity: Any, i: int, limits: Limits, pixels: int) -> None:
    """One entity of the page's layout: known keys, a mask that is a PNG data URI, a reference image that is an
    image data URI, neither above the pixel cap (``pixels``: the layout's own size)."""
    if not isinstance(entity, Mapping):
        raise LayoutError(f"each entity is a JSON object, got {type(entity).__name__}", entity=i)
    unknown = sorted(set(entity) - PAGE_ENTITY_KEYS)
    if unknown:
        raise LayoutError(f"unknown key(s) {unknown}; an entity has 'prompt' and one of 'mask', 'box', "
                          "'polygon'", entity=i, field=unknown[0])
    for field in ("image", "control_image"):
        if entity.get(field) is not None:
            check_reference_image(entity[field], limits, i, field)
    if entity.get("lora") is not None or entity.get("lora_scale") is not None:
        check_entity_lora(entity.get("lora"), entity.get("lora_scale", 1.0), limits, i)
    mask = entity.get("mask")
    if mask is None:
        return
    if not isinstance(mask, str) or not mask.startswith(DATA_URI_PREFIX):
        raise LayoutError("the web app takes masks drawn in the page (PNG data URIs), never file paths; load "
                          "a layout whose masks are embedded, as `eligen generate` records them",
                          entity=i, field="mask")
    mask_w, mask_h = _header_size(mask, DATA_URI_PREFIX, "mask", i, "mask")
    if mask_w * mask_h > max(limits.max_pixels, pixels):
        raise LayoutError(f"the mask is {mask_w}x{mask_h}, larger than the app takes", entity=i, field="mask")


def check_page_layout(data: Any, limits: Limits) -> dict[str, Any]:
    """The page's layout JSON with everything that could reach the file system or exhaust memory refused:
    known keys only, masks as PNG data URIs no larger than the image, reference images as image data URIs,
    ``width x height <= max_pixels``, at most ``max_entities`` entities."""
    max_pixels = limits.max_pixels
    if not isinstance(data, Mapping):
        raise LayoutError(f"a layout is a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - LAYOUT_KEYS)
    if unknown:
        raise LayoutError(f"unknown key(s) {unknown}; allowed: {sorted(LAYOUT_KEYS)}", field=unknown[0])
    width, height = data.get("width"), data.get("height")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LayoutError(f"must be a positive integer number of pixels, got {value!r}", field=name)
    assert isinstance(width, int) and isinstance(height, int)  # checked just above
    if width * height > max_pixels:
        raise LayoutError(f"{width}x{height} is {width * height} pixels, above this app's limit of {max_pixels}; "
                          "choose a smaller size", field="width")
    entities = data.get("entities", [])
    if not isinstance(entities, list):
        raise LayoutError("must be a list of entity objects", field="entities")
    if len(entities) > limits.max_entities:
        raise LayoutError(f"{len(entities)} entities; this app takes up to {limits.max_entities}",
                          field="entities")
    for field in ("ip_adapter_image", "control_image"):
        if data.get(field) is not None:
            check_reference_image(data[field], limits, None, field)
    for i, entity in enumerate(entities):
        _check_page_entity(entity, i, limits, width * height)
    return {**data, "entities": [_with_lora_path(entity, limits) for entity in entities]}


def check_entity_lora(name: Any, scale: Any, limits: Limits, index: int) -> None:
    """An entity's LoRA as the page names it: one of the operator's (``--entity-lora NAME=PATH``) by name, never a
    path, at a scale in ``0..SCALE_LIMIT``."""
    if name is not None and (not isinstance(name, str) or name not in limits.loras):
        offered = ", ".join(limits.loras) or "none: whoever starts the app offers LoRAs by name at start"
        raise LayoutError(f"not a LoRA this app offers (it offers {offered}); choose one in the page", entity=index,
                          field="lora")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= SCALE_LIMIT:
        raise LayoutError(f"must be a number in 0..{SCALE_LIMIT} (0 switches the LoRA off), got {scale!r}",
                          entity=index, field="lora_scale")


def _with_lora_path(entity: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """A checked entity with its LoRA's name replaced by the operator's path for it."""
    out = dict(entity)
    if out.get("lora") is not None:
        out["lora"] = limits.loras[out["lora"]]
    return out


def lora_names(data: Any, limits: Limits) -> Any:
    """A stored layout (a PNG's record, a layout file) with each entity LoRA this app offers named as the page names
    it: a path (or its portable name, as records store it) becomes the operator's name for it; anything else is
    left for :func:`check_page_layout` to refuse by entity and field."""
    from ..models import portable_name

    if not isinstance(data, Mapping) or not isinstance(data.get("entities"), list):
        return data
    names = {}
    for name, path in limits.loras.items():
        names.update({path: name, portable_name(path): name})
    entities = [{**e, "lora": names.get(e["lora"], e["lora"])} if isinstance(e, Mapping) and
                isinstance(e.get("lora"), str) and e["lora"] not in limits.loras else e for e in data["entities"]]
    return {**data, "entities": entities}


def page_layout(data: Any, limits: Limits, default_size: tuple[int, int] | None = None) -> Layout:
    """The page's layout JSON as a validated :class:`Layout` (the CLI's validation, after the page's own checks)."""
    if default_size is not None and isinstance(data, Mapping):
        data = {"width": default_size[0], "height": default_size[1], **data}
    return layout_from_dict(check_page_layout(data, limits))


def layout_problems(data: Any, limits: Limits, latent_masks) -> list[dict[str, Any]]:
    """Every problem the page's layout would meet, each naming its entity and field: the layout's own checks
    (per entity, so all are listed) and, per entity, a mask that covers no token of the model's grid.
    ``latent_masks(masks, height, width)`` is the pipeline's own (``pipe.entity_latent_masks``)."""
    try:
        checked = check_page_layout(data, limits)
    except LayoutError as exc:
        return [problem(exc)]  # the shape of the request itself: nothing further can be checked
    width, height, problems = checked["width"], checked["height"], []
    try:
        prompt: Any = checked.get("prompt")  # any JSON value: validate() names a missing or non-string prompt
        Layout(prompt, width, height, negative_prompt=checked.get("negative_prompt"),
               seed=checked.get("seed")).validate()
    except LayoutError as exc:
        problems.append(problem(exc))
    for i, raw in enumerate(checked.get("entities", [])):
        try:
            entity = entity_from_dict(raw, i, None)
            entity.validate(i, width, height)
            latent_masks([entity.rasterize(width, height, i)], height, width)
        except LayoutError as exc:
            problems.append(problem(LayoutError(exc.reason, entity=i, field=exc.field)))
    return problems


def token_grid(masks: list[np.ndarray | None], height: int, width: int, vae_scale_factor: int) -> dict[str, Any]:
    """What the model sees of each mask: its cover of the ``rows x cols`` token grid (row-major 0/1, all 0 for a
    mask that could not be read), by the pipelines' own rule (docs/design.md section 2)."""
    from ..masks import PACK, latent_grid_size, mask_tokens

    lat_h, lat_w = latent_grid_size(height, width, vae_scale_factor)
    rows, cols = lat_h // PACK, lat_w // PACK
    covers = [[0] * (rows * cols) if m is None else mask_tokens(m, height, width, vae_scale_factor).int().tolist()
              for m in masks]
    return {"rows": rows, "cols": cols, "token_pixels": vae_scale_factor * PACK, "covers": covers}


def preview(data: Any, limits: Limits, pipe) -> dict[str, Any]:
    """The page's live preview: every problem (:func:`layout_problems`) and each mask on ``pipe``'s token grid
    (``grid`` is None when the layout's size itself is wrong)."""
    problems = layout_problems(data, limits, pipe.entity_latent_masks)
    try:
        checked = check_page_layout(data, limits)
    except LayoutError:
        return {"errors": problems, "grid": None}
    masks: list[np.ndarray | None]
    width, height, masks = checked["width"], checked["height"], []
    for i, raw in enumerate(checked.get("entities", [])):
        try:
            masks.append(entity_from_dict(raw, i, None).rasterize(width, height, i))
        except LayoutError:
            masks.append(None)
    return {"errors": problems, "grid": token_grid(masks, height, width, pipe.vae_scale_factor)}


def layout_for_page(layout: Layout, loras: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A layout as the page edits it: every entity a mask at the layout's size, as a PNG data URI, and its LoRA by
    the name the app offers it under (``loras``: name -> path)."""
    names = {path: name for name, path in (loras or {}).items()}
    out: dict[str, Any] = {"prompt": layout.prompt, "width": layout.width, "height": layout.height,
                           "negative_prompt": layout.negative_prompt, "seed": layout.seed, "entities": []}
    if layout.ip_adapter_image is not None:
        out["ip_adapter_image"] = layout.ip_adapter_image  # a data URI: check_page_layout allowed nothing else
    if layout.control_image is not None:
        out["control_image"] = layout.control_image  # a data URI likewise
    for entity, mask in zip(layout.entities, layout.masks(), strict=True):
        if mask.shape != (layout.height, layout.width):
            mask = resize_mask(mask, layout.height, layout.width)
        item: dict[str, Any] = {"prompt": entity.prompt, "mask": mask_to_png_data_uri(np.asarray(mask, bool))}
        if entity.image is not None:
            item.update(image=entity.image, image_scale=entity.image_scale)
        if entity.control_image is not None:
            item.update(control_image=entity.control_image, control_scale=entity.control_scale)
        if entity.lora is not None:
            item.update(lora=names.get(str(entity.lora), str(entity.lora)), lora_scale=entity.lora_scale)
        out["entities"].append(item)
    return out


def read_upload_record(raw: bytes, limits: Limits) -> dict[str, Any]:
    """A layout JSON file or an eligen PNG, uploaded to continue editing: ``{"layout", "params", "command"}``."""
    if raw.startswith(PNG_SIGNATURE):
        try:
            with Image.open(io.BytesIO(raw)) as image:
                if image.width * image.height > limits.max_pixels:
                    raise ValueError(f"the PNG is {image.width}x{image.height}, above this app's limit of "
                                     f"{limits.max_pixels} pixels")
                text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
        except OSError as exc:
            raise ValueError(f"the PNG cannot be read ({exc})") from None
        if text is None:
            raise ValueError("this PNG carries no eligen record (was it made by eligen?); load a PNG downloaded "
                             "from this app or written by `eligen generate`")
        try:
            record = checked_record(json.loads(text), "the PNG")
        except json.JSONDecodeError as exc:
            raise ValueError(f"the PNG's eligen record is not JSON ({exc})") from None
        params = {k: v for k, v in record["params"].items() if k in PAGE_PARAMS}
        layout = page_layout(lora_names(record["layout"], limits), limits)
        return {"layout": layout_for_page(layout, limits.loras), "params": params,
                "command": record.get("command", "generate")}
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a layout JSON file or an eligen PNG ({exc})") from None
    return {"layout": layout_for_page(page_layout(lora_names(data, limits), limits), limits.loras), "params": {},
            "command": "generate"}

"""Entities and layouts: the user-facing data model, mask normalisation and layout JSON I/O.

An entity is a local prompt plus exactly one spatial field:

- ``mask``: a PNG path, PIL image, numpy array or torch tensor at any resolution;
- ``box``: pixel coordinates ``(x0, y0, x1, y1)`` of the output image;
- ``polygon``: pixel vertices ``[(x, y), ...]`` of the output image.

Masks are binarised with the reference rule (docs/design.md section 2): a pixel is on when the mean of its
channels mapped to [-1, 1] is positive, i.e. an 8-bit value >= 128. Everything here is plain numpy and
PIL; the tensor maths lives in :mod:`eligen.masks`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, Union

import numpy as np
from PIL import Image

from .choices import SCALE_LIMIT
from .files import open_data_uri, open_image, read_utf8, write_text_atomic

if TYPE_CHECKING:
    import torch

def _is_tensor(value: Any) -> TypeGuard[torch.Tensor]:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


DECODED_KEPT = 32  # decoded mask and reference-image files kept, so each is decoded once however often it is read
_decoded: OrderedDict[tuple, Any] = OrderedDict()


def _decoded_once(kind: str, source: str, decode: Callable[[], Any]) -> Any:
    """``decode()`` of a file path or data URI, remembered while the file is unchanged (same path, size and
    modification time): a mask read by validation, rasterisation, the overlay and the record is decoded once."""
    if source.startswith("data:"):
        key: tuple = (kind, source)
    else:
        try:
            stat = os.stat(source)
        except OSError:
            return decode()  # the error comes from decode, naming the file
        key = (kind, os.path.abspath(source), stat.st_mtime_ns, stat.st_size)
    if key in _decoded:
        _decoded.move_to_end(key)
        return _decoded[key]
    value = decode()
    _decoded[key] = value
    while len(_decoded) > DECODED_KEPT:
        _decoded.popitem(last=False)
    return value


MaskLike = Union[str, Path, Image.Image, np.ndarray, "torch.Tensor"]
DATA_URI_PREFIX = "data:image/png;base64,"

LAYOUT_KEYS = frozenset({"prompt", "negative_prompt", "width", "height", "seed", "entities", "ip_adapter_image",
                         "control_image"})
ENTITY_KEYS = frozenset({"prompt", "mask", "box", "polygon", "image", "image_scale", "control_image",
                         "control_scale", "lora", "lora_scale"})
IMAGE_DATA_URI = "data:image/"  # a reference image inline: data:image/<png|jpeg|webp>;base64,...
SPATIAL_FIELDS = ("mask", "box", "polygon")


class LayoutError(ValueError):
    """Invalid layout or entity. ``entity`` is the entity index (None for the layout), ``field`` the key."""

    def __init__(self, message: str, *, entity: int | None = None, field: str | None = None):
        where = []
        if entity is not None:
            where.append(f"entity {entity}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.reason = message
        self.entity = entity
        self.field = field


@dataclass
class Entity:
    """A local prompt and where it goes: exactly one of ``mask``, ``box`` or ``polygon``.

    ``image`` (optional): a reference image for this entity alone (a path, data URI, PIL image, numpy array or
    tensor); with an IP-Adapter loaded its image-prompt branch reaches only the image tokens the entity covers, at
    ``image_scale`` (docs/design.md section 14).

    ``control_image`` (optional): a ControlNet condition (a pose, depth or edge map; the same kinds of value as
    ``image``) for this entity alone; with a ControlNet pipeline its residuals reach only the image tokens the entity
    covers, at ``control_scale`` (docs/design.md section 23).

    ``lora`` (optional): a LoRA for this entity alone (a file, folder or hub id, or the name of an adapter loaded
    into the pipeline); its update reaches only the entity's text and the image tokens it covers, at ``lora_scale``
    (docs/design.md section 22).
    """

    prompt: str
    mask: Any = None
    box: Sequence[float] | None = None
    polygon: Sequence[Sequence[float]] | None = None
    image: Any = None
    image_scale: float = 1.0
    control_image: Any = None
    control_scale: float = 1.0
    lora: str | Path | None = None
    lora_scale: float = 1.0

    @property
    def spatial_field(self) -> str:
        """Name of the one spatial field that is set (call :meth:`validate` first)."""
        return next(name for name in SPATIAL_FIELDS if getattr(self, name) is not None)

    def validate(self, index: int, width: int, height: int) -> None:
        """Raise :class:`LayoutError` naming ``index`` and the field if this entity is malformed."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise LayoutError("the entity prompt is missing or empty; give each entity a non-empty local prompt",
                              entity=index, field="prompt")
        present = [name for name in SPATIAL_FIELDS if getattr(self, name) is not None]
        if len(present) != 1:
            found = ", ".join(present) if present else "none"
            raise LayoutError(f"an entity needs exactly one of mask, box or polygon (found: {found})",
                              entity=index, field="mask/box/polygon")
        if self.box is not None:
            _check_box(self.box, index, width, height)
        elif self.polygon is not None:
            _check_polygon(self.polygon, index, width, height)
        else:
            binarize_mask(self.mask, index=index)
        for name, what in (("image_scale", "image"), ("control_scale", "control")):
            scale = getattr(self, name)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= SCALE_LIMIT:
                raise LayoutError(f"must be a number in 0..{SCALE_LIMIT} (0 switches the {what} off), got {scale!r}",
                                  entity=index, field=name)
        if self.image is not None:
            load_reference_image(self.image, index)
        if self.control_image is not None:
            load_reference_image(self.control_image, index, "control_image")
        _check_lora(self.lora, self.lora_scale, index)

    def resolve(self, index: int, width: int, height: int) -> np.ndarray:
        """:meth:`validate` then :meth:`rasterize`: the entity's binary mask ``(H, W)``, its file decoded once."""
        self.validate(index, width, height)
        return self.rasterize(width, height, index)

    def rasterize(self, width: int, height: int, index: int = 0) -> np.ndarray:
        """The entity's binary mask, ``(H, W)`` bool.

        Boxes and polygons are drawn at the output size ``(height, width)``; a mask keeps its own resolution
        (the caller resizes it to the latent grid with NEAREST, as the reference does).
        """
        if self.box is not None:
            return box_to_mask(self.box, width, height)
        if self.polygon is not None:
            return polygon_to_mask(self.polygon, width, height)
        if self.mask is None:
            raise LayoutError("an entity needs exactly one of mask, box or polygon (found: none)",
                              entity=index, field="mask/box/polygon")
        return binarize_mask(self.mask, index=index)


def _check_lora(lora: Any, scale: Any, index: int) -> None:
    """An entity's ``lora`` is a non-empty path or name, its ``lora_scale`` a number within +-SCALE_LIMIT."""
    if lora is not None and (not isinstance(lora, (str, Path)) or not str(lora).strip()):
        raise LayoutError(f"a LoRA is a file, folder or hub id, or the name of a loaded adapter, got {lora!r}",
                          entity=index, field="lora")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or \
            abs(scale) > SCALE_LIMIT:
        raise LayoutError(f"must be a number in -{SCALE_LIMIT}..{SCALE_LIMIT} (0 switches the LoRA off), got "
                          f"{scale!r}", entity=index, field="lora_scale")


@dataclass
class Layout:
    """A global prompt, an output size and the entities: the contents of a layout JSON file."""

    prompt: str
    width: int
    height: int
    entities: list[Entity] = field(default_factory=list)
    negative_prompt: str | None = None
    seed: int | None = None
    ip_adapter_image: Any = None  # the global reference image (path, data URI or image), for an IP-Adapter
    control_image: Any = None  # the global ControlNet condition (path, data URI or image), for a ControlNet

    def validate(self) -> None:
        """Check the layout and every entity; raises :class:`LayoutError` naming the first problem."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise LayoutError("the global prompt is missing or empty", field="prompt")
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LayoutError(f"must be a positive integer number of pixels, got {value!r}", field=name)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise LayoutError(f"must be a string, got {type(self.negative_prompt).__name__}",
                              field="negative_prompt")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise LayoutError(f"must be an integer, got {self.seed!r}", field="seed")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise LayoutError(f"must be in 0 <= seed < 2**64, got {self.seed}", field="seed")
        for i, entity in enumerate(self.entities):
            entity.validate(i, self.width, self.height)
        if self.ip_adapter_image is not None:
            load_reference_image(self.ip_adapter_image, field="ip_adapter_image")
        if self.control_image is not None:
            load_reference_image(self.control_image, field="control_image")

    def resized(self, width: int, height: int) -> Layout:
        """The same layout at another output size: boxes and polygons scale with it, masks are size-free."""
        sx, sy = width / self.width, height / self.height

        def scale(entity: Entity) -> Entity:
            box = None if entity.box is None else [entity.box[0] * sx, entity.box[1] * sy,
                                                   entity.box[2] * sx, entity.box[3] * sy]
            polygon = None if entity.polygon is None else [[x * sx, y * sy] for x, y in entity.polygon]
            return dataclasses.replace(entity, box=box, polygon=polygon)

        return Layout(self.prompt, width, height, [scale(e) for e in self.entities], self.negative_prompt, self.seed,
                      self.ip_adapter_image, self.control_image)

    def masks(self) -> list[np.ndarray]:
        """Every entity rasterised: ``(H, W)`` bool each (boxes and polygons at the output size)."""
        return [e.rasterize(self.width, self.height, i) for i, e in enumerate(self.entities)]


# ----------------------------------------------------------------------------------------------------------
# Masks from arrays, images and tensors
# ----------------------------------------------------------------------------------------------------------


def _mask_error(message: str, index: int | None) -> LayoutError:
    return LayoutError(message, entity=index, field="mask")


def load_mask_image(path: str | Path, index: int | None = None) -> Image.Image:
    """Open a mask file fully (so unreadable files fail here, not later)."""
    text = str(path)
    if text.startswith("data:"):
        try:
            return open_data_uri(text, "mask")
        except ValueError as exc:
            raise _mask_error(str(exc), index) from None
    try:
        return open_image(path, "mask file")
    except FileNotFoundError as exc:
        raise _mask_error(f"mask file not found: {path}; paths in a layout file are relative to that file",
                          index) from exc
    except Exception as exc:
        raise _mask_error(f"mask file {path} could not be read as an image ({exc})", index) from exc


def load_reference_image(image: Any, index: int | None = None, field: str = "image") -> Any:
    """A reference image for an IP-Adapter: a path or ``data:image/...;base64`` URI is opened and decoded (RGB), a
    PIL image, numpy array ``(H, W, 3)`` or tensor ``(3, H, W)`` is returned as given. Raises :class:`LayoutError`
    naming ``field`` (and the entity) when it cannot be read."""
    if isinstance(image, (str, Path)):
        return _decoded_once("image", str(image), lambda: _read_reference_image(str(image), index, field))
    if isinstance(image, Image.Image) or _is_tensor(image):
        return image
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        return image
    raise LayoutError(f"a reference image is a path, data URI, PIL image, (H, W, 3) array or (3, H, W) tensor, got "
                      f"{type(image).__name__}", entity=index, field=field)


def _read_reference_image(text: str, index: int | None, field: str) -> Image.Image:
    """Decode a reference (or control) image file or ``data:image/...;base64`` URI (RGB)."""
    what = "control image" if field == "control_image" else "reference image"
    try:
        if text.startswith("data:"):
            return open_data_uri(text, what).convert("RGB")
        return open_image(text, what).convert("RGB")
    except FileNotFoundError as exc:
        raise LayoutError(f"{what} not found: {text}; paths in a layout file are relative to that file",
                          entity=index, field=field) from exc
    except Exception as exc:
        if text.startswith("data:"):
            raise LayoutError(str(exc), entity=index, field=field) from None
        shown = text
        raise LayoutError(f"{shown} could not be read as an image ({exc})", entity=index, field=field) from exc


def reference_pil(image: Any, index: int | None = None, field: str = "image") -> Image.Image:
    """A reference or control image (any form :func:`load_reference_image` takes) as a PIL image: a tensor
    ``(3, H, W)`` in [0, 1] or a ``(H, W, 3)`` array of 8-bit values becomes RGB pixels."""
    image = load_reference_image(image, index, field)
    if _is_tensor(image):
        image = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    return image


def image_to_data_uri(image: Any) -> str:
    """A reference image as a self-contained ``data:image/...;base64`` URI: a file keeps its own bytes (its
    format and size), an in-memory image becomes a PNG. :func:`load_reference_image` reads it back exactly."""
    if isinstance(image, str) and image.startswith(IMAGE_DATA_URI):
        return image
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
        with Image.open(io.BytesIO(data)) as opened:
            fmt = (opened.format or "png").lower()
        return f"{IMAGE_DATA_URI}{fmt};base64," + base64.b64encode(data).decode("ascii")
    buffer = io.BytesIO()
    reference_pil(image).save(buffer, format="PNG")
    return f"{IMAGE_DATA_URI}png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _binarize_integer(values: np.ndarray, index: int | None) -> np.ndarray:
    """8-bit rule ``v >= 128`` (a ``uint16`` array: ``v >= 32768``); a mask holding only 0 and 1 is read as binary;
    values above 255 in another integer type (an int64 0/1000 mask) are refused as ambiguous."""
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if lo < 0:
        raise _mask_error(f"integer masks must be non-negative, got a minimum of {lo}", index)
    if hi <= 1:
        return values.astype(bool)
    if values.dtype == np.uint8 or hi <= 255:
        return values >= 128
    if values.dtype == np.uint16:
        return values >= 32768
    raise _mask_error(f"{values.dtype} mask values up to {hi} are ambiguous (8-bit? 16-bit? a 0/{hi} mask?); "
                      "pass uint8 (0-255), uint16 (16-bit), bool or float in [0, 1]", index)


def _binarize_float(values: np.ndarray, index: int | None) -> np.ndarray:
    """Float masks lie in [0, 1]; a pixel is on when ``2v - 1 > 0``."""
    if not np.all(np.isfinite(values)):
        raise _mask_error("float mask contains NaN or infinity", index)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        raise _mask_error(f"float masks must lie in [0, 1], got values in [{lo:g}, {hi:g}]; divide 8-bit data "
                          "by 255 or pass a uint8 array", index)
    return values > 0.5


def _binarize_values(values: np.ndarray, index: int | None) -> np.ndarray:
    if values.dtype == bool:
        return values
    if np.issubdtype(values.dtype, np.integer):
        return _binarize_integer(values, index)
    if np.issubdtype(values.dtype, np.floating):
        return _binarize_float(values.astype(np.float64), index)
    raise _mask_error(f"unsupported mask dtype {values.dtype}; use bool, uint8, uint16 or float", index)


def _binarize_channels(array: np.ndarray, index: int | None) -> np.ndarray:
    """``(H, W, C)`` with C in 1..4: alpha when it varies, else the mean of the colour channels."""
    channels = array.shape[2]
    if channels in (2, 4):
        alpha = array[..., -1]
        if alpha.size and alpha.min() != alpha.max():
            return _binarize_values(alpha, index)
        array = array[..., :-1]
    if array.shape[2] == 1:
        return _binarize_values(array[..., 0], index)
    if array.dtype == bool:
        return array.mean(axis=2) > 0.5
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min(initial=0)), int(array.max(initial=0))
        if lo < 0 or hi > 65535:
            raise _mask_error("integer colour masks must lie in 0-255 (8-bit) or 0-65535 (16-bit)", index)
        if hi > 255 and array.dtype != np.uint16:
            raise _mask_error(f"{array.dtype} colour mask values up to {hi} are ambiguous; pass uint8 (0-255), "
                              "uint16 (16-bit), bool or float in [0, 1]", index)
        full = 1 if hi <= 1 else 255 if (array.dtype == np.uint8 or hi <= 255) else 65535
        # mean over channels of (v * 2 / full - 1) > 0  <=>  2 * sum(v) > full * C, in exact integers
        return 2 * array.astype(np.int64).sum(axis=2) > full * array.shape[2]
    return _binarize_float(array.astype(np.float64).mean(axis=2), index)


def _read_only(array: np.ndarray) -> np.ndarray:
    """A decoded mask shared by every reader of its file: nobody may change it in place."""
    array.setflags(write=False)
    return array


def _array_from_image(image: Image.Image) -> np.ndarray:
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "I;16", "F"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    array = np.asarray(image)
    if image.mode == "I;16" or (image.mode == "I" and array.size and 0 <= array.min() and array.max() <= 65535):
        array = array.astype(np.uint16)  # a 16-bit greyscale file, whichever mode PIL opened it in
    return array


def binarize_mask(mask: MaskLike, index: int | None = None) -> np.ndarray:
    """Normalise any accepted mask to ``(H, W)`` bool with the reference's >= 128 rule.

    Accepts a path (or a ``data:image/png;base64`` URI), a PIL image in any mode, a numpy array
    ``(H, W)`` / ``(H, W, C)`` or a tensor ``(H, W)`` / ``(C, H, W)`` / ``(1, C, H, W)`` with C in 1..4.
    """
    if isinstance(mask, (str, Path)):
        source = str(mask)
        binary = _decoded_once("mask", source, lambda: _read_only(binarize_mask(load_mask_image(source, index),
                                                                                   index)))
        return binary
    if isinstance(mask, Image.Image):
        array = _array_from_image(mask)
    elif _is_tensor(mask):  # this module never imports torch: a tensor exists only once torch is loaded
        torch = sys.modules["torch"]
        tensor = mask.detach().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim == 3:
            if tensor.shape[0] not in (1, 2, 3, 4):
                raise _mask_error(f"tensor masks are (H, W) or (C, H, W) with C <= 4, got {tuple(mask.shape)}",
                                  index)
            tensor = tensor.permute(1, 2, 0)
        if tensor.dtype == torch.bfloat16 or tensor.dtype == torch.float16:
            tensor = tensor.float()
        array = tensor.numpy()
    elif isinstance(mask, np.ndarray):
        array = mask
    else:
        raise _mask_error(f"unsupported mask type {type(mask).__name__}; pass a PNG path, PIL image, numpy array "
                          "or torch tensor", index)
    if array.ndim == 3 and array.shape[2] in (1, 2, 3, 4):
        binary = _binarize_channels(array, index)
    elif array.ndim == 2:
        binary = _binarize_values(array, index)
    else:
        raise _mask_error(f"mask arrays are (H, W) or (H, W, C) with C <= 4, got shape {array.shape}", index)
    if binary.shape[0] == 0 or binary.shape[1] == 0:
        raise _mask_error(f"mask has zero size {binary.shape}", index)
    return np.ascontiguousarray(binary)


# ----------------------------------------------------------------------------------------------------------
# Boxes and polygons
# ----------------------------------------------------------------------------------------------------------


def _numbers(values: Sequence[Any], count: int | None, index: int, name: str) -> list[float]:
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise LayoutError(f"expected numbers, got {values!r}", entity=index, field=name) from exc
    if count is not None and len(numbers) != count:
        raise LayoutError(f"expected {count} numbers (x0, y0, x1, y1), got {len(numbers)}", entity=index,
                          field=name)
    if not all(math.isfinite(v) for v in numbers):
        raise LayoutError(f"coordinates must be finite, got {values!r}", entity=index, field=name)
    return numbers


BOX_PROBLEMS = ("malformed", "degenerate", "outside")


def box_problem(box: Any, width: int | None = None, height: int | None = None) -> tuple[str, str] | None:
    """The one box rule, for layouts and training data alike: ``(kind, message)`` of what is wrong with ``box``
    (kind in :data:`BOX_PROBLEMS`), or None. A box is four finite numbers ``x0, y0, x1, y1`` (pixel corners; a
    boolean is not a number) with ``x1 > x0`` and ``y1 > y0``, and, when the image size is given, not entirely
    outside the image."""
    if isinstance(box, (str, bytes, dict)) or not isinstance(box, Sequence) or len(box) != 4:
        return "malformed", f"a box is [x0, y0, x1, y1] in pixels, got {box!r}"
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
        return "malformed", f"box coordinates must be numbers, got {box!r}"
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return "malformed", f"box coordinates must be finite, got {box!r}"
    if x1 <= x0 or y1 <= y0:
        return "degenerate", f"degenerate box {list(box)}: need x1 > x0 and y1 > y0 (pixel corners x0, y0, x1, y1)"
    if width is not None and height is not None and (x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height):
        return "outside", f"box {list(box)} lies entirely outside the {width}x{height} image"
    return None


def _check_box(box: Sequence[float], index: int, width: int, height: int) -> None:
    problem = box_problem(box, width, height)
    if problem is not None:
        raise LayoutError(problem[1], entity=index, field="box")


def _check_polygon(polygon: Sequence[Sequence[float]], index: int, width: int, height: int) -> None:
    if isinstance(polygon, (str, bytes)) or not isinstance(polygon, Sequence) or len(polygon) < 3:
        raise LayoutError(f"a polygon is a list of at least 3 [x, y] vertices, got {polygon!r}", entity=index,
                          field="polygon")
    points = []
    for vertex in polygon:
        if isinstance(vertex, (str, bytes)) or not isinstance(vertex, Sequence) or len(vertex) != 2:
            raise LayoutError(f"each polygon vertex is [x, y], got {vertex!r}", entity=index, field="polygon")
        points.append(_numbers(vertex, None, index, "polygon"))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= width or min(ys) >= height:
        raise LayoutError(f"polygon lies entirely outside the {width}x{height} image", entity=index,
                          field="polygon")


def box_to_mask(box: Sequence[float], width: int, height: int) -> np.ndarray:
    """Pixels whose centre lies in ``[x0, x1) x [y0, y1)``: ``(height, width)`` bool."""
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    cols = (xs >= x0) & (xs < x1)
    rows = (ys >= y0) & (ys < y1)
    return rows[:, None] & cols[None, :]


def polygon_to_mask(polygon: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (even-odd rule, half-open like boxes): ``(height, width)`` bool.

    An axis-aligned rectangle polygon rasterises exactly like the same ``box``.
    """
    points = np.asarray(polygon, dtype=np.float64)
    xs = np.arange(width, dtype=np.float64) + 0.5  # (W,)
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5  # (H, 1)
    inside = np.zeros((height, width), dtype=bool)
    for (xa, ya), (xb, yb) in zip(points, np.roll(points, -1, axis=0), strict=True):
        crosses = (ya > ys) != (yb > ys)  # (H, 1): the edge spans this row's centre line
        if not crosses.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (xs[None, :] < x_cross)
    return inside


def mask_to_png_data_uri(mask: np.ndarray) -> str:
    """Encode a bool mask as an inline PNG (0/255, mode L) that :func:`binarize_mask` reads back exactly."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG", optimize=True)
    return DATA_URI_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------------------
# Layout JSON
# ----------------------------------------------------------------------------------------------------------


def entity_from_dict(data: Any, index: int, base_dir: Path | None) -> Entity:
    """One entity of a layout file; mask paths resolve against ``base_dir`` and are read right away."""
    if not isinstance(data, dict):
        raise LayoutError(f"each entity is a JSON object, got {type(data).__name__}", entity=index)
    unknown = sorted(set(data) - ENTITY_KEYS)
    if unknown:
        raise LayoutError(f"unknown key(s) {unknown}; an entity has 'prompt' and one of 'mask', 'box', 'polygon'",
                          entity=index, field=unknown[0])
    mask = data.get("mask")
    if mask is not None:
        if not isinstance(mask, str) or not mask:
            raise LayoutError("a mask in a layout file is an image path (relative to the file) or an image data "
                              "URI", entity=index, field="mask")
        if not mask.startswith("data:"):
            path = Path(mask)
            mask = str(path if path.is_absolute() or base_dir is None else base_dir / path)
        binarize_mask(mask, index)  # unreadable files fail now, not mid-generation (and are decoded once)
    image = _layout_image(data.get("image"), base_dir, index, "image")
    control = _layout_image(data.get("control_image"), base_dir, index, "control_image")
    prompt: Any = data.get("prompt")  # any JSON value: Entity.validate names a missing or non-string prompt
    return Entity(prompt=prompt, mask=mask, box=data.get("box"), polygon=data.get("polygon"),
                  image=image, image_scale=data.get("image_scale", 1.0), control_image=control,
                  control_scale=data.get("control_scale", 1.0), lora=_layout_lora(data.get("lora"), base_dir),
                  lora_scale=data.get("lora_scale", 1.0))


def _layout_lora(value: Any, base_dir: Path | None) -> Any:
    """An entity's ``lora`` in a layout file: a path relative to the file when one exists there, else as written (an
    absolute path, a hub id, an adapter name); :meth:`Entity.validate` names a value of the wrong type."""
    if isinstance(value, str) and value and base_dir is not None and not Path(value).is_absolute() \
            and (base_dir / value).exists():
        return str(base_dir / value)
    return value


def _layout_image(value: Any, base_dir: Path | None, index: int | None, field: str) -> str | None:
    """A reference image field of a layout file: a path (relative to the file) or a data URI, read right away."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise LayoutError("a reference image in a layout file is a path (relative to the file) or a data URI",
                          entity=index, field=field)
    if not value.startswith("data:"):
        path = Path(value)
        value = str(path if path.is_absolute() or base_dir is None else base_dir / path)
    load_reference_image(value, index, field)
    return value


def layout_from_dict(
    data: Any, base_dir: str | Path | None = None, default_size: tuple[int, int] | None = None
) -> Layout:
    """Build and validate a :class:`Layout` from parsed JSON.

    ``default_size`` ``(width, height)`` fills a missing width/height (inpainting: the input image's size).
    """
    if not isinstance(data, dict):
        raise LayoutError(f"a layout is a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - LAYOUT_KEYS)
    if unknown:
        raise LayoutError(f"unknown key(s) {unknown}; allowed: {sorted(LAYOUT_KEYS)}", field=unknown[0])
    if default_size is not None:
        data = {"width": default_size[0], "height": default_size[1], **data}
    for required in ("prompt", "width", "height"):
        if required not in data:
            raise LayoutError("is required", field=required)
    entities = data.get("entities", [])
    if not isinstance(entities, list):
        raise LayoutError("must be a list of entity objects", field="entities")
    base = Path(base_dir) if base_dir is not None else None
    layout = Layout(
        prompt=data["prompt"],
        width=data["width"],
        height=data["height"],
        entities=[entity_from_dict(e, i, base) for i, e in enumerate(entities)],
        negative_prompt=data.get("negative_prompt"),
        seed=data.get("seed"),
        ip_adapter_image=_layout_image(data.get("ip_adapter_image"), base, None, "ip_adapter_image"),
        control_image=_layout_image(data.get("control_image"), base, None, "control_image"),
    )
    layout.validate()
    return layout


def load_layout(path: str | Path, default_size: tuple[int, int] | None = None) -> Layout:
    """Read a layout JSON file; mask paths inside are relative to the file."""
    path = Path(path)
    try:
        text = read_utf8(path, "layout file")
    except OSError as exc:
        raise LayoutError(f"cannot read layout file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{path} is not valid JSON: {exc}") from exc
    return layout_from_dict(data, base_dir=path.parent, default_size=default_size)


def entity_to_dict(entity: Entity, embed_masks: bool = True) -> dict[str, Any]:
    """JSON form of an entity. With ``embed_masks`` the mask becomes an inline PNG, so the dict is self-contained."""
    out: dict[str, Any] = {"prompt": entity.prompt}
    if entity.box is not None:
        out["box"] = [float(v) for v in entity.box]
    elif entity.polygon is not None:
        out["polygon"] = [[float(x), float(y)] for x, y in entity.polygon]
    elif embed_masks or not isinstance(entity.mask, (str, Path)):
        out["mask"] = mask_to_png_data_uri(binarize_mask(entity.mask))
    else:
        out["mask"] = str(entity.mask)
    if entity.image is not None:
        out["image"] = _image_field(entity.image, embed_masks)
    if entity.image_scale != 1.0:
        out["image_scale"] = float(entity.image_scale)
    if entity.control_image is not None:
        out["control_image"] = _image_field(entity.control_image, embed_masks)
    if entity.control_scale != 1.0:
        out["control_scale"] = float(entity.control_scale)
    if entity.lora is not None:
        out["lora"] = str(entity.lora)
    if entity.lora_scale != 1.0:
        out["lora_scale"] = float(entity.lora_scale)
    return out


def _image_field(image: Any, embed: bool) -> str:
    return str(image) if not embed and isinstance(image, (str, Path)) else image_to_data_uri(image)


def layout_to_dict(layout: Layout, embed_masks: bool = True) -> dict[str, Any]:
    """JSON form of a layout (inverse of :func:`layout_from_dict`)."""
    out: dict[str, Any] = {"prompt": layout.prompt, "width": layout.width, "height": layout.height}
    if layout.negative_prompt is not None:
        out["negative_prompt"] = layout.negative_prompt
    if layout.seed is not None:
        out["seed"] = layout.seed
    out["entities"] = [entity_to_dict(e, embed_masks) for e in layout.entities]
    if layout.ip_adapter_image is not None:
        out["ip_adapter_image"] = _image_field(layout.ip_adapter_image, embed_masks)
    if layout.control_image is not None:
        out["control_image"] = _image_field(layout.control_image, embed_masks)
    return out


def save_layout(layout: Layout, path: str | Path, embed_masks: bool = True) -> None:
    """Write the layout JSON atomically: an existing file stays whole until the new one is complete."""
    write_text_atomic(path, json.dumps(layout_to_dict(layout, embed_masks), indent=2) + "\n")


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool -> ``(height, width)`` bool with PIL's NEAREST sampling (the reference's resize)."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    return np.asarray(image.resize((width, height), resample=Image.Resampling.NEAREST)) >= 128

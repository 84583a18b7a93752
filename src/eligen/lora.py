"""EliGen LoRA files: read and write the three key formats in the wild (docs/design.md section 4).

The in-memory form is :class:`LoraWeights`: one :class:`LoraLayer` ``(down A [r, in], up B [out, r], alpha)``
per diffusers ``nn.Linear`` of the transformer, keyed by its module name (``transformer_blocks.3.attn.to_q``).
The effective update of a layer is ``W += (alpha / r) * B @ A``.

Two model families (:data:`FAMILIES`), told apart by their module names (:func:`lora_family`). FLUX:

- ``diffsynth``: ``blocks.{i}.attn.a_to_qkv.lora_A[.default].weight`` ... (fused q/k/v; no alpha = rank);
- ``kohya``: ``lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight`` ... with optional ``.alpha``;
- ``diffusers``: ``transformer.<module>.lora_A.weight`` (peft names, optional ``.alpha``).

Fused projections split on reading (lora_B rows in three for q/k/v, plus ``proj_mlp`` for the single blocks'
``to_qkv_mlp``; lora_A shared) and fuse on writing. Widths come from the tensors, never from constants.

Qwen-Image (``transformer_blocks`` only, nothing fused):

- ``diffsynth``: ``transformer_blocks.{i}.attn.to_q.lora_A.default.weight`` ... (peft names, no prefix,
  no alpha = rank), as in DiffSynth-Studio/Qwen-Image-EliGen;
- ``kohya``: ``lora_unet_transformer_blocks_{i}_attn_to_q.lora_down.weight`` ... with optional ``.alpha``;
- ``diffusers``: as for FLUX.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import option
from .families import FAMILY_NAMES as FAMILIES
from .families import FAMILY_TITLES, TRANSFORMER_FAMILIES
from .files import atomic_path

if TYPE_CHECKING:
    import torch

FORMATS = ("diffsynth", "kohya", "diffusers")
# Module-name parts that occur in one family only (attn.*, proj_out, norm_out.linear, ... occur in both).
FAMILY_MARKERS = {
    "flux": frozenset({"ff", "ff_context", "norm1", "norm1_context", "single_transformer_blocks", "proj_mlp",
                       "x_embedder", "context_embedder", "text_embedder", "guidance_embedder"}),
    "qwen_image": frozenset({"img_mlp", "txt_mlp", "img_mod", "txt_mod", "img_in", "txt_in"}),
}
HUB_DEFAULT_FILES = {"modelscope/EliGen": "model_bf16.safetensors",
                     "DiffSynth-Studio/Qwen-Image-EliGen": "model.safetensors",
                     "DiffSynth-Studio/Qwen-Image-EliGen-V2": "model.safetensors",
                     "DiffSynth-Studio/Qwen-Image-EliGen-Poster": "model.safetensors"}

# (block kind, reference name) -> diffusers module names inside the block, in fused row order.
DOUBLE = {
    "attn.a_to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.b_to_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn.a_to_out": ("attn.to_out.0",),
    "attn.b_to_out": ("attn.to_add_out",),
    "ff_a.0": ("ff.net.0.proj",),
    "ff_a.2": ("ff.net.2",),
    "ff_b.0": ("ff_context.net.0.proj",),
    "ff_b.2": ("ff_context.net.2",),
    "norm1_a.linear": ("norm1.linear",),
    "norm1_b.linear": ("norm1_context.linear",),
}
SINGLE = {
    "to_qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "proj_out": ("proj_out",),
    "norm.linear": ("norm.linear",),
}
KOHYA_DOUBLE = {
    "img_attn_qkv": "attn.a_to_qkv", "txt_attn_qkv": "attn.b_to_qkv",
    "img_attn_proj": "attn.a_to_out", "txt_attn_proj": "attn.b_to_out",
    "img_mlp_0": "ff_a.0", "img_mlp_2": "ff_a.2", "txt_mlp_0": "ff_b.0", "txt_mlp_2": "ff_b.2",
    "img_mod_lin": "norm1_a.linear", "txt_mod_lin": "norm1_b.linear",
}
KOHYA_SINGLE = {"linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation_lin": "norm.linear"}
BLOCK_PREFIX = {"blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
GROUPS = {"blocks": DOUBLE, "single_blocks": SINGLE}
# The linear layers of a Qwen-Image transformer block; kohya names are these with dots as underscores.
QWEN_BLOCK = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
)
KOHYA_QWEN = {module.replace(".", "_"): module for module in QWEN_BLOCK}
KOHYA_SLOTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

DIFFSYNTH_KEY = re.compile(
    r"^(?:pipe\.dit\.|dit\.)?(blocks|single_blocks)\.(\d+)\.(.+)\.lora_([AB])(\.default)?\.weight$"
)
KOHYA_KEY = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
DIFFUSERS_KEY = re.compile(r"^(?:transformer\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_A\.default\.weight|"
                           r"lora_B\.default\.weight|alpha)$")
QWEN_KOHYA_KEY = re.compile(r"^lora_unet_transformer_blocks_(\d+)_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
QWEN_DIFFSYNTH_KEY = re.compile(r"^(?!transformer\.)(.+)\.lora_[AB]\.default\.weight$")


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read, or does not fit the model."""


def _few(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


@dataclass
class LoraLayer:
    """One adapted linear layer: ``down`` A ``(r, in)``, ``up`` B ``(out, r)``, ``alpha`` (None means r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update ``(alpha / r) * B @ A``: ``(out, in)`` in float32."""
        return self.scale * (self.up.float() @ self.down.float())

    def folded(self) -> LoraLayer:
        """The same update with ``alpha = r`` (the scale folded into ``up``)."""
        if self.alpha is None or self.alpha == self.rank:
            return LoraLayer(self.down, self.up, None)
        return LoraLayer(self.down, (self.up.float() * self.scale).to(self.up.dtype), None)


LoraWeights = dict[str, LoraLayer]


# ----------------------------------------------------------------------------------------------------------
# Model families
# ----------------------------------------------------------------------------------------------------------


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    return family


def _named_family(modules) -> str | None:
    """The family that module names such as ``transformer_blocks.0.img_mod.1`` belong to; None if they are
    common to both (``attn.to_q``, ``proj_out``, ...). Raises for names of both families at once."""
    found: dict[str, list[str]] = {}
    for module in modules:
        parts = set(module.split("."))
        for family, markers in FAMILY_MARKERS.items():
            if parts & markers:
                found.setdefault(family, []).append(module)
    if len(found) > 1:
        raise LoraFormatError("the LoRA mixes FLUX layers (" + _few(found["flux"], 2) + ") and Qwen-Image layers ("
                              + _few(found["qwen_image"], 2) + ")")
    return next(iter(found), None)


def lora_family(weights: LoraWeights, family: str | None = None) -> str:
    """``flux`` or ``qwen_image``, from the module names of ``weights``.

    ``family`` decides only when every name is common to both families (``attn.to_q`` alone); the names win
    otherwise. Raises :class:`LoraFormatError` when they cannot tell and no ``family`` is given, or when the
    LoRA mixes layers of both families.
    """
    found = _named_family(weights)
    if found is not None:
        return found
    if family is not None:
        return _check_family(family)
    raise LoraFormatError("cannot tell whether this LoRA is for FLUX or Qwen-Image: its layer names are common to "
                          f"both ({_few(weights, 3)}); give the family (flux or qwen_image)")


def _transformer_family(transformer: torch.nn.Module) -> str | None:
    transformer = getattr(transformer, "_orig_mod", transformer)  # a torch.compile wrapper
    for cls in type(transformer).__mro__:
        if cls.__name__ in TRANSFORMER_FAMILIES:
            return TRANSFORMER_FAMILIES[cls.__name__]
    return None


def transformer_family(transformer: torch.nn.Module) -> str:
    """``flux`` for a ``FluxTransformer2DModel``, ``qwen_image`` for a ``QwenImageTransformer2DModel`` (or
    subclasses); raises ``ValueError`` for any other module."""
    family = _transformer_family(transformer)
    if family is None:
        raise ValueError(f"{type(transformer).__name__} is not a transformer EliGen knows (expected one of: "
                         f"{', '.join(TRANSFORMER_FAMILIES)})")
    return family


def _key_family(keys) -> str | None:
    """The family that a file's key style alone names: FLUX DiffSynth/kohya keys, Qwen-Image kohya keys."""
    if any(DIFFSYNTH_KEY.match(k) or KOHYA_KEY.match(k) for k in keys):
        return "flux"
    if any(QWEN_KOHYA_KEY.match(k) for k in keys):
        return "qwen_image"
    return None


# ----------------------------------------------------------------------------------------------------------
# Format detection and readers (all produce split, diffusers-named layers)
# ----------------------------------------------------------------------------------------------------------


def _known_key(key: str) -> bool:
    return any(p.match(key) for p in (DIFFSYNTH_KEY, KOHYA_KEY, QWEN_KOHYA_KEY, DIFFUSERS_KEY))


def _qwen_diffsynth(keys: list[str], family: str | None) -> bool:
    """Keys in the Qwen-Image reference form: peft names with ``.default``, no prefix, no alpha."""
    if not all(QWEN_DIFFSYNTH_KEY.match(k) for k in keys):
        return False
    try:
        named = _named_family({QWEN_DIFFSYNTH_KEY.match(k).group(1) for k in keys})
    except LoraFormatError:  # both families: read as diffusers, refused when checked against a model
        return False
    return (named or family) == "qwen_image"


def detect_format(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> str:
    """``diffsynth``, ``kohya`` or ``diffusers``; raises :class:`LoraFormatError` for anything else.

    Peft keys with ``.default`` and no prefix are ``diffsynth`` for Qwen-Image (its reference form; ``family``
    decides when the layer names are common to both families) and ``diffusers`` otherwise.
    """
    keys = list(state_dict)
    if not keys:
        raise LoraFormatError("the LoRA file holds no tensors")
    if all(DIFFSYNTH_KEY.match(k) for k in keys):
        return "diffsynth"
    if all(KOHYA_KEY.match(k) or QWEN_KOHYA_KEY.match(k) for k in keys):
        return "kohya"
    if all(DIFFUSERS_KEY.match(k) for k in keys) and not any(DIFFSYNTH_KEY.match(k) for k in keys):
        return "diffsynth" if _qwen_diffsynth(keys, family) else "diffusers"
    recognised = {k for k in keys if _known_key(k)}
    raise LoraFormatError(
        "not an EliGen LoRA (FLUX or Qwen-Image) in a known key format (DiffSynth, kohya or diffusers/peft); "
        "unrecognised keys: " + _few(set(keys) - recognised if recognised else keys)
    )


def _split(fused: str, kind: str, index: int, down: torch.Tensor, up: torch.Tensor, alpha: float | None,
           key: str) -> LoraWeights:
    """A fused reference layer -> diffusers layers. lora_A is shared, lora_B rows split by output width."""
    targets = GROUPS[kind].get(fused)
    if targets is None:
        allowed = ", ".join(GROUPS[kind])
        raise LoraFormatError(f"unknown layer '{fused}' in {kind}.{index} (key {key}); expected one of: {allowed}")
    prefix = f"{BLOCK_PREFIX[kind]}.{index}."
    if len(targets) == 1:
        return {prefix + targets[0]: LoraLayer(down, up, alpha)}
    width = down.shape[1]  # q, k and v each have the model width as output
    sizes = [width] * 3 + ([up.shape[0] - 3 * width] if len(targets) == 4 else [])
    if sizes[-1] <= 0 or sum(sizes) != up.shape[0]:
        raise LoraFormatError(f"lora_B of {kind}.{index}.{fused} has {up.shape[0]} rows, which do not split into "
                              f"{len(targets)} projections of a width-{width} model")
    return {prefix + t: LoraLayer(down, part, alpha) for t, part in zip(targets, up.split(sizes), strict=True)}


def _pairs(grouped: dict[tuple, dict[str, torch.Tensor]], what: str) -> None:
    for layer, parts in grouped.items():
        missing = {"down", "up"} - set(parts)
        if missing:
            raise LoraFormatError(f"{what} layer {'.'.join(map(str, layer))} has no lora_{'/'.join(sorted(missing))}")


def _checked(where: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``(down, up, alpha)`` of one layer, refused unless A is ``[r, in]`` and B ``[out, r]`` with ``r >= 1``, the
    weights are finite and alpha is one finite number."""
    import math

    down, up = parts["down"], parts["up"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise LoraFormatError(f"mis-shaped LoRA pair at {where}: lora_A {tuple(down.shape)}, lora_B "
                              f"{tuple(up.shape)} (need A [r, in], B [out, r])")
    if down.shape[0] == 0:
        raise LoraFormatError(f"the LoRA layer {where} has rank 0 (lora_A {tuple(down.shape)}): it adapts nothing")
    for name, tensor in (("lora_A", down), ("lora_B", up)):
        if tensor.device.type != "meta" and not tensor.float().isfinite().all():
            raise LoraFormatError(f"the LoRA layer {where} has non-finite values (NaN or inf) in {name}")
    alpha = None
    if "alpha" in parts:
        if parts["alpha"].numel() != 1:
            raise LoraFormatError(f"the LoRA layer {where} has an alpha of shape {tuple(parts['alpha'].shape)}; "
                                  "alpha is one number per layer")
        alpha = float(parts["alpha"].float().item())
        if not math.isfinite(alpha) or alpha == 0:
            raise LoraFormatError(f"the LoRA layer {where} has alpha {alpha}: it must be a finite, non-zero number")
    return down, up, alpha


def _split_reference(grouped: dict[tuple, dict[str, torch.Tensor]], what: str) -> LoraWeights:
    """Reference layers ``(kind, block, name) -> {down, up[, alpha]}`` -> split diffusers layers."""
    _pairs(grouped, what)
    out: LoraWeights = {}
    for (kind, index, layer), parts in sorted(grouped.items()):
        where = f"{kind}.{index}.{layer}"
        out.update(_split(layer, kind, index, *_checked(where, parts), where))
    return out


def _layers(grouped: dict[str, dict[str, torch.Tensor]], what: str) -> LoraWeights:
    """Diffusers-named ``{module: {down, up[, alpha]}}`` -> checked layers, sorted by name."""
    _pairs({(m,): p for m, p in grouped.items()}, what)
    out: LoraWeights = {}
    for module, parts in sorted(grouped.items()):
        out[module] = LoraLayer(*_checked(module, parts))
    return out


def read_diffsynth(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
    """FLUX reference keys (fused, ``blocks.`` / ``single_blocks.``) or Qwen-Image ones (peft names)."""
    keys = list(state_dict)
    if not any(DIFFSYNTH_KEY.match(k) for k in keys) and all(QWEN_DIFFSYNTH_KEY.match(k) for k in keys):
        return read_diffusers(state_dict)
    grouped: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = DIFFSYNTH_KEY.match(key)
        if match is None:
            raise LoraFormatError(f"not a DiffSynth LoRA key: {key}")
        kind, index, layer, ab, _ = match.groups()
        grouped.setdefault((kind, int(index), layer), {})["down" if ab == "A" else "up"] = tensor
    return _split_reference(grouped, "DiffSynth")


def read_kohya(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
    """FLUX kohya keys (``lora_unet_double_blocks_...``) or Qwen-Image ones (``lora_unet_transformer_blocks_...``)."""
    qwen = [k for k in state_dict if QWEN_KOHYA_KEY.match(k)]
    if not qwen:
        return _read_kohya_flux(state_dict)
    if len(qwen) < len(state_dict):
        raise LoraFormatError("Qwen-Image kohya keys (lora_unet_transformer_blocks_*) mixed with others: "
                              + _few(set(state_dict) - set(qwen)))
    return _read_kohya_qwen(state_dict)


def _read_kohya_flux(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
    grouped: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = KOHYA_KEY.match(key)
        if match is None:
            raise LoraFormatError(f"not a kohya FLUX LoRA key: {key}")
        kind, index, name, part = match.groups()
        table = KOHYA_DOUBLE if kind == "double" else KOHYA_SINGLE
        if name not in table:
            raise LoraFormatError(f"unknown kohya layer '{name}' in {kind}_blocks_{index} (key {key}); expected "
                                  f"one of: {', '.join(table)}")
        block = "blocks" if kind == "double" else "single_blocks"
        grouped.setdefault((block, int(index), table[name]), {})[KOHYA_SLOTS[part]] = tensor
    return _split_reference(grouped, "kohya")


def _read_kohya_qwen(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
    """``lora_unet_transformer_blocks_{i}_<name>``: the name maps back through :data:`KOHYA_QWEN`."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        index, name, part = QWEN_KOHYA_KEY.match(key).groups()
        if name not in KOHYA_QWEN:
            raise LoraFormatError(f"unknown kohya layer '{name}' in transformer_blocks_{index} (key {key}); "
                                  f"expected one of: {', '.join(KOHYA_QWEN)}")
        grouped.setdefault(f"transformer_blocks.{int(index)}.{KOHYA_QWEN[name]}", {})[KOHYA_SLOTS[part]] = tensor
    return _layers(grouped, "kohya")


def read_diffusers(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = DIFFUSERS_KEY.match(key)
        if match is None:
            raise LoraFormatError(f"not a diffusers/peft LoRA key: {key}")
        module, part = match.groups()
        slot = "alpha" if part == "alpha" else "down" if part.startswith("lora_A") else "up"
        grouped.setdefault(module, {})[slot] = tensor
    return _layers(grouped, "diffusers")


READERS = {"diffsynth": read_diffsynth, "kohya": read_kohya, "diffusers": read_diffusers}


def read_lora_family(state_dict: Mapping[str, torch.Tensor],
                     family: str | None = None) -> tuple[LoraWeights, str, str | None]:
    """:func:`read_lora`, plus the family the file is for: from its key style, else from its layer names, else
    ``family``; None when nothing tells. Raises when the file is for another family than ``family``."""
    if family is not None:
        _check_family(family)
    fmt = detect_format(state_dict, family)
    weights = READERS[fmt](state_dict)
    try:
        found = _key_family(state_dict) or _named_family(weights)
    except LoraFormatError:  # layers of both families: still readable, refused when checked against a model
        if family is not None:
            raise
        found = None
    if family is not None and found not in (None, family):
        raise LoraFormatError(f"this LoRA is for {FAMILY_TITLES[found]}, not {FAMILY_TITLES[family]}")
    return weights, fmt, found or family


def read_lora(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> tuple[LoraWeights, str]:
    """Detect the format and convert to diffusers-named split layers.

    ``family`` (``flux`` / ``qwen_image``), when given, is checked against the file and decides the format name
    of ``.default`` peft keys whose layer names are common to both families.
    """
    weights, fmt, _ = read_lora_family(state_dict, family)
    return weights, fmt


# ----------------------------------------------------------------------------------------------------------
# Writers (fuse on the way out)
# ----------------------------------------------------------------------------------------------------------


def _fuse(members: list[LoraLayer | None], widths: list[int]) -> LoraLayer:
    """Diffusers layers of one fused reference layer -> one layer whose B stacks their rows.

    Members that share one A and one alpha (as when read from a fused file) keep them, so the round trip is
    exact; otherwise the As are stacked and B is block-diagonal with each scale folded in, which is exact at a
    higher rank. Missing members get zero rows.
    """
    import torch

    present = [m for m in members if m is not None]
    first = present[0]
    device, dtype = first.up.device, first.up.dtype
    if all(m.alpha == first.alpha and m.down.shape == first.down.shape and torch.equal(m.down, first.down)
           for m in present):
        rows = [m.up if m is not None else torch.zeros(w, first.rank, dtype=dtype, device=device)
                for m, w in zip(members, widths, strict=True)]
        return LoraLayer(first.down, torch.cat(rows), first.alpha)
    folded = [m.folded() if m is not None else None for m in members]
    rank = sum(m.rank for m in folded if m is not None)
    up = torch.zeros(sum(widths), rank, dtype=dtype, device=device)
    row = col = 0
    for m, w in zip(folded, widths, strict=True):
        if m is not None:
            up[row:row + w, col:col + m.rank] = m.up
            col += m.rank
        row += w
    return LoraLayer(torch.cat([m.down for m in folded if m is not None]), up, None)


def fuse_to_reference(weights: LoraWeights) -> dict[tuple[str, int, str], LoraLayer]:
    """Diffusers-named layers -> reference layers ``(kind, block, name)`` (fused projections joined)."""
    lookup = {}
    for kind, table in GROUPS.items():
        for fused, targets in table.items():
            for position, target in enumerate(targets):
                lookup[(BLOCK_PREFIX[kind], target)] = (kind, fused, position)
    pattern = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
    grouped: dict[tuple[str, int, str], dict[int, LoraLayer]] = {}
    unknown = []
    for module, layer in weights.items():
        match = pattern.match(module)
        entry = lookup.get((match.group(1), match.group(3))) if match else None
        if entry is None:
            unknown.append(module)
            continue
        kind, fused, position = entry
        grouped.setdefault((kind, int(match.group(2)), fused), {})[position] = layer
    if unknown:
        raise LoraFormatError("these layers have no DiffSynth/kohya name (only the 304 reference layers do): "
                              + _few(unknown))
    out = {}
    for (kind, index, fused), members in sorted(grouped.items()):
        count = len(GROUPS[kind][fused])
        if count == 1:
            out[(kind, index, fused)] = members[0]
            continue
        known = next(iter(members.values()))
        width = known.down.shape[1]
        widths = [width] * 3
        if count == 4:
            if 3 not in members:
                raise LoraFormatError(f"{BLOCK_PREFIX[kind]}.{index}: writing a fused to_qkv_mlp needs the "
                                      "proj_mlp layer (its width is not known otherwise)")
            widths.append(members[3].up.shape[0])
        out[(kind, index, fused)] = _fuse([members.get(i) for i in range(count)], widths)
    return out


def _writes_qwen(weights: LoraWeights, family: str | None) -> bool:
    """Whether ``weights`` take the Qwen-Image key forms: by their names, else ``family``, else FLUX."""
    return lora_family(weights, family or "flux") == "qwen_image"


def write_diffsynth(weights: LoraWeights, default_suffix: bool = False,
                    family: str | None = None) -> dict[str, torch.Tensor]:
    """FLUX: fused reference names (``.default`` if asked). Qwen-Image: its reference form, peft names with
    ``.default`` and no prefix. Either way no alpha: it is folded into lora_B (alpha = rank)."""
    if _writes_qwen(weights, family):
        return _write_qwen_diffsynth(weights)
    suffix = ".default" if default_suffix else ""
    out = {}
    for (kind, index, fused), layer in fuse_to_reference(weights).items():
        layer = layer.folded()  # DiffSynth files carry no alpha: alpha = rank
        out[f"{kind}.{index}.{fused}.lora_A{suffix}.weight"] = layer.down.contiguous()
        out[f"{kind}.{index}.{fused}.lora_B{suffix}.weight"] = layer.up.contiguous()
    return out


def _write_qwen_diffsynth(weights: LoraWeights) -> dict[str, torch.Tensor]:
    out = {}
    for module, layer in sorted(weights.items()):
        layer = layer.folded()
        out[f"{module}.lora_A.default.weight"] = layer.down.contiguous()
        out[f"{module}.lora_B.default.weight"] = layer.up.contiguous()
    return out


def _kohya_layer(stem: str, layer: LoraLayer) -> dict[str, torch.Tensor]:
    import torch

    return {f"{stem}.lora_down.weight": layer.down.contiguous(), f"{stem}.lora_up.weight": layer.up.contiguous(),
            f"{stem}.alpha": torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))}


def _write_qwen_kohya(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """``lora_unet_transformer_blocks_{i}_<module, dots as underscores>``; only block layers have such names."""
    pattern = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
    matches = {module: pattern.match(module) for module in weights}
    unknown = [m for m, match in matches.items() if match is None or match.group(2) not in QWEN_BLOCK]
    if unknown:
        raise LoraFormatError(f"these layers have no kohya name (only the {len(QWEN_BLOCK)} linear layers of each "
                              "Qwen-Image transformer block do): " + _few(unknown))
    out = {}
    for module, layer in sorted(weights.items()):
        index, name = matches[module].groups()
        out.update(_kohya_layer(f"lora_unet_transformer_blocks_{index}_{name.replace('.', '_')}", layer))
    return out


def write_kohya(weights: LoraWeights, family: str | None = None) -> dict[str, torch.Tensor]:
    """FLUX: fused ``lora_unet_double_blocks_...`` / ``single_blocks`` names; Qwen-Image:
    ``lora_unet_transformer_blocks_...``. Alpha is kept as ``.alpha`` (rank where the layer has none)."""
    if _writes_qwen(weights, family):
        return _write_qwen_kohya(weights)
    inverse = {("blocks", v): k for k, v in KOHYA_DOUBLE.items()}
    inverse.update({("single_blocks", v): k for k, v in KOHYA_SINGLE.items()})
    out = {}
    for (kind, index, fused), layer in fuse_to_reference(weights).items():
        name = f"lora_unet_{'double' if kind == 'blocks' else 'single'}_blocks_{index}_{inverse[(kind, fused)]}"
        out.update(_kohya_layer(name, layer))
    return out


def write_diffusers(weights: LoraWeights, with_alpha: bool = True) -> dict[str, torch.Tensor]:
    """``transformer.<module>.lora_A.weight`` keys; alpha kept as ``.alpha`` (or folded into B)."""
    import torch

    out = {}
    for module, layer in sorted(weights.items()):
        if not with_alpha:
            layer = layer.folded()
        out[f"transformer.{module}.lora_A.weight"] = layer.down.contiguous()
        out[f"transformer.{module}.lora_B.weight"] = layer.up.contiguous()
        if with_alpha and layer.alpha is not None:
            out[f"transformer.{module}.alpha"] = torch.tensor(float(layer.alpha))
    return out


def write_lora(weights: LoraWeights, fmt: str, family: str | None = None) -> dict[str, torch.Tensor]:
    """``weights`` in the key format ``fmt`` of their family (``family`` decides when the layer names are
    common to both; FLUX when neither tells)."""
    if fmt == "diffsynth":
        return write_diffsynth(weights, family=family)
    if fmt == "kohya":
        return write_kohya(weights, family=family)
    if fmt == "diffusers":
        return write_diffusers(weights)
    raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")


# ----------------------------------------------------------------------------------------------------------
# Files, hub ids, model checks
# ----------------------------------------------------------------------------------------------------------


def resolve_lora_path(path_or_hub_id: str | Path, filename: str | None = None) -> Path:
    """A local file, a directory holding one ``.safetensors``, or a hub id (downloaded via huggingface_hub)."""
    path = Path(path_or_hub_id)
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob(filename or "*.safetensors"))
        if len(files) != 1:
            raise LoraFormatError(f"{path} holds {len(files)} .safetensors files; name the LoRA file itself")
        return files[0]
    text = str(path_or_hub_id)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not path.suffix:
        from huggingface_hub import hf_hub_download

        name = filename or HUB_DEFAULT_FILES.get(text)
        if name is None:
            raise LoraFormatError(f"hub repo {text}: give the file name inside it (filename=...)")
        return Path(hf_hub_download(text, name))
    raise FileNotFoundError(f"LoRA not found: {path_or_hub_id} is neither a file, a directory nor a hub id")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise LoraFormatError(f"{path} is not a readable .safetensors file ({exc})") from exc


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path, fmt: str) -> None:
    from safetensors.torch import save_file

    # clone: split layers share one lora_A tensor, and safetensors refuses tensors that share memory
    save_file({k: v.detach().clone().contiguous() for k, v in state_dict.items()}, str(path),
              metadata={"format": "pt", "eligen_format": fmt})


def _check_family_fits(weights: LoraWeights, transformer: torch.nn.Module) -> None:
    """A LoRA whose layer names belong to the other family than the transformer's class (unknown classes pass:
    the layer checks still apply)."""
    expected = _transformer_family(transformer)
    if expected is None:
        return
    found = lora_family(weights, expected)
    if found != expected:
        raise LoraFormatError(f"this LoRA is for {FAMILY_TITLES[found]} but the pipeline's transformer is "
                              f"{FAMILY_TITLES[expected]} ({type(transformer).__name__}); load it into a "
                              f"{FAMILY_TITLES[found]} pipeline")


def check_fits(weights: LoraWeights, transformer: torch.nn.Module) -> None:
    """Refuse a LoRA that does not fit ``transformer`` as a whole (nothing is applied partially): a LoRA of the
    other model family, layers the transformer lacks, layers of other shapes."""
    import torch

    from .speedups import Fp8Linear

    _check_family_fits(weights, transformer)
    modules = dict(transformer.named_modules())
    missing, misshaped = [], []
    for name, layer in weights.items():
        module = modules.get(name)
        module = getattr(module, "base_layer", module)  # a layer that already carries another adapter
        if isinstance(module, Fp8Linear):
            raise LoraFormatError(f"the LoRA layer {name} is an fp8 layer of speedups.quantize_fp8: peft wraps only "
                                  "nn.Linear, so load LoRAs first and quantise after")
        if not isinstance(module, torch.nn.Linear):
            missing.append(name)
        elif layer.down.shape[1] != module.in_features or layer.up.shape[0] != module.out_features:
            misshaped.append(f"{name} (LoRA {layer.up.shape[0]}x{layer.down.shape[1]}, layer "
                             f"{module.out_features}x{module.in_features})")
    if missing:
        raise LoraFormatError(f"{len(missing)} LoRA layers do not exist in this transformer (a LoRA for another "
                              f"architecture or depth?): {_few(missing)}")
    if misshaped:
        raise LoraFormatError(f"{len(misshaped)} LoRA layers do not match the layer shapes (a LoRA for a model of "
                              f"another width?): {_few(misshaped, 3)}")


@dataclass
class LoraInfo:
    format: str
    family: str  # flux, qwen_image, or unknown (layer names common to both)
    layers: int
    reference_layers: int
    ranks: list[int]
    alphas: list[float]
    double_blocks: list[int]
    single_blocks: list[int]
    dtype: str


def peft_config(weights: LoraWeights, prefix: str = "transformer") -> dict:
    """``LoraConfig`` kwargs (keyed ``prefix.<field>`` as diffusers' loader expects) for ``weights`` with alpha
    folded: alpha = rank in every layer, exact module names, per-layer ranks anchored with ``^`` like diffusers.
    """
    ranks = {name: layer.rank for name, layer in weights.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{name}": r for name, r in ranks.items() if r != common}
    config = {
        "r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        # a regex string is matched against whole module names; a list would match by suffix, so "proj_out"
        # would also wrap every single block's proj_out
        "target_modules": "|".join(re.escape(name) for name in sorted(weights)),
        "lora_dropout": 0.0, "bias": "none", "init_lora_weights": False,
    }
    return {f"{prefix}.{k}": v for k, v in config.items()}


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) or "none"


def _reference_layers(weights: LoraWeights, family: str | None) -> int:
    """Layers as the family's DiffSynth file names them: FLUX fuses q/k/v, Qwen-Image fuses nothing."""
    if family == "qwen_image":
        return len(weights)
    try:
        return len(fuse_to_reference(weights))
    except LoraFormatError:
        return 0


def lora_info(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> LoraInfo:
    """What ``eligen lora info`` prints. For Qwen-Image the (dual-stream) ``transformer_blocks`` are listed as
    double blocks; it has no single blocks."""
    weights, fmt, found = read_lora_family(state_dict, family)
    blocks = {"transformer_blocks": set(), "single_transformer_blocks": set()}
    for module in weights:
        head, _, rest = module.partition(".")
        if head in blocks:
            blocks[head].add(int(rest.split(".")[0]))
    first = next(iter(state_dict.values()))
    return LoraInfo(
        format=fmt, family=found or "unknown", layers=len(weights), reference_layers=_reference_layers(weights, found),
        ranks=sorted({layer.rank for layer in weights.values()}),
        alphas=sorted({layer.alpha if layer.alpha is not None else float(layer.rank) for layer in weights.values()}),
        double_blocks=sorted(blocks["transformer_blocks"]), single_blocks=sorted(blocks["single_transformer_blocks"]),
        dtype=str(first.dtype).removeprefix("torch."),
    )


def format_info(info: LoraInfo) -> str:
    return "\n".join([
        f"format: {info.format}",
        f"family: {info.family}",
        f"rank: {', '.join(map(str, info.ranks))}",
        f"alpha: {', '.join(f'{a:g}' for a in info.alphas)}",
        f"adapted layers: {info.layers} diffusers linear layers ({info.reference_layers} reference layers)",
        f"double blocks: {_ranges(info.double_blocks)}",
        f"single blocks: {_ranges(info.single_blocks)}",
        f"dtype: {info.dtype}",
    ])


# ----------------------------------------------------------------------------------------------------------
# File-level commands (`eligen lora info / convert`)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoraInfoConfig:
    file: Path = option(None, "LoRA .safetensors file (DiffSynth, kohya or diffusers keys)", positional=True,
                        required=True)


@dataclass
class LoraConvertConfig:
    input: Path = option(None, "LoRA .safetensors file to read (any of the three formats)", positional=True,
                         required=True)
    output: Path = option(None, "where to write the converted .safetensors file", positional=True, required=True)
    to: str = option(None, "key format to write", choices=FORMATS, required=True)

    def __post_init__(self) -> None:
        if self.to not in FORMATS:
            raise ValueError(f"--to must be one of {FORMATS}, got {self.to!r}")


def convert_lora_file(config: LoraConvertConfig) -> tuple[str, int]:
    """Read ``config.input`` in whatever format it has, write ``config.output`` in ``config.to``.

    Returns the source format and the number of tensors written. The file is written atomically.
    """
    weights, source, family = read_lora_family(load_state_dict(config.input))
    state = write_lora(weights, config.to, family=family)
    with atomic_path(config.output) as tmp:
        save_state_dict(state, tmp, config.to)
    return source, len(state)

"""FLUX.1's LoRA key formats beyond diffusers/peft (docs/design.md section 4), torch-free until tensors are made.

- ``diffsynth``: ``blocks.{i}.attn.a_to_qkv.lora_A[.default].weight`` ... fused q/k/v (and the single blocks'
  ``to_qkv_mlp``), no alpha (= rank); the released EliGen LoRA (``modelscope/EliGen``).
- ``kohya``: ``lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight`` ... with optional ``.alpha``.

Fused projections split on reading (lora_B rows in three for q/k/v, plus ``proj_mlp`` for ``to_qkv_mlp``; lora_A
shared) and fuse on writing. Widths come from the tensors, never from constants.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...lora import KeyFormats, LoraFormatError, LoraLayer, LoraWeights, checked_layer, few, kohya_layer, require_pairs

if TYPE_CHECKING:
    import torch

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
KOHYA_SLOTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

DIFFSYNTH_KEY = re.compile(
    r"^(?:pipe\.dit\.|dit\.)?(blocks|single_blocks)\.(\d+)\.(.+)\.lora_([AB])(\.default)?\.weight$"
)
KOHYA_KEY = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")


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


def _split_reference(grouped: dict[tuple, dict[str, torch.Tensor]], what: str) -> LoraWeights:
    """Reference layers ``(kind, block, name) -> {down, up[, alpha]}`` -> split diffusers layers."""
    require_pairs(grouped, what)
    out: LoraWeights = {}
    for (kind, index, layer), parts in sorted(grouped.items()):
        where = f"{kind}.{index}.{layer}"
        out.update(_split(layer, kind, index, *checked_layer(where, parts), where))
    return out


def read_diffsynth(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
    grouped: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = DIFFSYNTH_KEY.match(key)
        if match is None:
            raise LoraFormatError(f"not a DiffSynth LoRA key: {key}")
        kind, index, layer, ab, _ = match.groups()
        grouped.setdefault((kind, int(index), layer), {})["down" if ab == "A" else "up"] = tensor
    return _split_reference(grouped, "DiffSynth")


def read_kohya(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
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
        if match is None or entry is None:
            unknown.append(module)
            continue
        kind, fused, position = entry
        grouped.setdefault((kind, int(match.group(2)), fused), {})[position] = layer
    if unknown:
        raise LoraFormatError("these layers have no DiffSynth/kohya name (only the 304 reference layers do): "
                              + few(unknown))
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


def write_diffsynth(weights: LoraWeights, default_suffix: bool = False) -> dict[str, torch.Tensor]:
    """Fused reference names (``.default`` if asked), no alpha: it is folded into lora_B (alpha = rank)."""
    suffix = ".default" if default_suffix else ""
    out = {}
    for (kind, index, fused), layer in fuse_to_reference(weights).items():
        layer = layer.folded()  # DiffSynth files carry no alpha: alpha = rank
        out[f"{kind}.{index}.{fused}.lora_A{suffix}.weight"] = layer.down.contiguous()
        out[f"{kind}.{index}.{fused}.lora_B{suffix}.weight"] = layer.up.contiguous()
    return out


def write_kohya(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """Fused ``lora_unet_double_blocks_...`` / ``single_blocks`` names, alpha kept (rank where a layer has none)."""
    inverse = {("blocks", v): k for k, v in KOHYA_DOUBLE.items()}
    inverse.update({("single_blocks", v): k for k, v in KOHYA_SINGLE.items()})
    out = {}
    for (kind, index, fused), layer in fuse_to_reference(weights).items():
        name = f"lora_unet_{'double' if kind == 'blocks' else 'single'}_blocks_{index}_{inverse[(kind, fused)]}"
        out.update(kohya_layer(name, layer))
    return out


class FluxKeyFormats(KeyFormats):
    # module-name parts (or runs of parts) of FLUX.1's transformer that no other family's has; FLUX.2 shares
    # ff / ff_context, single_transformer_blocks, x_embedder, context_embedder and guidance_embedder
    markers = frozenset({"ff.net", "ff_context.net", "norm1", "norm1_context", "norm.linear", "proj_mlp",
                         "text_embedder", "time_text_embed.guidance_embedder",
                         *(f"single_transformer_blocks.*.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                          "proj_out"))})
    hub_files = {"modelscope/EliGen": "model_bf16.safetensors"}  # noqa: RUF012  (read only)

    def style(self, key: str) -> str | None:
        if DIFFSYNTH_KEY.match(key):
            return "diffsynth"
        if KOHYA_KEY.match(key):
            return "kohya"
        return None

    def read(self, style: str, state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
        return read_diffsynth(state_dict) if style == "diffsynth" else read_kohya(state_dict)

    def write(self, style: str, weights: LoraWeights) -> dict[str, torch.Tensor]:
        return write_diffsynth(weights) if style == "diffsynth" else write_kohya(weights)

    def reference_layers(self, weights: LoraWeights) -> int:
        """Layers as the DiffSynth file names them (q/k/v fused); 0 when some layer has no reference name."""
        try:
            return len(fuse_to_reference(weights))
        except LoraFormatError:
            return 0


KEY_FORMATS = FluxKeyFormats()

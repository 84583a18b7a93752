"""FLUX.2's LoRA key formats beyond diffusers/peft (docs/design.md section 17), torch-free until tensors are made.

- ``kohya``: the convention diffusers' ``Flux2LoraLoaderMixin`` reads (``_convert_kohya_flux2_lora_to_diffusers``):
  ``lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight`` ... with optional ``.alpha``; the double blocks'
  q/k/v fused (``img_attn_qkv``, ``txt_attn_qkv``), the single blocks' fused projections one to one
  (``linear1`` = ``attn.to_qkv_mlp_proj``, ``linear2`` = ``attn.to_out``), and five layers outside the blocks.
  Its key names are FLUX.1's kohya names, so a file is read as FLUX.2's when the FLUX.2 family is named (loading
  into a FLUX.2 pipeline, training); alone, its keys cannot tell the two families apart.
- no DiffSynth form: there is no DiffSynth EliGen release for FLUX.2; writing one raises.

Fused q/k/v split on reading (lora_B rows in three equal parts, lora_A shared) and fuse on writing (a shared
lora_A is kept; otherwise the As are stacked and lora_B is block-diagonal, which diffusers' loader splits back).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...lora import KeyFormats, LoraFormatError, LoraLayer, LoraWeights, checked_layer, few, kohya_layer, require_pairs

if TYPE_CHECKING:
    import torch

# kohya layer name -> diffusers module names inside the block, in fused row order
KOHYA_DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.linear_in",),
    "img_mlp_2": ("ff.linear_out",),
    "txt_mlp_0": ("ff_context.linear_in",),
    "txt_mlp_2": ("ff_context.linear_out",),
}
KOHYA_SINGLE: dict[str, tuple[str, ...]] = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
KOHYA_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "final_layer_linear": "proj_out",
}
TABLES: dict[str, dict[str, tuple[str, ...]]] = {"double": KOHYA_DOUBLE, "single": KOHYA_SINGLE}
BLOCK_LISTS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
KOHYA_SLOTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PARTS = r"\.(lora_down\.weight|lora_up\.weight|alpha)$"
BLOCK_KEY = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_(\w+?)" + _PARTS)
TOP_KEY = re.compile(r"^lora_unet_(" + "|".join(KOHYA_TOP) + ")" + _PARTS)


def _claims(key: str) -> bool:
    match = BLOCK_KEY.match(key)
    return (match is not None and match.group(3) in TABLES[match.group(1)]) or TOP_KEY.match(key) is not None


def read_kohya(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
    grouped: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        block, top = BLOCK_KEY.match(key), TOP_KEY.match(key)
        if block is not None:
            kind, index, name, part = block.groups()
            if name not in TABLES[kind]:
                raise LoraFormatError(f"unknown kohya FLUX.2 layer '{name}' in {kind}_blocks_{index} (key {key}); "
                                      f"expected one of: {', '.join(TABLES[kind])}")
            grouped.setdefault((kind, int(index), name), {})[KOHYA_SLOTS[part]] = tensor
        elif top is not None:
            name, part = top.groups()
            grouped.setdefault(("top", 0, name), {})[KOHYA_SLOTS[part]] = tensor
        else:
            raise LoraFormatError(f"not a kohya FLUX.2 LoRA key: {key}")
    require_pairs(grouped, "kohya")
    out: LoraWeights = {}
    for (kind, index, name), parts in sorted(grouped.items()):
        where = f"{kind}.{index}.{name}" if kind != "top" else name
        down, up, alpha = checked_layer(where, parts)
        if kind == "top":
            out[KOHYA_TOP[name]] = LoraLayer(down, up, alpha)
            continue
        targets = TABLES[kind][name]
        prefix = f"{BLOCK_LISTS[kind]}.{index}."
        if len(targets) == 1:
            out[prefix + targets[0]] = LoraLayer(down, up, alpha)
            continue
        if up.shape[0] % len(targets):
            raise LoraFormatError(f"lora_B of {where} has {up.shape[0]} rows, which do not split into q, k and v")
        for target, rows in zip(targets, up.chunk(len(targets)), strict=True):
            out[prefix + target] = LoraLayer(down, rows, alpha)
    return out


def _fuse(members: list[LoraLayer | None], width: int) -> LoraLayer:
    """q/k/v layers (None: absent, zero rows) -> one fused layer; a shared lora_A and alpha are kept, so a file read
    from a fused one writes back the same, else the As are stacked under a block-diagonal lora_B with each scale
    folded in (exact, at the summed rank)."""
    import torch

    present = [m for m in members if m is not None]
    first = present[0]
    device, dtype = first.up.device, first.up.dtype
    if all(m.alpha == first.alpha and m.down.shape == first.down.shape and torch.equal(m.down, first.down)
           for m in present):
        rows = [m.up if m is not None else torch.zeros(width, first.rank, dtype=dtype, device=device)
                for m in members]
        return LoraLayer(first.down, torch.cat(rows), first.alpha)
    folded = [m.folded() if m is not None else None for m in members]
    rank = sum(m.rank for m in folded if m is not None)
    up = torch.zeros(width * len(members), rank, dtype=dtype, device=device)
    row = column = 0
    for m in folded:
        if m is not None:
            up[row:row + width, column:column + m.rank] = m.up
            column += m.rank
        row += width
    return LoraLayer(torch.cat([m.down for m in folded if m is not None]), up, None)


def write_kohya(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """Fused ``lora_unet_double_blocks_{i}_...`` / ``single_blocks`` / top-level names, alpha kept (the rank where a
    layer has none)."""
    lookup: dict[tuple[str, str], tuple[str, str, int]] = {}
    for kind, table in TABLES.items():
        for name, targets in table.items():
            for position, target in enumerate(targets):
                lookup[(BLOCK_LISTS[kind], target)] = (kind, name, position)
    top = {module: name for name, module in KOHYA_TOP.items()}
    pattern = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
    grouped: dict[tuple[str, int, str], dict[int, LoraLayer]] = {}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for module, layer in sorted(weights.items()):
        if module in top:
            out.update(kohya_layer(f"lora_unet_{top[module]}", layer))
            continue
        match = pattern.match(module)
        entry = lookup.get((match.group(1), match.group(3))) if match else None
        if match is None or entry is None:
            unknown.append(module)
            continue
        kind, name, position = entry
        grouped.setdefault((kind, int(match.group(2)), name), {})[position] = layer
    if unknown:
        raise LoraFormatError("these layers have no kohya FLUX.2 name (the block linears and x_embedder, "
                              "context_embedder, the timestep embedder and proj_out do): " + few(unknown))
    for (kind, index, name), members in sorted(grouped.items()):
        count = len(TABLES[kind][name])
        layer = members[0] if count == 1 else _fuse([members.get(i) for i in range(count)],
                                                     next(iter(members.values())).up.shape[0])
        out.update(kohya_layer(f"lora_unet_{kind}_blocks_{index}_{name}", layer))
    return out


class Flux2KeyFormats(KeyFormats):
    # module-name parts of FLUX.2's transformer that no other family's has
    markers = frozenset({"linear_in", "linear_out", "to_qkv_mlp_proj", "time_guidance_embed",
                         "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"})
    forms = ("kohya",)

    def style(self, key: str) -> str | None:
        return "kohya" if _claims(key) else None

    def read(self, style: str, state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
        if style != "kohya":
            raise LoraFormatError(f"FLUX.2 has no {style} LoRA form")
        return read_kohya(state_dict)

    def write(self, style: str, weights: LoraWeights) -> dict[str, torch.Tensor]:
        if style != "kohya":
            raise LoraFormatError(f"FLUX.2 has no {style} LoRA form (there is no DiffSynth EliGen release for FLUX.2); "
                                  "write it as diffusers or kohya")
        return write_kohya(weights)


KEY_FORMATS = Flux2KeyFormats()

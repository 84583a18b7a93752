"""Qwen-Image's LoRA key formats beyond diffusers/peft (docs/design.md section 11), torch-free until tensors are made.

Nothing is fused (``transformer_blocks`` only):

- ``diffsynth``: ``transformer_blocks.{i}.attn.to_q.lora_A.default.weight`` ... (peft names, no prefix, no alpha =
  rank), as in DiffSynth-Studio/Qwen-Image-EliGen (V1, V2, Poster);
- ``kohya``: ``lora_unet_transformer_blocks_{i}_attn_to_q.lora_down.weight`` ... with optional ``.alpha``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...lora import KeyFormats, LoraFormatError, LoraWeights, checked_layers, few, kohya_layer, read_diffusers

if TYPE_CHECKING:
    import torch

# The linear layers of a Qwen-Image transformer block; kohya names are these with dots as underscores.
BLOCK_LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
)
KOHYA_NAMES = {module.replace(".", "_"): module for module in BLOCK_LINEARS}
KOHYA_SLOTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
KOHYA_KEY = re.compile(r"^lora_unet_transformer_blocks_(\d+)_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
DIFFSYNTH_KEY = re.compile(r"^(?!transformer\.)(.+)\.lora_[AB]\.default\.weight$")


def read_kohya(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
    """``lora_unet_transformer_blocks_{i}_<name>``: the name maps back through :data:`KOHYA_NAMES`."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = KOHYA_KEY.match(key)
        if match is None:
            raise LoraFormatError(f"not a kohya Qwen-Image LoRA key: {key}")
        index, name, part = match.groups()
        if name not in KOHYA_NAMES:
            raise LoraFormatError(f"unknown kohya layer '{name}' in transformer_blocks_{index} (key {key}); "
                                  f"expected one of: {', '.join(KOHYA_NAMES)}")
        grouped.setdefault(f"transformer_blocks.{int(index)}.{KOHYA_NAMES[name]}", {})[KOHYA_SLOTS[part]] = tensor
    return checked_layers(grouped, "kohya")


def write_diffsynth(weights: LoraWeights) -> dict[str, torch.Tensor]:
    out = {}
    for module, layer in sorted(weights.items()):
        layer = layer.folded()
        out[f"{module}.lora_A.default.weight"] = layer.down.contiguous()
        out[f"{module}.lora_B.default.weight"] = layer.up.contiguous()
    return out


def write_kohya(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """``lora_unet_transformer_blocks_{i}_<module, dots as underscores>``; only block layers have such names."""
    pattern = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
    matches = {module: pattern.match(module) for module in weights}
    unknown = [m for m, match in matches.items() if match is None or match.group(2) not in BLOCK_LINEARS]
    if unknown:
        raise LoraFormatError(f"these layers have no kohya name (only the {len(BLOCK_LINEARS)} linear layers of each "
                              "Qwen-Image transformer block do): " + few(unknown))
    out = {}
    for module, layer in sorted(weights.items()):
        match = matches[module]
        assert match is not None
        index, name = match.groups()
        out.update(kohya_layer(f"lora_unet_transformer_blocks_{index}_{name.replace('.', '_')}", layer))
    return out


class QwenImageKeyFormats(KeyFormats):
    # module-name parts of Qwen-Image's transformer that no other family's has (Qwen-Image 2.1 has img_mlp, img_in
    # and txt_in too)
    markers = frozenset({"txt_mlp", "img_mod", "txt_mod"})
    hub_files = {name: "model.safetensors" for name in (  # noqa: RUF012  (read only)
        "DiffSynth-Studio/Qwen-Image-EliGen", "DiffSynth-Studio/Qwen-Image-EliGen-V2",
        "DiffSynth-Studio/Qwen-Image-EliGen-Poster")}

    def style(self, key: str) -> str | None:
        return "kohya" if KOHYA_KEY.match(key) else None

    def peft_style(self, keys: list[str]) -> str:
        """Peft names with ``.default`` and no prefix are the reference's own form (``diffsynth``)."""
        return "diffsynth" if all(DIFFSYNTH_KEY.match(k) for k in keys) else "diffusers"

    def read(self, style: str, state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
        return read_kohya(state_dict) if style == "kohya" else read_diffusers(state_dict)

    def write(self, style: str, weights: LoraWeights) -> dict[str, torch.Tensor]:
        return write_kohya(weights) if style == "kohya" else write_diffsynth(weights)


KEY_FORMATS = QwenImageKeyFormats()

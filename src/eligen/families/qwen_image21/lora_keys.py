"""Qwen-Image 2.1's LoRA key formats (docs/design.md section 20), torch-free.

Only the diffusers/peft form exists: no EliGen LoRA or DiffSynth module naming has been released for this model and
it has no kohya convention, so writing ``diffsynth`` or ``kohya`` raises :class:`~eligen.lora.LoraFormatError`. Its
blocks are single-stream (``transformer_blocks`` only); the module names only this family has are the SwiGLU gate
(``img_mlp.gate_layer``) and the text projection's ``txt_in.in_layer`` / ``out_layer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lora import KeyFormats, LoraFormatError, LoraWeights

if TYPE_CHECKING:
    import torch

# The linear layers of a Qwen-Image 2.1 transformer block (every one bias-free).
BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
                 "img_mlp.out")


class QwenImage21KeyFormats(KeyFormats):
    markers = frozenset({"gate_layer", "in_layer", "out_layer"})
    forms = ()  # diffusers only
    block_names = {"transformer_blocks": "single"}  # noqa: RUF012  (read only)

    def write(self, style: str, weights: LoraWeights) -> dict[str, torch.Tensor]:
        raise LoraFormatError(f"Qwen-Image 2.1 has no {style} LoRA form (no DiffSynth release, no kohya convention); "
                              "write it as diffusers")


KEY_FORMATS = QwenImage21KeyFormats()

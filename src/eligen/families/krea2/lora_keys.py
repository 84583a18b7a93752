"""Krea 2's LoRA key formats (docs/design.md section 19), torch-free.

Krea 2 has no EliGen release (no DiffSynth form) and no kohya convention: its trainers (Krea's reference trainer,
ComfyUI, AI-Toolkit) write peft keys, which diffusers' ``Krea2LoraLoaderMixin`` renames. So the diffusers/peft
format is the only one here; asking for ``diffsynth`` or ``kohya`` raises :class:`~eligen.lora.LoraFormatError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...lora import KeyFormats, LoraFormatError, LoraWeights

if TYPE_CHECKING:
    import torch

NO_FORM = ("Krea 2 has no {style} LoRA form (no EliGen release in DiffSynth's keys and no kohya convention: its "
           "trainers write peft keys); write and read it as diffusers")


class Krea2KeyFormats(KeyFormats):
    # module-name parts of Krea 2's transformer that no other family's has: the gated attention output, the SwiGLU
    # projections, the text fusion stage, the shared time modulation and the final layer
    markers = frozenset({"to_gate", "gate", "up", "down", "text_fusion", "layerwise_blocks", "refiner_blocks",
                         "projector", "time_embed", "time_mod_proj", "final_layer"})
    forms = ()
    block_names = {"transformer_blocks": "single"}  # noqa: RUF012  (read only) single-stream blocks

    def read(self, style: str, state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
        raise LoraFormatError(NO_FORM.format(style=style))

    def write(self, style: str, weights: LoraWeights) -> dict[str, torch.Tensor]:
        raise LoraFormatError(NO_FORM.format(style=style))


KEY_FORMATS = Krea2KeyFormats()

"""Z-Image's LoRA key formats (docs/design.md section 18): diffusers/peft names only.

No EliGen LoRA for Z-Image has been released (so no DiffSynth form exists) and eligen knows no kohya naming of the
diffusers Z-Image transformer: reading and writing take the diffusers/peft form (``layers.{i}.attention.to_q``,
``layers.{i}.feed_forward.w1``, ``layers.{i}.adaLN_modulation.0`` ...); asking for the others raises a
:class:`~eligen.lora.LoraFormatError` that says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...lora import KeyFormats, LoraFormatError, LoraWeights

if TYPE_CHECKING:
    import torch

NO_FORM = ("Z-Image has no {style} LoRA form: no EliGen LoRA for it has been released and it has no kohya naming "
           "here; write it as diffusers")


class ZImageKeyFormats(KeyFormats):
    # module-name parts of Z-Image's transformer that no other family's has
    markers = frozenset({"attention", "feed_forward", "adaLN_modulation", "noise_refiner", "context_refiner",
                         "cap_embedder", "t_embedder", "all_x_embedder", "all_final_layer"})
    forms = ()  # diffusers only
    block_names = {"layers": "single"}  # noqa: RUF012  (read only) single-stream blocks only

    def read(self, style: str, state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
        raise LoraFormatError(NO_FORM.format(style=style))

    def write(self, style: str, weights: LoraWeights) -> dict[str, torch.Tensor]:
        raise LoraFormatError(NO_FORM.format(style=style))


KEY_FORMATS = ZImageKeyFormats()

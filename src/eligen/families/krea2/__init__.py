"""Krea 2: diffusers' ``Krea2Pipeline`` with EliGen (docs/design.md section 19). The card is torch-free; the model is
:mod:`.model`, the pipeline :mod:`.pipeline`, the LoRA key formats :mod:`.lora_keys` and the tiny random test
pipeline :mod:`.testing`."""

from __future__ import annotations

from ..card import FamilyCard, SamplingDefaults

# Krea2Pipeline's CFG is ``cond + g (cond - uncond)`` with its ``guidance_scale`` g (default 4.5, on when g > 0):
# eligen's true-CFG scale s = 1 + g (``uncond + s (cond - uncond)``), so its default is 5.5.
KREA_GUIDANCE = 4.5

CARD = FamilyCard(
    name="krea2",
    title="Krea 2",
    pipelines=("Krea2Pipeline", "EliGenKrea2Pipeline"),
    transformers=("Krea2Transformer2DModel",),
    eligen_pipeline="eligen.families.krea2.pipeline:EliGenKrea2Pipeline",
    family="eligen.families.krea2.model:KREA2",
    lora_keys="eligen.families.krea2.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.krea2.testing:save_tiny_pipeline",
    defaults=SamplingDefaults(steps=28, true_cfg=1 + KREA_GUIDANCE, guidance=None, max_sequence_length=512),
    # no EliGen reference exists for Krea 2: the commands run the base checkpoint's own recommended settings
    reference=SamplingDefaults(steps=28, true_cfg=1 + KREA_GUIDANCE, guidance=None, max_sequence_length=512),
    default_cfg="plain",
    example="--model path/to/krea2-diffusers --lora eligen_lora.safetensors",
    hub_names=r"krea.?2",
    cfg_argument="guidance_scale",
    cfg_offset=1.0,
)

"""Qwen-Image: diffusers' ``QwenImagePipeline`` with the reference's Qwen-Image EliGen (docs/design.md section 11).
The card is torch-free; the model is :mod:`.model`, the pipeline :mod:`.pipeline`, the LoRA key formats
:mod:`.lora_keys` and the tiny random test pipeline :mod:`.testing`."""

from __future__ import annotations

from ..card import FamilyCard, SamplingDefaults

CARD = FamilyCard(
    name="qwen_image",
    title="Qwen-Image",
    pipelines=("QwenImagePipeline", "EliGenQwenImagePipeline"),
    transformers=("QwenImageTransformer2DModel",),
    eligen_pipeline="eligen.families.qwen_image.pipeline:EliGenQwenImagePipeline",
    family="eligen.families.qwen_image.model:QWEN_IMAGE",
    lora_keys="eligen.families.qwen_image.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.qwen_image.testing:save_tiny_pipeline",
    defaults=SamplingDefaults(steps=50, true_cfg=4.0, guidance=None, max_sequence_length=512),
    # the reference's Qwen-Image EliGen examples: true CFG 4, 30-40 steps
    reference=SamplingDefaults(steps=40, true_cfg=4.0, guidance=None, max_sequence_length=512),
    default_cfg="rescaled",
    example="--model Qwen/Qwen-Image --lora DiffSynth-Studio/Qwen-Image-EliGen-V2",
    hub_names=r"qwen.*image",
)

"""Qwen-Image 2.1: diffusers' ``QwenImage21Pipeline`` (a single-stream, block-causal transformer on Qwen3-VL text) with
EliGen (docs/design.md section 20). The card is torch-free; the model is :mod:`.model`, the pipeline :mod:`.pipeline`,
the LoRA key formats :mod:`.lora_keys`, the torchvision-free Qwen3-VL processor :mod:`.processor` and the tiny random
test pipeline :mod:`.testing`."""

from __future__ import annotations

from ..card import FamilyCard, SamplingDefaults

CARD = FamilyCard(
    name="qwen_image21",
    title="Qwen-Image 2.1",
    pipelines=("QwenImage21Pipeline", "EliGenQwenImage21Pipeline"),
    transformers=("QwenImage21Transformer2DModel",),
    eligen_pipeline="eligen.families.qwen_image21.pipeline:EliGenQwenImage21Pipeline",
    family="eligen.families.qwen_image21.model:QWEN_IMAGE21",
    lora_keys="eligen.families.qwen_image21.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.qwen_image21.testing:save_tiny_pipeline",
    # QwenImage21Pipeline's own: 40 steps, true CFG off ("meant to be sampled without guidance"), no length limit
    # (512 here caps entity segments only, section 20)
    defaults=SamplingDefaults(steps=40, true_cfg=1.0, guidance=None, max_sequence_length=512),
    # no EliGen reference exists for this model: the commands run the diffusers pipeline's settings
    reference=SamplingDefaults(steps=40, true_cfg=1.0, guidance=None, max_sequence_length=512),
    default_cfg="plain",
    example="--model Qwen/Qwen-Image-2.1 --lora my-qwen-image-2.1-eligen.safetensors",
    hub_names=r"qwen.*image.*\b2\.1\b",  # Qwen/Qwen-Image-2.1 (not Qwen-Image-2512)
)

"""Z-Image: diffusers' ``ZImagePipeline`` (Z-Image and Z-Image-Turbo) with EliGen (docs/design.md section 18), and
its ControlNet pipeline (``ZImageControlNetPipeline``: a variant card, section 23). The cards are torch-free; the
model is :mod:`.model`, the pipelines :mod:`.pipeline` and :mod:`.controlnet`, the LoRA key formats
:mod:`.lora_keys` and the tiny random test pipelines :mod:`.testing`."""

from __future__ import annotations

from ..card import FamilyCard, SamplingDefaults

CONTROLNET_CARD = FamilyCard(
    name="z_image",
    title="Z-Image ControlNet",
    pipelines=("ZImageControlNetPipeline", "EliGenZImageControlNetPipeline"),
    transformers=("ZImageTransformer2DModel",),
    eligen_pipeline="eligen.families.z_image.controlnet:EliGenZImageControlNetPipeline",
    family="eligen.families.z_image.model:Z_IMAGE_CONTROLNET",
    lora_keys="eligen.families.z_image.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.z_image.testing:save_tiny_controlnet_pipeline",
    # ZImageControlNetPipeline's own defaults (ZImagePipeline's: 50 steps, guidance_scale 5 = true CFG 6)
    defaults=SamplingDefaults(steps=50, true_cfg=6.0, guidance=None, max_sequence_length=512),
    reference=SamplingDefaults(steps=50, true_cfg=4.0, guidance=None, max_sequence_length=512),  # Z-Image's
    default_cfg="plain",
    example="--model Tongyi-MAI/Z-Image-Turbo --steps 9 --true-cfg 1 --controlnet PATH_OR_ID",
    cfg_argument="guidance_scale",
    cfg_offset=1.0,
    features=frozenset({"controlnet"}),
)

CARD = FamilyCard(
    name="z_image",
    title="Z-Image",
    pipelines=("ZImagePipeline", "EliGenZImagePipeline", *CONTROLNET_CARD.pipelines),
    transformers=("ZImageTransformer2DModel",),
    eligen_pipeline="eligen.families.z_image.pipeline:EliGenZImagePipeline",
    family="eligen.families.z_image.model:Z_IMAGE",
    lora_keys="eligen.families.z_image.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.z_image.testing:save_tiny_pipeline",
    # ZImagePipeline's own: 50 steps, guidance_scale 5 (its CFG, pos + 5 (pos - neg): true CFG 6), the empty
    # negative prompt
    defaults=SamplingDefaults(steps=50, true_cfg=6.0, guidance=None, max_sequence_length=512),
    # no EliGen reference exists for Z-Image: DiffSynth-Studio's Z-Image examples (50 steps, CFG 4); Z-Image-Turbo
    # is distilled: run it with --steps 9 --true-cfg 1, or declare them in its eligen_defaults.json
    reference=SamplingDefaults(steps=50, true_cfg=4.0, guidance=None, max_sequence_length=512),
    default_cfg="plain",
    example="--model Tongyi-MAI/Z-Image-Turbo --steps 9 --true-cfg 1",
    hub_names=r"z-image",
    cfg_argument="guidance_scale",  # ZImagePipeline: cond + g (cond - uncond), CFG when g > 0
    cfg_offset=1.0,
    variants=(CONTROLNET_CARD,),
)

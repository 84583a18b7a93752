"""Qwen-Image: diffusers' ``QwenImagePipeline`` with the reference's Qwen-Image EliGen (docs/design.md section 11),
and its edit models Qwen-Image-Edit-Plus (``QwenImageEditPlusPipeline``) and Qwen-Image-Edit
(``QwenImageEditPipeline``, one input image), on the same transformer class: a variant card each, section 21, and its
ControlNet pipeline (``QwenImageControlNetPipeline``: a variant card, section 23). The cards are torch-free; the model
is :mod:`.model`, the pipelines :mod:`.pipeline`, :mod:`.edit` and :mod:`.controlnet`, the LoRA key formats
:mod:`.lora_keys` and the tiny random test pipelines :mod:`.testing`."""

from __future__ import annotations

from ..card import FamilyCard, SamplingDefaults

# QwenImageEditPlusPipeline's own defaults (true CFG 4 needs a negative prompt); no EliGen reference exists for it
_EDIT_DEFAULTS = SamplingDefaults(steps=50, true_cfg=4.0, guidance=None, max_sequence_length=512)

EDIT_PLUS_CARD = FamilyCard(
    name="qwen_image",
    title="Qwen-Image-Edit",
    pipelines=("QwenImageEditPlusPipeline", "EliGenQwenImageEditPlusPipeline"),
    transformers=("QwenImageTransformer2DModel",),
    eligen_pipeline="eligen.families.qwen_image.edit:EliGenQwenImageEditPlusPipeline",
    family="eligen.families.qwen_image.model:QWEN_IMAGE_EDIT_PLUS",
    lora_keys="eligen.families.qwen_image.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.qwen_image.testing:save_tiny_edit_pipeline",
    defaults=_EDIT_DEFAULTS,
    reference=_EDIT_DEFAULTS,
    default_cfg="rescaled",
    example="--model Qwen/Qwen-Image-Edit-2509",
    hub_names=r"qwen.*image.*edit.*(2509|2511|plus)",
    features=frozenset({"edit"}),
)

EDIT_CARD = FamilyCard(
    name="qwen_image",
    title="Qwen-Image-Edit (single image)",
    pipelines=("QwenImageEditPipeline", "EliGenQwenImageEditPipeline"),
    transformers=("QwenImageTransformer2DModel",),
    eligen_pipeline="eligen.families.qwen_image.edit:EliGenQwenImageEditPipeline",
    family="eligen.families.qwen_image.model:QWEN_IMAGE_EDIT",
    lora_keys="eligen.families.qwen_image.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.qwen_image.testing:save_tiny_single_edit_pipeline",
    defaults=_EDIT_DEFAULTS,  # QwenImageEditPipeline's are the Plus one's
    reference=_EDIT_DEFAULTS,
    default_cfg="rescaled",
    example="--model Qwen/Qwen-Image-Edit",
    hub_names=r"qwen.*image.*edit",  # Qwen/Qwen-Image-Edit; the Plus card's pattern is tried first
    features=frozenset({"edit"}),
)

# QwenImageControlNetPipeline's own defaults (as QwenImagePipeline's)
_CONTROLNET_DEFAULTS = SamplingDefaults(steps=50, true_cfg=4.0, guidance=None, max_sequence_length=512)

CONTROLNET_CARD = FamilyCard(
    name="qwen_image",
    title="Qwen-Image ControlNet",
    pipelines=("QwenImageControlNetPipeline", "EliGenQwenImageControlNetPipeline"),
    transformers=("QwenImageTransformer2DModel",),
    eligen_pipeline="eligen.families.qwen_image.controlnet:EliGenQwenImageControlNetPipeline",
    family="eligen.families.qwen_image.model:QWEN_IMAGE_CONTROLNET",
    lora_keys="eligen.families.qwen_image.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.qwen_image.testing:save_tiny_controlnet_pipeline",
    defaults=_CONTROLNET_DEFAULTS,
    reference=SamplingDefaults(steps=40, true_cfg=4.0, guidance=None, max_sequence_length=512),  # Qwen-Image's
    default_cfg="rescaled",
    example="--model Qwen/Qwen-Image --controlnet InstantX/Qwen-Image-ControlNet-Union",
    features=frozenset({"controlnet"}),
)

CARD = FamilyCard(
    name="qwen_image",
    title="Qwen-Image",
    pipelines=("QwenImagePipeline", "EliGenQwenImagePipeline", *EDIT_PLUS_CARD.pipelines, *EDIT_CARD.pipelines,
               *CONTROLNET_CARD.pipelines),
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
    variants=(EDIT_PLUS_CARD, EDIT_CARD, CONTROLNET_CARD),
)

"""FLUX.1: diffusers' ``FluxPipeline`` with EliGen (docs/design.md section 2), its edit model FLUX.1 Kontext
(``FluxKontextPipeline``, the same transformer class: a variant card, section 21) and its ControlNet pipeline
(``FluxControlNetPipeline``: a variant card, section 23). The cards are torch-free; the model is :mod:`.model`, the
pipelines :mod:`.pipeline`, :mod:`.kontext` and :mod:`.controlnet`, the IP-Adapter :mod:`.ip_adapter`, the LoRA key
formats :mod:`.lora_keys` and the tiny random test pipelines :mod:`.testing`."""

from __future__ import annotations

from ..card import FamilyCard, SamplingDefaults

# FluxKontextPipeline's own defaults; no EliGen reference exists for Kontext, so the commands run them too
_KONTEXT_DEFAULTS = SamplingDefaults(steps=28, true_cfg=1.0, guidance=3.5, max_sequence_length=512)

KONTEXT_CARD = FamilyCard(
    name="flux",
    title="FLUX.1 Kontext",
    pipelines=("FluxKontextPipeline", "EliGenFluxKontextPipeline"),
    transformers=("FluxTransformer2DModel",),
    eligen_pipeline="eligen.families.flux.kontext:EliGenFluxKontextPipeline",
    family="eligen.families.flux.model:FLUX_KONTEXT",
    lora_keys="eligen.families.flux.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.flux.testing:save_tiny_kontext_pipeline",
    defaults=_KONTEXT_DEFAULTS,
    reference=_KONTEXT_DEFAULTS,
    default_cfg="plain",
    example="--model black-forest-labs/FLUX.1-Kontext-dev",
    hub_names=r"kontext",
    features=frozenset({"ip_adapter", "edit"}),
)

# FluxControlNetPipeline's own defaults (its guidance_scale default is 7.0, FluxPipeline's 3.5)
_CONTROLNET_DEFAULTS = SamplingDefaults(steps=28, true_cfg=1.0, guidance=7.0, max_sequence_length=512)

CONTROLNET_CARD = FamilyCard(
    name="flux",
    title="FLUX.1 ControlNet",
    pipelines=("FluxControlNetPipeline", "EliGenFluxControlNetPipeline"),
    transformers=("FluxTransformer2DModel",),
    eligen_pipeline="eligen.families.flux.controlnet:EliGenFluxControlNetPipeline",
    family="eligen.families.flux.model:FLUX_CONTROLNET",
    lora_keys="eligen.families.flux.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.flux.testing:save_tiny_controlnet_pipeline",
    defaults=_CONTROLNET_DEFAULTS,
    reference=SamplingDefaults(steps=50, true_cfg=3.0, guidance=3.5, max_sequence_length=512),  # FLUX.1's
    default_cfg="plain",
    example="--model black-forest-labs/FLUX.1-dev --controlnet InstantX/FLUX.1-dev-Controlnet-Canny",
    features=frozenset({"ip_adapter", "controlnet"}),
)

CARD = FamilyCard(
    name="flux",
    title="FLUX.1",
    pipelines=("FluxPipeline", "EliGenPipeline", *KONTEXT_CARD.pipelines, *CONTROLNET_CARD.pipelines),
    transformers=("FluxTransformer2DModel",),
    eligen_pipeline="eligen.families.flux.pipeline:EliGenPipeline",
    family="eligen.families.flux.model:FLUX",
    lora_keys="eligen.families.flux.lora_keys:KEY_FORMATS",
    tiny_pipeline="eligen.families.flux.testing:save_tiny_pipeline",
    defaults=SamplingDefaults(steps=28, true_cfg=1.0, guidance=3.5, max_sequence_length=512),
    reference=SamplingDefaults(steps=50, true_cfg=3.0, guidance=3.5, max_sequence_length=512),  # the paper's
    # the reference's FLUX.1 EliGen examples (entity control, styled entities)
    reference_negative_prompt="worst quality, low quality, monochrome, zombie, interlocked fingers, Aissist, cleavage, "
                              "nsfw",
    default_cfg="plain",
    example="--model black-forest-labs/FLUX.1-dev --lora modelscope/EliGen --overlay",
    hub_names="",  # an uncached hub id no other family claims is read as FLUX.1
    features=frozenset({"ip_adapter"}),
    variants=(KONTEXT_CARD, CONTROLNET_CARD),
)

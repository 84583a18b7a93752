"""FLUX.2: diffusers' ``Flux2Pipeline`` ([dev]) and ``Flux2KleinPipeline`` ([klein]) with EliGen (docs/design.md
section 17). One family, because both pipelines run the one transformer class (``Flux2Transformer2DModel``): the
regional processors, text positions, latent geometry, VAE normalisation, LoRA key formats and training targets are
the same, and a LoRA's layer names cannot tell the two apart. What differs (the text encoder and its template, the
CFG rule, the defaults, the "latent" output) is the [klein] variant's card and its own ``ModelFamily`` subclass and
pipeline class.

The cards are torch-free; the model is :mod:`.model`, the pipelines :mod:`.pipeline`, the LoRA key formats
:mod:`.lora_keys` and the tiny random test pipelines :mod:`.testing`.
"""

from __future__ import annotations

from ..card import FamilyCard, SamplingDefaults

_PACKAGE = "eligen.families.flux2"
_TRANSFORMERS = ("Flux2Transformer2DModel",)

# Flux2KleinPipeline: its guidance_scale (default 4) is the true CFG scale against an empty negative prompt; the
# transformer takes no embedded guidance. No EliGen reference exists for FLUX.2, so the commands run diffusers' own.
_KLEIN_DEFAULTS = SamplingDefaults(steps=50, true_cfg=4.0, guidance=None, max_sequence_length=512)

KLEIN_CARD = FamilyCard(
    name="flux2",
    title="FLUX.2 [klein]",
    pipelines=("Flux2KleinPipeline", "EliGenFlux2KleinPipeline"),
    transformers=_TRANSFORMERS,
    eligen_pipeline=f"{_PACKAGE}.pipeline:EliGenFlux2KleinPipeline",
    family=f"{_PACKAGE}.model:FLUX2_KLEIN",
    lora_keys=f"{_PACKAGE}.lora_keys:KEY_FORMATS",
    tiny_pipeline=f"{_PACKAGE}.testing:save_tiny_klein_pipeline",
    defaults=_KLEIN_DEFAULTS,
    reference=_KLEIN_DEFAULTS,
    default_cfg="plain",
    example="--model black-forest-labs/FLUX.2-klein-base-4B --overlay",
    hub_names=r"flux\.?2.*klein",
)

# Flux2Pipeline ([dev]): guidance-distilled (embedded guidance 4 by default), no negative branch in diffusers.
_DEV_DEFAULTS = SamplingDefaults(steps=50, true_cfg=1.0, guidance=4.0, max_sequence_length=512)

CARD = FamilyCard(
    name="flux2",
    title="FLUX.2",
    pipelines=("Flux2Pipeline", "EliGenFlux2Pipeline", *KLEIN_CARD.pipelines),
    transformers=_TRANSFORMERS,
    eligen_pipeline=f"{_PACKAGE}.pipeline:EliGenFlux2Pipeline",
    family=f"{_PACKAGE}.model:FLUX2",
    lora_keys=f"{_PACKAGE}.lora_keys:KEY_FORMATS",
    tiny_pipeline=f"{_PACKAGE}.testing:save_tiny_pipeline",
    defaults=_DEV_DEFAULTS,
    reference=_DEV_DEFAULTS,
    default_cfg="plain",
    example="--model black-forest-labs/FLUX.2-dev --overlay",
    hub_names=r"flux\.?2",
    variants=(KLEIN_CARD,),
)

"""FLUX.1: diffusers' ``FluxPipeline`` with EliGen (docs/design.md section 2). The card is torch-free; the model is
:mod:`.model`, the pipeline :mod:`.pipeline`, the IP-Adapter :mod:`.ip_adapter`, the LoRA key formats
:mod:`.lora_keys` and the tiny random test pipeline :mod:`.testing`."""

from __future__ import annotations

from ..card import FamilyCard, SamplingDefaults

CARD = FamilyCard(
    name="flux",
    title="FLUX.1",
    pipelines=("FluxPipeline", "EliGenPipeline"),
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
)

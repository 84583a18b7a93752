"""What eligen knows of a model family without importing torch: the card each family package exports as ``CARD``
(docs/design.md section 1). The registry (:mod:`eligen.families`) reads cards to tell a checkpoint's family from its
``model_index.json``, the CLI to describe families, and the LoRA tools to read a family's key formats; everything
that needs torch is behind the card's references (``"module:attribute"``), imported on first use.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any


def load(reference: str) -> Any:
    """``"package.module:attribute"`` -> that attribute (imports the module)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class SamplingDefaults:
    """What the family's diffusers pipeline does when a call leaves an option out (``guidance`` None: the
    transformer takes no embedded guidance)."""

    steps: int
    true_cfg: float
    guidance: float | None
    max_sequence_length: int


@dataclass(frozen=True)
class FamilyCard:
    """One model family's torch-free facts.

    ``pipelines``: the diffusers pipeline classes a checkpoint's ``model_index.json`` may name for this family (the
    EliGen pipeline classes count too: a saved EliGen pipeline names its own class). ``transformers``: the diffusers
    transformer classes. ``hub_names``: a case-insensitive regex that an uncached hub id of this family matches (the
    first family whose regex matches wins; a family with ``""`` is the fallback). ``features``: optional abilities
    (``"ip_adapter"``).

    ``variants``: a family that serves more than one diffusers pipeline on the same transformer (FLUX.2 [dev] and
    [klein]) gives each further pipeline a card of its own, with the same ``name``: its ``pipelines`` (the stock
    class and its EliGen class), ``eligen_pipeline``, ``family``, defaults and hub-id pattern. The family's own card
    then lists every class in ``pipelines``; :meth:`serving` picks the card of a checkpoint's class. A family
    without variants is one card, as before.

    ``cfg_argument``: the diffusers pipeline's own argument for its CFG scale, whose value is
    eligen's true-CFG scale ``s`` (``uncond + s (cond - uncond)``) minus ``cfg_offset`` (a pipeline whose scale ``g``
    means ``cond + g (cond - uncond)`` has offset 1); the EliGen pipeline takes that argument too, as its parent does.
    """

    name: str
    title: str
    pipelines: tuple[str, ...]
    transformers: tuple[str, ...]
    eligen_pipeline: str  # "module:Class" of the EliGen pipeline
    family: str  # "module:OBJECT" of the ModelFamily (torch)
    lora_keys: str  # "module:OBJECT" of the family's LoRA key formats (torch-free)
    tiny_pipeline: str  # "module:function(path, seed=0, **sizes) -> Path": a tiny random pipeline, for tests
    defaults: SamplingDefaults  # the diffusers pipeline's own (the Python API keeps them: zero entities == stock)
    reference: SamplingDefaults  # EliGen's reference settings for the family (what the commands run by default)
    reference_negative_prompt: str = ""  # the negative prompt of EliGen's reference examples (the benchmarks' default)
    default_cfg: str = "plain"  # the CFG combination (eligen.choices.CFG_MODES) its diffusers pipeline uses
    example: str = ""  # `eligen generate` arguments that run the family's model with its EliGen LoRA (help texts)
    hub_names: str = ""
    features: frozenset[str] = field(default_factory=frozenset)
    variants: tuple[FamilyCard, ...] = ()  # further diffusers pipelines of the family, one card each
    cfg_argument: str = "true_cfg_scale"
    cfg_offset: float = 0.0

    @property
    def pipeline_class_name(self) -> str:
        return self.eligen_pipeline.partition(":")[2]

    def all_cards(self) -> tuple[FamilyCard, ...]:
        """This card and its variants' (each variant's hub-id pattern is tried before the family's own)."""
        return (*self.variants, self)

    def serving(self, class_name: str | None) -> FamilyCard:
        """The card (a variant's, else this one) whose pipelines include ``class_name``."""
        return next((v for v in self.variants if class_name in v.pipelines), self)

    def matches_hub_id(self, hub_id: str) -> bool:
        return bool(self.hub_names) and re.search(self.hub_names, hub_id, re.IGNORECASE) is not None

"""The registry of model families (docs/design.md section 1): one line per family, torch-free.

Each family is the package ``eligen.families.<name>``, whose ``CARD`` (:class:`~.card.FamilyCard`) holds its
torch-free facts and points at the rest (its :class:`~.base.ModelFamily`, pipeline, LoRA key formats, tiny test
pipeline). Nothing outside the family packages and this registry names a family. Which family a checkpoint is
needs no torch: it is the pipeline class named in its ``model_index.json``.
"""

from __future__ import annotations

import importlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from .card import FamilyCard, load

# A new family: its package, and its name here. An uncached hub id takes the first family whose card's hub_names
# match it: Qwen-Image 2.1's before Qwen-Image's.
FAMILIES = ("flux", "qwen_image21", "qwen_image", "flux2", "z_image", "krea2")


class UnknownFamilyError(ValueError):
    """A checkpoint that is not a pipeline of a family eligen knows."""


@cache
def cards() -> dict[str, FamilyCard]:
    """Every registered family's card, in registry order."""
    return {name: importlib.import_module(f"{__name__}.{name}").CARD for name in FAMILIES}


def card(name: str) -> FamilyCard:
    if name not in FAMILIES:
        raise UnknownFamilyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return cards()[name]


def titles() -> str:
    """``"FLUX.1 or Qwen-Image"``: the families, as help texts name them."""
    names = [c.title for c in cards().values()]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def edit_titles() -> str:
    """``"FLUX.1 Kontext"``: the edit models (cards with the ``"edit"`` feature), as `eligen edit` names them."""
    return ", ".join(c.title for family in cards().values() for c in family.all_cards() if "edit" in c.features)


def family_of_pipeline_class(class_name: str | None) -> str | None:
    return next((c.name for c in cards().values() if class_name in c.pipelines), None)


def family_of_transformer(transformer: Any) -> str | None:
    """The family whose transformer class ``transformer`` is (or subclasses); None for any other module."""
    transformer = getattr(transformer, "_orig_mod", transformer)  # a torch.compile wrapper
    names = {cls.__name__ for cls in type(transformer).__mro__}
    return next((c.name for c in cards().values() if names & set(c.transformers)), None)


def controlnet_titles() -> str:
    """``"FLUX.1, Qwen-Image, Z-Image"``: the families whose ControlNet eligen runs (cards with the ``"controlnet"``
    feature)."""
    return ", ".join(family.title for family in cards().values()
                     if any("controlnet" in c.features for c in family.all_cards()))


def controlnet_card(family: FamilyCard) -> FamilyCard | None:
    """The ControlNet variant of a family's card (None: eligen runs no ControlNet on that family)."""
    main = cards()[family.name]
    return next((c for c in main.all_cards() if "controlnet" in c.features), None)


def card_of_index(index: dict[str, Any], where: str) -> FamilyCard:
    """The card serving a checkpoint whose ``model_index.json`` is ``index`` (a family's, or one of its variants')."""
    name = index.get("_class_name")
    found = family_of_pipeline_class(name)
    if found is None:
        known = ", ".join(p for c in cards().values() for p in c.pipelines if not p.startswith("EliGen"))
        raise UnknownFamilyError(f"{where} is a {name or 'unnamed'} checkpoint; eligen runs these pipelines: {known}")
    return cards()[found].serving(name)


def family_of_index(index: dict[str, Any], where: str) -> str:
    return card_of_index(index, where).name


def model_card(model: str | Path) -> FamilyCard:
    """The card serving a pipeline directory or hub id, from its ``model_index.json``: its family's, or the
    variant's whose pipeline class the checkpoint names (a family serving several diffusers pipelines).

    A hub id is looked up in the local cache only (nothing downloads here); one that is not cached is read as the
    family its name says (each card's ``hub_names``, a family's variants before the family) and left to
    ``from_pretrained`` to fetch.
    """
    from ..models import resolve_model

    path = Path(str(resolve_model(model)))
    index_file = path / "model_index.json"
    if path.is_dir():
        if not index_file.is_file():
            raise UnknownFamilyError(f"{path} has no model_index.json: not a diffusers pipeline directory")
        return card_of_index(json.loads(index_file.read_text()), str(path))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model), "model_index.json")
    except Exception:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        return card_of_index(json.loads(Path(cached).read_text()), str(model))
    named = [c for main in cards().values() for c in main.all_cards() if c.matches_hub_id(str(model))]
    fallback = [c for c in cards().values() if not c.hub_names]
    return (named or fallback or list(cards().values()))[0]


def model_family(model: str | Path) -> str:
    """The family of a pipeline directory or hub id, from its ``model_index.json`` (see :func:`model_card`)."""
    return model_card(model).name


def get_family(name: str):
    """The :class:`~eligen.families.base.ModelFamily` of ``name`` (imports torch and diffusers)."""
    return load(card(name).family)


def pipeline_class(name: str) -> type[Any]:
    """The EliGen pipeline class of a family (imports torch and diffusers); a family serving several diffusers
    pipelines: that of its own card (its variants' are :func:`model_card` ``(...).eligen_pipeline``)."""
    return load(card(name).eligen_pipeline)


def eligen_pipelines() -> dict[str, FamilyCard]:
    """Every EliGen pipeline class name (variants included) -> the card whose ``eligen_pipeline`` it is."""
    return {c.pipeline_class_name: c for main in cards().values() for c in main.all_cards()}


__all__ = ["FAMILIES", "FamilyCard", "UnknownFamilyError", "card", "card_of_index", "cards", "controlnet_card",
           "controlnet_titles", "eligen_pipelines", "family_of_index", "family_of_transformer", "get_family",
           "model_card", "model_family", "pipeline_class", "titles"]

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

FAMILIES = ("flux", "qwen_image", "krea2")  # a new family: its package, and its name here


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


def family_of_pipeline_class(class_name: str | None) -> str | None:
    return next((c.name for c in cards().values() if class_name in c.pipelines), None)


def family_of_transformer(transformer: Any) -> str | None:
    """The family whose transformer class ``transformer`` is (or subclasses); None for any other module."""
    transformer = getattr(transformer, "_orig_mod", transformer)  # a torch.compile wrapper
    names = {cls.__name__ for cls in type(transformer).__mro__}
    return next((c.name for c in cards().values() if names & set(c.transformers)), None)


def family_of_index(index: dict[str, Any], where: str) -> str:
    name = index.get("_class_name")
    found = family_of_pipeline_class(name)
    if found is None:
        known = ", ".join(p for c in cards().values() for p in c.pipelines if not p.startswith("EliGen"))
        raise UnknownFamilyError(f"{where} is a {name or 'unnamed'} checkpoint; eligen runs these pipelines: {known}")
    return found


def model_family(model: str | Path) -> str:
    """The family of a pipeline directory or hub id, from its ``model_index.json``.

    A hub id is looked up in the local cache only (nothing downloads here); one that is not cached is read as the
    family its name says (each card's ``hub_names``) and left to ``from_pretrained`` to fetch.
    """
    from ..models import resolve_model

    path = Path(str(resolve_model(model)))
    index_file = path / "model_index.json"
    if path.is_dir():
        if not index_file.is_file():
            raise UnknownFamilyError(f"{path} has no model_index.json: not a diffusers pipeline directory")
        return family_of_index(json.loads(index_file.read_text()), str(path))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model), "model_index.json")
    except Exception:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        return family_of_index(json.loads(Path(cached).read_text()), str(model))
    named = [c.name for c in cards().values() if c.matches_hub_id(str(model))]
    fallback = [c.name for c in cards().values() if not c.hub_names]
    return (named or fallback or list(FAMILIES))[0]


def get_family(name: str):
    """The :class:`~eligen.families.base.ModelFamily` of ``name`` (imports torch and diffusers)."""
    return load(card(name).family)


def pipeline_class(name: str) -> type[Any]:
    """The EliGen pipeline class of a family (imports torch and diffusers)."""
    return load(card(name).eligen_pipeline)


__all__ = ["FAMILIES", "FamilyCard", "UnknownFamilyError", "card", "cards", "family_of_index",
           "family_of_transformer", "get_family", "model_family", "pipeline_class", "titles"]

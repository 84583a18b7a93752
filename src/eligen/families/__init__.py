"""Model families behind one EliGen core (docs/design.md section 1): which family a checkpoint is, and its module.

Reading the family needs no torch: it is the pipeline class named in the checkpoint's ``model_index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILY_NAMES = ("flux", "qwen_image")
FAMILY_TITLES = {"flux": "FLUX", "qwen_image": "Qwen-Image"}
TRANSFORMER_FAMILIES = {"FluxTransformer2DModel": "flux", "QwenImageTransformer2DModel": "qwen_image"}
PIPELINE_FAMILIES = {"FluxPipeline": "flux", "EliGenPipeline": "flux", "QwenImagePipeline": "qwen_image",
                     "EliGenQwenImagePipeline": "qwen_image"}


class UnknownFamilyError(ValueError):
    """A checkpoint that is not a pipeline of a family eligen knows."""


def family_of_index(index: dict[str, Any], where: str) -> str:
    name = index.get("_class_name")
    if name not in PIPELINE_FAMILIES:
        known = ", ".join(sorted({k for k in PIPELINE_FAMILIES if not k.startswith("EliGen")}))
        raise UnknownFamilyError(f"{where} is a {name or 'unnamed'} checkpoint; eligen runs these pipelines: {known}")
    return PIPELINE_FAMILIES[name]


def model_family(model: str | Path) -> str:
    """``"flux"`` or ``"qwen_image"`` for a pipeline directory or hub id, from its ``model_index.json``.

    A hub id is looked up in the local cache only (nothing downloads here); one that is not cached is read as
    the family its name says (``Qwen/...-Image...`` is Qwen-Image, everything else FLUX) and left to
    ``from_pretrained`` to fetch.
    """
    from ..tiny.shipped import resolve_model

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
    return "qwen_image" if "qwen" in str(model).lower() and "image" in str(model).lower() else "flux"


def get_family(name: str):
    """The :class:`~eligen.families.base.ModelFamily` instance of ``name`` (imports diffusers)."""
    if name == "flux":
        from .flux import FLUX

        return FLUX
    if name == "qwen_image":
        from .qwen_image import QWEN_IMAGE

        return QWEN_IMAGE
    raise UnknownFamilyError(f"unknown model family {name!r}; known: {', '.join(FAMILY_NAMES)}")

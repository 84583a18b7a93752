"""eligen: entity-level controlled image generation (EliGen) on diffusers' diffusion transformers.

``Entity``/``Layout`` are light (numpy and PIL). Each registered model family's EliGen pipeline class is a name here
(as :data:`eligen.families.FAMILIES` registers them), imported with diffusers on first use.
"""

from __future__ import annotations

from typing import Any

from .entities import Entity, Layout, LayoutError, load_layout, save_layout
from .families import eligen_pipelines
from .families.card import load

__version__ = "0.1.0"
_PIPELINES = {name: card.eligen_pipeline for name, card in eligen_pipelines().items()}
__all__ = ["Entity", "Layout", "LayoutError", "load_layout", "reference_sigmas", "save_layout", *_PIPELINES]


def __getattr__(name: str) -> Any:
    if name in _PIPELINES:
        return load(_PIPELINES[name])
    if name == "reference_sigmas":
        from .schedules import reference_sigmas

        return reference_sigmas
    raise AttributeError(f"module 'eligen' has no attribute {name!r}")

"""eligen: entity-level controlled image generation (EliGen) on diffusers FLUX.1 and Qwen-Image.

``Entity``/``Layout`` are light (numpy and PIL); the pipelines import diffusers on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .entities import Entity, Layout, LayoutError, load_layout, save_layout

if TYPE_CHECKING:
    from .pipelines.flux import EliGenPipeline
    from .pipelines.qwen_image import EliGenQwenImagePipeline
    from .schedules import reference_sigmas

__version__ = "0.1.0"
__all__ = ["EliGenPipeline", "EliGenQwenImagePipeline", "Entity", "Layout", "LayoutError", "load_layout",
           "reference_sigmas", "save_layout"]


def __getattr__(name: str) -> Any:
    if name == "EliGenPipeline":
        from .pipelines.flux import EliGenPipeline

        return EliGenPipeline
    if name == "EliGenQwenImagePipeline":
        from .pipelines.qwen_image import EliGenQwenImagePipeline

        return EliGenQwenImagePipeline
    if name == "reference_sigmas":
        from .schedules import reference_sigmas

        return reference_sigmas
    raise AttributeError(f"module 'eligen' has no attribute {name!r}")

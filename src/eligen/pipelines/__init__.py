"""EliGen pipelines: thin diffusers subclasses, one per model family, on the shared core (:mod:`.common`)."""

from __future__ import annotations

from typing import Any


def pipeline_class(family: str) -> type:
    """The EliGen pipeline class of a model family (``"flux"`` or ``"qwen_image"``)."""
    if family == "flux":
        from .flux import EliGenPipeline

        return EliGenPipeline
    if family == "qwen_image":
        from .qwen_image import EliGenQwenImagePipeline

        return EliGenQwenImagePipeline
    from ..families import UnknownFamilyError

    raise UnknownFamilyError(f"unknown model family {family!r}")


def load_eligen_pipeline(model: str, **kwargs: Any):
    """``from_pretrained`` with the pipeline class of the checkpoint's family (read from ``model_index.json``).

    Loading bars follow ``HF_HUB_DISABLE_PROGRESS_BARS``, as transformers' do (diffusers' own ignore it).
    """
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    from ..families import model_family

    if are_progress_bars_disabled():
        diffusers_logging.disable_progress_bar()
    cls = pipeline_class(model_family(model))
    try:
        return cls.from_pretrained(model, **kwargs)
    except OSError as exc:  # a hub id that is not cached while offline, a broken download, a missing file
        import os

        hint = ""
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            hint = f"; downloads are off (HF_HUB_OFFLINE): fetch it first (huggingface-cli download {model})"
        raise ValueError(f"cannot load the model {model}: it is not a complete local pipeline folder or cached "
                         f"download{hint}") from exc

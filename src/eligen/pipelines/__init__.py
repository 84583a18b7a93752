"""EliGen pipelines: the shared call (:mod:`.call`), its arguments (:mod:`.arguments`) and entities
(:mod:`.entities`); each family's thin diffusers subclass lives in its family package."""

from __future__ import annotations

from typing import Any


def load_eligen_pipeline(model: str, **kwargs: Any):
    """``from_pretrained`` with the pipeline class of the checkpoint's family (read from ``model_index.json``).

    Loading bars follow ``HF_HUB_DISABLE_PROGRESS_BARS``, as transformers' do (diffusers' own ignore it).
    """
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    from ..families import model_card
    from ..families.card import load
    from ..models import check_model_name, loading

    if are_progress_bars_disabled():
        diffusers_logging.disable_progress_bar()
    check_model_name(model)
    cls = load(model_card(model).eligen_pipeline)
    # a hub id that is not cached while offline, a broken download, a missing file
    with loading("the model", model):
        return cls.from_pretrained(model, **kwargs)

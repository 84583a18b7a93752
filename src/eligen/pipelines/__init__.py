"""EliGen pipelines: the shared call (:mod:`.call`), its arguments (:mod:`.arguments`) and entities
(:mod:`.entities`); each family's thin diffusers subclass lives in its family package."""

from __future__ import annotations

import os
from typing import Any


def load_eligen_pipeline(model: str, **kwargs: Any):
    """``from_pretrained`` with the pipeline class of the checkpoint's family (read from ``model_index.json``).

    Loading bars follow ``HF_HUB_DISABLE_PROGRESS_BARS``, as transformers' do (diffusers' own ignore it).
    """
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    from ..families import model_card
    from ..families.card import load

    if are_progress_bars_disabled():
        diffusers_logging.disable_progress_bar()
    cls = load(model_card(model).eligen_pipeline)
    try:
        return cls.from_pretrained(model, **kwargs)
    except OSError as exc:  # a hub id that is not cached while offline, a broken download, a missing file
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            hint = f"; downloads are off (HF_HUB_OFFLINE): fetch it first (hf download {model})"
        raise ValueError(f"cannot load the model {model}: it is not a complete local pipeline folder or cached "
                         f"download{hint}") from exc

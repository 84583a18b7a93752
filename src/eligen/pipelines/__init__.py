"""EliGen pipelines: the shared call (:mod:`.call`), its arguments (:mod:`.arguments`) and entities
(:mod:`.entities`); each family's thin diffusers subclass lives in its family package."""

from __future__ import annotations

from typing import Any


def load_eligen_pipeline(model: str, controlnet: str | None = None, **kwargs: Any):
    """``from_pretrained`` with the pipeline class of the checkpoint's family (read from ``model_index.json``);
    with ``controlnet`` (a diffusers ControlNet folder or hub id), the family's ControlNet pipeline with that
    ControlNet (refused by name for a family eligen runs no ControlNet on).

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
    if controlnet is not None:
        cls, kwargs["controlnet"] = _controlnet(model, controlnet, kwargs.get("dtype"))
    # a hub id that is not cached while offline, a broken download, a missing file
    with loading("the model", model):
        return cls.from_pretrained(model, **kwargs)


def _controlnet(model: str, controlnet: str, dtype: Any) -> tuple[type, Any]:
    """The ControlNet pipeline class of the model's family and the ControlNet model loaded from ``controlnet``."""
    import diffusers

    from ..families import controlnet_card, controlnet_titles, model_card
    from ..families.card import load
    from ..models import check_model_name, loading

    card = model_card(model)
    variant = None if "edit" in card.features else controlnet_card(card)
    if variant is None:
        raise ValueError(f"--controlnet: {model} is a {card.title} model, and eligen runs no ControlNet on it; "
                         f"ControlNet runs on {controlnet_titles()}")
    check_model_name(controlnet, "--controlnet")
    cls = load(variant.eligen_pipeline)
    with loading("the ControlNet", controlnet):
        net = getattr(diffusers, cls.controlnet_class).from_pretrained(controlnet, dtype=dtype)
    return cls, net

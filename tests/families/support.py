"""What the family-generic suite shares: the tiny pipelines of the session, the call, the entities."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eligen.families import card, pipeline_class
from eligen.families.card import load
from families import oracles

# Every call of the suite: 32x32 pixels (at least 4x4 tokens, image_size), a few steps, short padded text (families
# that pad text pad to this).
HEIGHT, WIDTH = 32, 32
MIN_TOKENS = 4  # tokens per side at least, so the suite's entities leave some tokens uncovered
STEPS = 2
MAX_SEQUENCE_LENGTH = 16
PROMPT = "a red circle on a gray background"
NEGATIVE = "blurry"
TRUE_CFG = 3.0


class Tiny:
    """The session's tiny pipelines, written and loaded once per family and depth."""

    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[tuple[str, int | None], Path] = {}
        self._pipes: dict[tuple[str, int | None, bool], Any] = {}

    def directory(self, name: str, layers: int | None = None) -> Path:
        """The family's tiny pipeline directory (``layers=1``: a one-block transformer), written on first use."""
        key = (name, layers)
        if key not in self._dirs:
            writer = load(card(name).tiny_pipeline)
            self._dirs[key] = writer(self.root / f"{name}-{layers or 'full'}", seed=0, layers=layers)
        return self._dirs[key]

    def fresh(self, name: str, layers: int | None = None, stock: bool = False):
        """A newly loaded pipeline (the EliGen one, or the family's stock diffusers one), the caller's to change."""
        if stock:
            import diffusers

            cls = getattr(diffusers, card(name).pipelines[0])
        else:
            cls = pipeline_class(name)
        pipe = cls.from_pretrained(self.directory(name, layers))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def shared(self, name: str, layers: int | None = None, stock: bool = False):
        """The session's pipeline (loaded once): call it, never change it."""
        key = (name, layers, stock)
        if key not in self._pipes:
            self._pipes[key] = self.fresh(name, layers, stock)
        return self._pipes[key]


def cfg_kwargs(pipe, on: bool) -> dict[str, Any]:
    """The call arguments that switch the family's CFG on (at eligen's true-CFG scale ``TRUE_CFG``, with ``NEGATIVE``)
    or off, in its diffusers pipeline's own terms (the card's ``cfg_argument``), which its EliGen pipeline takes too."""
    family = pipe.family.card
    scale = TRUE_CFG if on else 1.0
    return {family.cfg_argument: scale - family.cfg_offset, **({"negative_prompt": NEGATIVE} if on else {})}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


NO_CFG = {"true_cfg_scale": 1.0}  # no negative branch, said explicitly: some diffusers pipelines run CFG by default


def packed(latents: torch.Tensor) -> torch.Tensor:
    """A pipeline's ``output_type="latent"`` output in the shared loop's packed layout ``(B, n_img, C)``: a family
    whose diffusers pipeline returns spatial latents ``(B, C, h, w)`` has them packed as ``_pack_latents`` packs (2x2
    patches, tokens row-major, channels ``(c, p1, p2)``)."""
    if latents.ndim == 3:
        return latents
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def image_size(pipe) -> tuple[int, int]:
    """``(height, width)`` of the suite's image for ``pipe``'s family: 32x32, or 4x4 tokens where a token is wider
    than 8 pixels."""
    token = pipe.vae_scale_factor * pipe.family.patch_size
    return max(HEIGHT, MIN_TOKENS * token), max(WIDTH, MIN_TOKENS * token)


def call_kwargs(pipe, **overrides) -> dict[str, Any]:
    """The suite's call for ``pipe``'s family: :func:`image_size`, ``STEPS`` steps, packed latents out."""
    height, width = image_size(pipe)
    kwargs = dict(prompt=PROMPT, height=height, width=width, num_inference_steps=STEPS,
                  max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="latent")
    kwargs.update(overrides)
    return kwargs


def box_mask(box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """``(height, width)`` bool, True on pixels ``x0 <= x < x1``, ``y0 <= y < y1``."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# Entity masks drawn at 48x40 (height x width), not the image's size, so the NEAREST resize to the latent grid is
# a real resampling; boxes off the token grid, so the any-pixel rule matters. Pairwise disjoint.
MASK_HEIGHT, MASK_WIDTH = 48, 40
ENTITY_PROMPTS = ("a dog", "a blue square", "a green tree")
ENTITY_MASKS = (box_mask((3, 5, 17, 21), MASK_HEIGHT, MASK_WIDTH),
                box_mask((22, 4, 37, 19), MASK_HEIGHT, MASK_WIDTH),
                box_mask((6, 29, 33, 44), MASK_HEIGHT, MASK_WIDTH))
# Replacement prompts of the same word count (one word swapped), for the locality test.
OTHER_PROMPTS = ("a cat", "a red square", "a yellow tree")


def entity_kwargs(count: int = 2, prompts=None) -> dict[str, Any]:
    """``entity_prompts`` and ``entity_masks`` (bool arrays) of the first ``count`` entities."""
    return {"entity_prompts": list(prompts or ENTITY_PROMPTS[:count]), "entity_masks": list(ENTITY_MASKS[:count])}


def accepted(pipe, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``kwargs`` that ``pipe``'s ``__call__`` takes (a stock pipeline without
    ``max_sequence_length`` gets none)."""
    parameters = inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in kwargs.items() if k in parameters}


def token_covers(pipe, masks) -> list[list[bool]]:
    """The oracle's token cover of each mask, on ``pipe``'s latent grid (its VAE scale factor, its family's patch)
    for the suite's image (:func:`image_size`)."""
    return [oracles.token_cover(m, *image_size(pipe), pipe.vae_scale_factor, pipe.family.patch_size) for m in masks]


def spy_velocity(pipe, monkeypatch) -> list[dict[str, Any]]:
    """Record every transformer forward of ``pipe``'s calls: the branch (its ``attention_mask`` and ``sequence``) and
    the latents, through ``pipe._velocity(latents, timestep, branch, geometry, guidance)``."""
    seen: list[dict[str, Any]] = []
    original = pipe._velocity

    def spy(latents, timestep, branch, geometry, guidance):
        seen.append({"branch": branch, "mask": branch.attention_mask, "sequence": branch.sequence,
                     "latents": latents})
        return original(latents, timestep, branch, geometry, guidance)

    monkeypatch.setattr(pipe, "_velocity", spy)
    return seen

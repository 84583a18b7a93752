"""A call's entities, resolved once: each mask decoded and rasterised once, each prompt encoded once.

:func:`resolve_entities` turns the entity arguments (:class:`eligen.Entity` objects, or prompts / embeddings with
masks) into :class:`ResolvedEntities`: the text segments, the binary masks at pixel precision and on the latent grid,
and the token covers, which every later step of the call (the regional mask, inpainting, the IP-Adapter, paste-back)
reads instead of decoding again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..entities import Entity, LayoutError, binarize_mask, resize_nearest
from ..masks import latent_grid_size, latent_mask, token_cover
from ..regional.sequence import TokenSequence
from .arguments import EntityArgs


@dataclass
class ResolvedEntities:
    """Text segments ``(B, T_i, D)``, masks on the latent grid ``(N, h, w)`` and their token covers ``(1, N, n_img)``;
    ``pixel_masks``: the binary masks as given (any resolution); ``entities``: the :class:`Entity` objects, if the
    call gave them."""

    embeds: list[torch.Tensor]
    latent_masks: torch.Tensor
    cover: torch.Tensor
    pixel_masks: list[np.ndarray]
    entities: list[Entity] | None = None

    @property
    def lengths(self) -> list[int]:
        return [e.shape[1] for e in self.embeds]

    def sequence(self, global_length: int) -> TokenSequence:
        """``[e_1 | ... | e_N | global]`` with these entities' segments."""
        return TokenSequence.of(self.lengths, global_length)

    def pixel_union(self, height: int, width: int) -> torch.Tensor:
        """``(height, width)`` bool: the union of the masks resized (NEAREST) to an image size."""
        union = np.zeros((height, width), dtype=bool)
        for mask in self.pixel_masks:
            union |= resize_nearest(mask, height, width)
        return torch.from_numpy(union)


def entity_latent_masks(masks: Sequence[Any], height: int, width: int, vae_scale_factor: int, patch: int = 2,
                        fields: Sequence[str] | None = None) -> torch.Tensor:
    """Binary masks of any resolution -> ``(N, h, w)`` bool on the latent grid of a ``height x width`` image
    (NEAREST). Raises :class:`LayoutError` naming the entity whose mask covers no token."""
    lat_h, lat_w = latent_grid_size(height, width, vae_scale_factor, patch)
    latents = []
    for i, mask in enumerate(masks):
        binary = mask if isinstance(mask, np.ndarray) and mask.dtype == bool else binarize_mask(mask, index=i)
        latent = latent_mask(binary, height, width, vae_scale_factor, patch)
        if not latent.any():
            field = fields[i] if fields is not None else "mask"
            side = vae_scale_factor * patch
            raise LayoutError(f"the {field} covers no token at the {lat_w}x{lat_h} latent grid of a {width}x{height} "
                              f"image (one token = {side}x{side} pixels); make it larger", entity=i, field=field)
        latents.append(latent)
    return torch.stack(latents) if latents else torch.zeros(0, lat_h, lat_w, dtype=torch.bool)


def _broadcast_batch(embeds: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``(T, D)``, ``(1, T, D)`` or ``(batch, T, D)`` -> ``(batch, T, D)``."""
    if embeds.ndim == 2:
        embeds = embeds.unsqueeze(0)
    if embeds.ndim != 3 or embeds.shape[0] not in (1, batch):
        raise ValueError(f"{what} must be (T, D), (1, T, D) or ({batch}, T, D), got {tuple(embeds.shape)}")
    return embeds.expand(batch, -1, -1)


def _masks_and_prompts(args: EntityArgs, height: int, width: int):
    """``(texts, masks, fields, entities)``: each :class:`Entity` validated and rasterised once (its mask decoded
    once), or the low-level prompts / embeddings and masks as given."""
    if args.entities is None:
        texts = args.entity_prompts if args.entity_prompts is not None else args.entity_prompt_embeds
        return texts, args.entity_masks, None, None
    entities = list(args.entities)
    masks = []
    for i, entity in enumerate(entities):
        if not isinstance(entity, Entity):
            raise TypeError(f"entities[{i}] must be an eligen.Entity, got {type(entity).__name__}")
        masks.append(entity.resolve(i, width, height))
    return [e.prompt for e in entities], masks, [e.spatial_field for e in entities], entities


def resolve_entities(pipe, args: EntityArgs, height: int, width: int, batch: int, max_sequence_length: int,
                     device: torch.device, dtype: torch.dtype, grid: tuple[int, int],
                     text_width: int | None = None) -> ResolvedEntities | None:
    """The call's entities, validated, rasterised and encoded; None when there are none.

    Boxes and polygons are drawn at ``height x width`` (the output); masks go to the latent grid of ``grid`` (the
    size the model works at). ``text_width``: the width ``D`` of the prompt's embeddings, which given entity
    embeddings must share.
    """
    texts, masks, fields, entities = _masks_and_prompts(args, height, width)
    if texts is None and masks is None:
        return None
    if texts is None or masks is None or len(texts) != len(masks):
        raise ValueError(
            "entity prompts (or `entity_prompt_embeds`) and `entity_masks` must be given together, one mask per "
            f"entity; got {0 if texts is None else len(texts)} prompts and {0 if masks is None else len(masks)} masks")
    if len(texts) == 0:
        return None
    binaries = [m if isinstance(m, np.ndarray) and m.dtype == bool else binarize_mask(m, index=i)
                for i, m in enumerate(masks)]
    latent_masks = entity_latent_masks(binaries, *grid, pipe.vae_scale_factor, pipe.family.patch_size,
                                       fields).to(device)
    if args.entity_prompts is not None or entities is not None:
        prompts = list(texts)
        encoded = pipe.encode_entity_prompts(prompts, max_sequence_length, device)
        embeds = [_broadcast_batch(e, batch, "entity prompt embeds") for e in encoded]
        if args.entity_tokens == "trim":
            embeds = pipe.family.trim_entities(pipe, embeds, prompts, max_sequence_length)
    else:
        embeds = [_broadcast_batch(e.to(device=device, dtype=dtype), batch, f"entity_prompt_embeds[{i}]")
                  for i, e in enumerate(texts)]
        for i, e in enumerate(embeds):
            if text_width is not None and e.shape[-1] != text_width:
                raise ValueError(f"entity_prompt_embeds[{i}] is {e.shape[-1]} wide but the prompt's embeddings are "
                                 f"{text_width}: encode entity prompts with the same text encoder")
    cover = token_cover(latent_masks, pipe.family.patch_size).unsqueeze(0)
    return ResolvedEntities(embeds, latent_masks, cover, binaries, entities)

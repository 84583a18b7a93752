"""Regional attention as a few unmasked attention calls: exact, and on GPU as fast as flash attention allows.

Masked kernels (dense SDPA or FlexAttention) run at a fraction of flash-attention speed. The regional mask has
a structure that needs no mask at all once the rows are grouped by what they may see (DESIGN.md section 2):

- the global prompt's rows see ``[global | image]``: one contiguous key range;
- entity ``i``'s rows see its own segment plus the image tokens ``m_i`` covers;
- an image token sees ``[global | image]`` plus the segments of the entities covering it, so image tokens
  with the same set of covering entities (a *region*) share one key set.

Softmax attention does not depend on the order of the keys, so each group is one unmasked
``scaled_dot_product_attention`` over gathered keys: ``1 + N + #regions`` calls, no ``L x L`` anything.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SegmentedMask:
    """The regional mask as row groups over a ``[e_1 | ... | e_N | global | image]`` sequence.

    ``entity_slices[i]``: the sequence slice of entity ``i``'s prompt; ``entity_image[i]``: sequence positions
    of the image tokens it covers; ``regions``: (sequence positions of image tokens, entities covering them).
    """

    entity_slices: tuple[slice, ...]
    global_slice: slice
    image_start: int
    length: int
    entity_image: tuple[torch.Tensor, ...]
    regions: tuple[tuple[torch.Tensor, tuple[int, ...]], ...]


def segmented_mask(cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int) -> SegmentedMask:
    """Group the rows of the regional mask for covers ``(1, N, n_img)`` bool (one layout for the whole batch)."""
    if cover.ndim != 3 or cover.shape[0] != 1 or cover.shape[1] != len(entity_lengths):
        raise ValueError(f"segmented attention takes one layout for the batch: cover (1, {len(entity_lengths)}, "
                         f"n_img), got {tuple(cover.shape)}; use attention='dense' or 'flex' for per-sample layouts")
    cover = cover[0].bool()
    n_entities, n_img = cover.shape
    starts = [0]
    for n in entity_lengths:
        starts.append(starts[-1] + n)
    image_start = starts[-1] + global_length
    entity_slices = tuple(slice(a, b) for a, b in itertools.pairwise(starts))
    entity_image = tuple(image_start + torch.nonzero(c).flatten() for c in cover)
    # a region = image tokens with the same covering set; its code is the set's bitmask
    weights = 2 ** torch.arange(n_entities, device=cover.device, dtype=torch.long)
    codes = (cover.long() * weights[:, None]).sum(0) if n_entities else torch.zeros(n_img, dtype=torch.long)
    regions = []
    for code in torch.unique(codes).tolist():
        members = tuple(i for i in range(n_entities) if code >> i & 1)
        regions.append((image_start + torch.nonzero(codes == code).flatten(), members))
    return SegmentedMask(entity_slices, slice(starts[-1], image_start), image_start, image_start + n_img,
                         entity_image, tuple(regions))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Unmasked attention on ``(B, S, H, D)`` tensors (the dispatcher's layout)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def segmented_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: SegmentedMask, scale: float | None = None
) -> torch.Tensor:
    """Regional attention of ``(B, L, H, D)`` query/key/value under ``mask``, as grouped unmasked calls."""
    if query.shape[1] != mask.length:
        raise ValueError(f"the segmented mask is for {mask.length} tokens, the sequence has {query.shape[1]}")
    out = torch.empty_like(query)
    g, i0 = mask.global_slice, mask.image_start
    shared_k, shared_v = key[:, g.start:], value[:, g.start:]  # [global | image]: seen by global and image rows
    out[:, g] = _attend(query[:, g], shared_k, shared_v, scale)
    for seg, covered in zip(mask.entity_slices, mask.entity_image, strict=True):
        k = torch.cat([key[:, seg], key[:, covered]], dim=1)
        v = torch.cat([value[:, seg], value[:, covered]], dim=1)
        out[:, seg] = _attend(query[:, seg], k, v, scale)
    for rows, entities in mask.regions:
        k, v = shared_k, shared_v
        if entities:
            k = torch.cat([*(key[:, mask.entity_slices[e]] for e in entities), shared_k], dim=1)
            v = torch.cat([*(value[:, mask.entity_slices[e]] for e in entities), shared_v], dim=1)
        if rows.numel() == out.shape[1] - i0:  # one region holds every image token: no gather needed
            out[:, i0:] = _attend(query[:, i0:], k, v, scale)
        else:
            out[:, rows] = _attend(query[:, rows], k, v, scale)
    return out


@contextmanager
def segmented_backend():
    """Route diffusers' ``native`` attention backend through :func:`segmented_attention` for SegmentedMask masks.

    Other masks (and calls without one) go to the native backend unchanged.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

    backends = _AttentionBackendRegistry._backends
    native = backends[AttentionBackendName.NATIVE]

    def dispatch(query, key, value, attn_mask=None, scale=None, **kwargs):
        if isinstance(attn_mask, SegmentedMask):
            return segmented_attention(query, key, value, attn_mask, scale)
        return native(query, key, value, attn_mask=attn_mask, scale=scale, **kwargs)

    backends[AttentionBackendName.NATIVE] = dispatch
    try:
        with attention_backend(AttentionBackendName.NATIVE):
            yield
    finally:
        backends[AttentionBackendName.NATIVE] = native

"""The regional mask as a dense bool tensor ``(B, 1, L, L)``: :func:`eligen.regional.rule.allowed` everywhere."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .rule import allowed, regional_tables

ROWS_PER_BAND = 1024  # query rows evaluated together (bounds the index tensors at ROWS_PER_BAND x L)


def regional_attention_mask(
    cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int
) -> torch.Tensor:
    """The regional attention mask, bool ``(B, 1, L, L)`` with ``L = sum(entity_lengths) + global_length + n_img``.

    Args:
        cover: ``(B, N, n_img)`` bool, entity ``i`` covers image token ``z``. An entity whose cover is empty is
            exactly inert (its text sees only itself), which is how batches with fewer entities are padded.
        entity_lengths: ``N`` text lengths of the entity segments (padded ones, or their real lengths).
        global_length: text length of the global prompt.
    """
    tables = regional_tables(cover, entity_lengths, global_length)
    length = tables.kind.numel()
    device = cover.device
    b = torch.arange(cover.shape[0], device=device)[:, None, None]
    keys = torch.arange(length, device=device)[None, None, :]
    bands = [allowed(tables, b, torch.arange(start, min(start + ROWS_PER_BAND, length), device=device)[None, :, None],
                     keys) for start in range(0, length, ROWS_PER_BAND)]
    return torch.cat(bands, dim=1).unsqueeze(1)

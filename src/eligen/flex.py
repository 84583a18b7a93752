"""The regional attention mask as a FlexAttention ``BlockMask``: same semantics, no ``L x L`` tensor.

A token's *kind* is its text segment (``0..N-1`` entities, ``N`` global) or ``N + 1`` for image tokens. Then
(DESIGN.md section 2)::

    allowed(q, k) = kind[q] == kind[k]                                   # own segment, image <-> image
                  | text(q) & image(k) & sees[kind[q], k - T]            # text -> covered image tokens
                  | image(q) & text(k) & sees[kind[k], q - T]            # image -> covering texts

with ``sees (B, N + 1, n_img)`` the entity covers plus an all-true row for the global prompt. The block
structure (which 128 x 128 tiles are empty, partial or full) is computed a band of query blocks at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch

from .masks import segment_ids

try:
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask = None  # type: ignore[assignment,misc]

BLOCK_SIZE = 128
ROWS_PER_BAND = 8  # query blocks evaluated together while building the block structure


_SLOTS: dict[str, tuple[SimpleNamespace, Callable]] = {}


def _make_mask_mod(tables: SimpleNamespace) -> Callable:
    """A ``mask_mod(b, h, q, k)`` reading the regional tables from ``tables`` (looked up at call time)."""

    def mask_mod(b, h, q, k):
        t = tables
        kind_q, kind_k = t.kind[q.clamp(max=t.last)], t.kind[k.clamp(max=t.last)]  # kernels may probe past the end
        image_q, image_k = kind_q == t.image_kind, kind_k == t.image_kind
        pos_q = (q - t.n_text).clamp(0, t.last_image)
        pos_k = (k - t.n_text).clamp(0, t.last_image)
        text_sees_image = ~image_q & image_k & t.sees[b, kind_q.clamp(max=t.image_kind - 1), pos_k]
        image_sees_text = image_q & ~image_k & t.sees[b, kind_k.clamp(max=t.image_kind - 1), pos_q]
        return (kind_q == kind_k) | text_sees_image | image_sees_text

    return mask_mod


def regional_mask_mod(
    cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int, slot: str | None = None
) -> Callable:
    """The ``mask_mod(b, h, q, k)`` of the regional mask for covers ``(B, N, n_img)`` bool.

    With a ``slot`` name the same function object is reused for every layout built in that slot, only its
    tables change, so a ``torch.compile``-d transformer does not recompile for a new layout of the same shape.
    Building a new mask in a slot invalidates the previous mask of that slot; without a slot every mask
    gets its own function.
    """
    batch, _, n_img = cover.shape
    device = cover.device
    text_kind = segment_ids(entity_lengths, global_length).to(device)
    image_kind = len(entity_lengths) + 1
    kind = torch.cat([text_kind, torch.full((n_img,), image_kind, dtype=torch.long, device=device)])
    sees = torch.cat([cover.bool(), torch.ones(batch, 1, n_img, dtype=torch.bool, device=device)], dim=1)
    if slot is None:
        tables, mask_mod = SimpleNamespace(), None
    else:
        if slot not in _SLOTS:
            slot_tables = SimpleNamespace()
            _SLOTS[slot] = (slot_tables, _make_mask_mod(slot_tables))
        tables, mask_mod = _SLOTS[slot]
    tables.kind, tables.sees, tables.n_text, tables.image_kind = kind, sees, text_kind.numel(), image_kind
    tables.last, tables.last_image = kind.numel() - 1, n_img - 1
    return mask_mod or _make_mask_mod(tables)


def _to_indices(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, Qb, Kb)`` bool -> (counts ``(B, H, Qb)``, indices ``(B, H, Qb, Kb)`` with the true blocks first)."""
    counts = flags.sum(-1, dtype=torch.int32)
    order = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, order.to(torch.int32)


def regional_block_mask(
    cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int, block_size: int = BLOCK_SIZE,
    slot: str | None = None,
) -> BlockMask:
    """The regional mask as a ``BlockMask`` (batch ``B`` of ``cover``, broadcast over heads).

    Equal, position by position, to :func:`eligen.masks.regional_attention_mask` of the same arguments.
    ``slot``: see :func:`regional_mask_mod`.
    """
    if BlockMask is None:  # pragma: no cover
        raise RuntimeError("FlexAttention needs torch >= 2.5; use attention='dense'")
    batch, _, n_img = cover.shape
    length = sum(entity_lengths) + global_length + n_img
    mask_mod = regional_mask_mod(cover, entity_lengths, global_length, slot)
    device = cover.device
    n_blocks = -(-length // block_size)
    keys = torch.arange(length, device=device)
    partial_flags, full_flags = [], []
    for start in range(0, n_blocks, ROWS_PER_BAND):
        stop = min(n_blocks, start + ROWS_PER_BAND)
        queries = torch.arange(start * block_size, min(stop * block_size, length), device=device)
        b = torch.arange(batch, device=device)[:, None, None]
        allowed = mask_mod(b, 0, queries[None, :, None], keys[None, None, :])  # (B, q, L)
        pad_q = (stop - start) * block_size - queries.numel()
        pad_k = n_blocks * block_size - length
        tiles = torch.nn.functional.pad(allowed.to(torch.int8), (0, pad_k, 0, pad_q), value=-1)
        tiles = tiles.view(batch, stop - start, block_size, n_blocks, block_size)
        valid = tiles >= 0
        any_on = (tiles == 1).any(dim=(2, 4))
        all_on = ((tiles == 1) | ~valid).all(dim=(2, 4))
        partial_flags.append(any_on & ~all_on)
        full_flags.append(all_on & any_on)
    partial = torch.cat(partial_flags, dim=1)[:, None]  # (B, 1, Qb, Kb)
    full = torch.cat(full_flags, dim=1)[:, None]
    kv_num, kv_idx = _to_indices(partial)
    full_num, full_idx = _to_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length)
    )

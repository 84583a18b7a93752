"""The regional mask as a FlexAttention ``BlockMask``: same rule (:mod:`.rule`), no ``L x L`` tensor.

The ``mask_mod`` is :func:`eligen.regional.rule.allowed` over tables looked up at call time. The block structure
(which 128 x 128 tiles are empty, partial or full) is computed a band of query blocks at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from .rule import RegionalTables, allowed

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask = None  # type: ignore[assignment,misc]
    flex_attention = None  # type: ignore[assignment]

BLOCK_SIZE = 128
ROWS_PER_BAND = 8  # query blocks evaluated together while building the block structure


class FlexSlot:
    """One stable ``mask_mod`` whose tables are refilled for every layout built in the slot.

    A ``torch.compile``-d transformer then keeps its graphs from layout to layout (same shapes). A pipeline owns
    its slots (one per CFG branch), so two pipelines never share tables; building a new mask in a slot
    invalidates the slot's previous mask.
    """

    def __init__(self) -> None:
        self.tables = RegionalTables()
        self.mask_mod = _make_mask_mod(self.tables)


_NAMED_SLOTS: dict[str, FlexSlot] = {}  # for scripts and benchmarks that name a slot instead of holding one


def _make_mask_mod(tables: RegionalTables) -> Callable:
    def mask_mod(b, h, q, k):
        return allowed(tables, b, q, k)

    return mask_mod


def regional_mask_mod(
    cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int, slot: FlexSlot | str | None = None
) -> Callable:
    """The ``mask_mod(b, h, q, k)`` of the regional mask for covers ``(B, N, n_img)`` bool.

    With a ``slot`` (a :class:`FlexSlot`, or a name for a process-wide one) the same function object is reused and
    only its tables change; without one every mask gets its own function.
    """
    if isinstance(slot, str):
        slot = _NAMED_SLOTS.setdefault(slot, FlexSlot())
    holder = slot if slot is not None else FlexSlot()
    holder.tables.fill(cover, entity_lengths, global_length)
    return holder.mask_mod


def _to_indices(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, Qb, Kb)`` bool -> (counts ``(B, H, Qb)``, indices ``(B, H, Qb, Kb)`` with the true blocks first)."""
    counts = flags.sum(-1, dtype=torch.int32)
    order = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, order.to(torch.int32)


def regional_block_mask(
    cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int, block_size: int = BLOCK_SIZE,
    slot: FlexSlot | str | None = None,
) -> BlockMask:
    """The regional mask as a ``BlockMask`` (batch ``B`` of ``cover``, broadcast over heads).

    Equal, position by position, to :func:`eligen.regional.dense.regional_attention_mask` of the same arguments.
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
        on = mask_mod(b, 0, queries[None, :, None], keys[None, None, :])  # (B, q, L)
        pad_q = (stop - start) * block_size - queries.numel()
        pad_k = n_blocks * block_size - length
        tiles = torch.nn.functional.pad(on.to(torch.int8), (0, pad_k, 0, pad_q), value=-1)
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


_COMPILED_FLEX: Callable | None = None


def flex_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
                scale: float | None = None) -> torch.Tensor:
    """FlexAttention of ``(B, S, H, D)`` tensors under ``block_mask`` (the call diffusers' flex backend makes).

    Eager ``flex_attention`` materialises the whole score matrix, so on CUDA a ``torch.compile``-d kernel (the
    fused, block-sparse one) is used, compiled once per process; inside an already compiled transformer the eager
    function is traced and fused there. Off CUDA the unfused reference path is the point (exact, no compile).
    """
    global _COMPILED_FLEX
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    if torch.compiler.is_compiling():
        out = flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    elif q.device.type == "cuda":
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        out = _COMPILED_FLEX(q, k, v, block_mask=block_mask, scale=scale)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    return out.permute(0, 2, 1, 3)

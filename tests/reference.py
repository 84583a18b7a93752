"""Independent, loop-based references written from docs/design.md, shared by the tests (never by the library).

The regional mask here is the suite's one mask oracle, :mod:`families.oracles` (tests/families/oracles.py).
"""

from __future__ import annotations

import torch

from families.oracles import regional_mask


def reference_mask_segments(covers: list[list[bool]], entity_lengths: list[int], global_len: int,
                            n_img: int) -> torch.Tensor:
    """The suite's mask oracle (:func:`families.oracles.regional_mask`) as a ``(1, 1, L, L)`` bool tensor, for
    ``[e_1 | ... | e_N | global | image]`` with segments of any lengths."""
    return torch.from_numpy(regional_mask(covers, entity_lengths, global_len, n_img))[None, None]


def reference_mask(covers: list[list[bool]], entity_len: int, global_len: int, n_img: int) -> torch.Tensor:
    """:func:`reference_mask_segments` with every entity segment ``entity_len`` tokens long (FLUX's padded text)."""
    return reference_mask_segments(covers, [entity_len] * len(covers), global_len, n_img)


def read_deltas(weights) -> dict[str, torch.Tensor]:
    """Effective deltas of ``eligen.lora`` layers, computed from their tensors as (alpha / r) B @ A."""
    out = {}
    for name, layer in weights.items():
        rank = layer.down.shape[0]
        scale = (layer.alpha if layer.alpha is not None else rank) / rank
        out[name] = scale * layer.up.double() @ layer.down.double()
    return out

"""The regional mask under diffusers' context parallelism (Ulysses), pure functions (docs/design.md section 24).

Under ``ContextParallelConfig(ulysses_degree=W)`` the transformer's ``_cp_plan`` splits the text and the image
tokens into ``W`` equal chunks (rank ``r`` holds text chunk ``r`` and image chunk ``r``) and every joint attention
concatenates them text first, so rank ``r``'s local sequence is ``[text_r | image_r]``. Ulysses' all-to-all then
hands each rank all ``L`` positions (for ``H / W`` heads) in rank order, ``[text_0 | image_0 | text_1 | image_1 |
...]``, and applies the mask it is given to that gathered sequence as it is. The single-device mask, in the order
``[text | image]``, therefore reaches attention permuted by :func:`gathered_order` on both axes.
"""

from __future__ import annotations

from typing import Any

import torch


def gathered_order(text_length: int, image_length: int, degree: int) -> torch.Tensor:
    """``(L,)`` long: the single-device position (``[text | image]`` order) of each position of the sequence Ulysses
    gathers, ``[text_0 | image_0 | ... | text_{W-1} | image_{W-1}]``, with ``L = text_length + image_length``.

    Both lengths must divide by ``degree`` (diffusers' equipartition sharder asserts the same)."""
    for name, length in (("text", text_length), ("image", image_length)):
        if length % degree:
            raise ValueError(f"context parallelism splits the {name} tokens ({length}) into {degree} equal parts; "
                             f"choose a size (or max_sequence_length) whose token count divides by {degree}")
    text = torch.arange(text_length).reshape(degree, -1)
    image = torch.arange(text_length, text_length + image_length).reshape(degree, -1)
    return torch.cat([text, image], dim=1).flatten()


def gathered_mask(mask: torch.Tensor, text_length: int, image_length: int, degree: int) -> torch.Tensor:
    """The regional mask ``(B, 1, L, L)`` in the single-device order, rows and columns both in the gathered order
    (what every rank passes to Ulysses attention: it attends all ``L`` queries to all ``L`` keys)."""
    order = gathered_order(text_length, image_length, degree).to(mask.device)
    return mask.index_select(-2, order).index_select(-1, order)


def ulysses_degree(parallel_config: Any) -> int:
    """The Ulysses degree of a diffusers ``ParallelConfig`` (1: no context parallelism); refuses by name what
    cannot carry the regional mask (docs/design.md section 24)."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return 1
    if cp.ring_degree > 1:
        raise ValueError(
            f"ring attention (ring_degree={cp.ring_degree}) cannot carry the EliGen regional mask: diffusers' ring "
            "passes every key block the same full mask, which is the wrong columns for all but one block; use "
            "ContextParallelConfig(ulysses_degree=N) instead")
    if getattr(cp, "ulysses_anything", False):
        raise ValueError("ContextParallelConfig(ulysses_anything=True) pads uneven shards, which the EliGen regional "
                         "mask does not follow; use ulysses_anything=False with sizes that divide by the degree")
    return int(cp.ulysses_degree)


def context_parallel_mask(mask: Any, parallel_config: Any, text_length: int, image_length: int) -> Any:
    """``mask`` as the transformer must receive it under ``parallel_config`` (None: unchanged). ``text_length`` and
    ``image_length`` are the single-device (full) lengths. Only the dense form is carried."""
    degree = ulysses_degree(parallel_config)
    if mask is None or degree == 1:
        return mask
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"the {type(mask).__name__} form of the regional mask cannot run under context "
                         "parallelism (only diffusers' dispatcher is parallelised); pass attention='dense'")
    return gathered_mask(mask, text_length, image_length, degree)


def check_context_parallel(transformer: Any, form: str, family: str, supported: bool) -> None:
    """Raise ``ValueError`` when ``transformer`` runs under context parallelism that the regional mask cannot follow:
    a family whose forward does not reorder the mask, a form other than ``dense``, ring attention."""
    config = getattr(transformer, "_parallel_config", None)
    if getattr(config, "context_parallel_config", None) is None:
        return
    if not supported:
        raise ValueError(f"entities under context parallelism are not supported for {family}; run it on one device "
                         "(without `transformer.enable_parallelism`)")
    if form != "dense":
        raise ValueError(f"the {form} form of the regional mask cannot run under context parallelism (only "
                         "diffusers' dispatcher is parallelised); pass attention='dense'")
    ulysses_degree(config)


def local_text_rope(freqs: torch.Tensor, positions: torch.Tensor, parallel_config: Any) -> torch.Tensor:
    """The rotary table rows of this rank's text tokens when each segment restarts its positions.

    ``freqs``: the transformer's text table, ``(T, d)`` on one device or, under context parallelism, this rank's
    chunk ``(T / W, d)`` (the ``_cp_plan`` splits ``pos_embed``'s output); ``positions (T,)`` long: every text
    token's row in the full table. Returns ``(T, d)`` or this rank's ``(T / W, d)``: the full table is gathered from
    the ranks and indexed by this rank's chunk of ``positions``."""
    if freqs.shape[0] == positions.shape[0]:
        return freqs[positions]
    mesh = parallel_config.context_parallel_config._flattened_mesh
    group = mesh.get_group()
    real = torch.view_as_real(freqs) if freqs.is_complex() else freqs
    parts = [torch.empty_like(real) for _ in range(mesh.size())]
    torch.distributed.all_gather(parts, real.contiguous(), group=group)
    full = torch.cat(parts, dim=0)
    full = torch.view_as_complex(full) if freqs.is_complex() else full
    return full[positions.chunk(mesh.size())[torch.distributed.get_rank(group)]]

"""Regional attention as a few unmasked attention calls: exact, and on GPU as fast as flash attention allows.

Masked kernels (dense SDPA or FlexAttention) run at a fraction of flash-attention speed. The regional mask has
a structure that needs no mask at all (docs/design.md section 2, the rule of :mod:`.rule`):

- the global prompt's rows and the image rows all see ``[global | image]``: one contiguous key range, so one
  unmasked call over the ``[global | image]`` rows, the very call the plain model makes (no gathers);
- an image token also sees the segment of every entity covering it. Attention over a union of key sets is the
  merge of attention over each set, weighted by the sets' log-sum-exps ``l_j``:
  ``out = sum_j exp(l_j - logsumexp(l)) out_j``. So the image tokens entity ``i`` covers attend to its segment
  in one more call, and their rows are merged in place;
- entity ``i``'s rows see its own segment plus the image tokens ``m_i`` covers: one call over gathered keys.

``1 + 2N`` calls, no ``L x L`` anything, and no copy of the ``[global | image]`` keys.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SegmentedMask:
    """The regional mask as row groups over a ``[e_1 | ... | e_N | global | image]`` sequence.

    ``entity_slices[i]``: the sequence slice of entity ``i``'s prompt; ``entity_image[i]``: the image tokens it
    covers (positions among the image tokens); ``entity_keys[i]``: the sequence positions entity ``i``'s rows see
    (its segment, then its covered image tokens). Both are marked dynamic, so a compiled transformer does not
    recompile for a new layout; ``flash``: the device has flash-attention kernels that return log-sum-exps (CUDA,
    compute capability 8+).
    """

    entity_slices: tuple[slice, ...]
    global_slice: slice
    image_start: int
    length: int
    entity_image: tuple[torch.Tensor, ...]
    entity_keys: tuple[torch.Tensor, ...]
    flash: bool = False


def segmented_mask(cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int) -> SegmentedMask:
    """Group the rows of the regional mask for covers ``(1, N, n_img)`` bool (one layout for the whole batch)."""
    if cover.ndim != 3 or cover.shape[0] != 1 or cover.shape[1] != len(entity_lengths):
        raise ValueError(f"segmented attention takes one layout for the batch: cover (1, {len(entity_lengths)}, "
                         f"n_img), got {tuple(cover.shape)}; use attention='dense' or 'flex' for per-sample layouts")
    cover = cover[0].bool()
    starts = [0]
    for n in entity_lengths:
        starts.append(starts[-1] + n)
    image_start = starts[-1] + global_length
    entity_slices = tuple(slice(a, b) for a, b in itertools.pairwise(starts))
    entity_image = tuple(torch.nonzero(c).flatten() for c in cover)
    entity_keys = tuple(torch.cat([torch.arange(s.start, s.stop, device=cover.device), image_start + covered])
                        for s, covered in zip(entity_slices, entity_image, strict=True))
    for positions in (*entity_image, *entity_keys):  # one compiled graph for every layout: the sizes are symbolic
        torch._dynamo.maybe_mark_dynamic(positions, 0)
    flash = cover.device.type == "cuda" and torch.cuda.get_device_capability(cover.device) >= (8, 0)
    return SegmentedMask(entity_slices, slice(starts[-1], image_start), image_start, image_start + cover.shape[1],
                         entity_image, entity_keys, flash)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Unmasked attention on ``(B, S, H, D)`` tensors (the dispatcher's layout)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _lse_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, flash: bool):
    """The fused kernel for ``(B, H, S, D)`` tensors on CUDA: flash attention where ``flash`` allows (compute
    capability 8+, half precision, head size a multiple of 8 up to 256), else memory-efficient attention."""
    if flash and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]  # the log-sum-exp is padded to a multiple of 32 rows


def _lse_formula(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """``softmax(q k^T * scale) v`` and ``logsumexp(q k^T * scale)`` written out, in fp32."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    lse = scores.logsumexp(-1)
    return torch.einsum("bhqk,bhkd->bhqd", (scores - lse[..., None]).exp(), v.float()).to(q.dtype), lse


def attend_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, flash: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of ``(B, S, H, D)`` tensors and its log-sum-exp: ``(B, S, H, D)``, ``(B, H, S)`` fp32.

    Fused kernels that return the log-sum-exp on CUDA (see :func:`_lse_kernel`) and on the CPU, the explicit
    formula elsewhere.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type == "cuda":
        out, lse = _lse_kernel(q, k, v, scale, flash)
    elif q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    else:
        out, lse = _lse_formula(q, k, v, scale)
    return out.transpose(1, 2), lse.float()


def merge_attention(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a union of key sets from attention over each set: ``(B, S, H, D)`` outputs and ``(B, H, S)``
    log-sum-exps (``-inf`` where a set is empty for a row) -> ``sum_j softmax_j(l_j) out_j`` (in ``outs[0]``'s
    dtype) and the union's log-sum-exp ``logsumexp_j l_j``."""
    lse_list = cast("list[torch.Tensor]", lses)  # torch.stack takes any sequence; its stub says list or tuple
    lse = torch.stack(lse_list).logsumexp(0)
    weights = (torch.stack(lse_list) - lse).exp().transpose(-1, -2).unsqueeze(-1)  # (J, B, S, H, 1)
    merged = outs[0].float() * weights[0]
    for out, weight in zip(outs[1:], weights[1:], strict=True):
        merged = merged + out.float() * weight
    return merged.to(outs[0].dtype), lse


def segmented_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: SegmentedMask, scale: float | None = None
) -> torch.Tensor:
    """Regional attention of ``(B, L, H, D)`` query/key/value under ``mask``, as unmasked calls merged by
    log-sum-exp."""
    if query.shape[1] != mask.length:
        raise ValueError(f"the segmented mask is for {mask.length} tokens, the sequence has {query.shape[1]}")
    out = torch.empty_like(query)
    g, i0 = mask.global_slice.start, mask.image_start
    shared, shared_lse = attend_lse(query[:, g:], key[:, g:], value[:, g:], scale, mask.flash)
    out[:, g:i0] = shared[:, : i0 - g]
    image, image_lse = shared[:, i0 - g:].float(), shared_lse[..., i0 - g:].contiguous()
    for seg, rows, seen_keys in zip(mask.entity_slices, mask.entity_image, mask.entity_keys, strict=True):
        # entity i's rows: its own segment and the image tokens it covers
        out[:, seg] = _attend(query[:, seg], key[:, seen_keys], value[:, seen_keys], scale)
        if rows.numel():  # the image rows it covers also see its segment: merge that in
            seen, seen_lse = attend_lse(query[:, i0:][:, rows], key[:, seg], value[:, seg], scale, mask.flash)
            image[:, rows], image_lse[..., rows] = merge_attention([image[:, rows], seen],
                                                                   [image_lse[..., rows], seen_lse])
    out[:, i0:] = image
    return out

"""The one sampling loop of every model family: Euler steps on a velocity, true CFG, inpainting fusion, callbacks.

``z_{t-1} = z_t + v (sigma_{t-1} - sigma_t)`` (the flow-matching scheduler's step), where ``v`` is the positive
branch's velocity, combined with the negative one by the family's CFG rule, and for inpainting fused with the
background velocity by the entity union (docs/design.md section 5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .inpaint import background_velocity, fuse_velocity

Velocity = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]  # (latents, t, "cond" | "uncond") -> v
Combine = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (positive, negative, scale) -> v


@dataclass
class Fusion:
    """Inpainting: the input's packed latents ``(B, n_img, C)``, the soft union ``(n_img, C)`` in [0, 1], the
    fusion order and the index of the first step run (``strength`` below 1 skips the first ones)."""

    z_init: torch.Tensor
    union: torch.Tensor
    order: str
    t_start: int


def denoise(
    velocity: Velocity,
    latents: torch.Tensor,
    scheduler,
    timesteps: torch.Tensor,
    cfg_scale: float | None,
    combine: Combine,
    fusion: Fusion | None = None,
    on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress_bar=None,
    interrupted: Callable[[], bool] = lambda: False,
    branch_at: Callable[[int, str], str] | None = None,
) -> torch.Tensor:
    """Run ``timesteps`` from ``latents`` ``(B, n_img, C)``; ``cfg_scale`` None means no negative branch.

    ``on_step_end(i, t, latents) -> latents`` runs after every step (diffusers' ``callback_on_step_end``).
    ``branch_at(i, "cond" | "uncond") -> name`` picks the branch a step runs (default: that one itself), e.g.
    one without entities after the first steps (``entity_steps``, approximate).
    """
    branch_at = branch_at or (lambda i, name: name)
    warmup = max(len(timesteps) - len(timesteps) * scheduler.order, 0)
    for i, t in enumerate(timesteps):
        if interrupted():
            continue
        v = velocity(latents, t, branch_at(i, "cond"))
        v_neg = velocity(latents, t, branch_at(i, "uncond")) if cfg_scale is not None else None
        if fusion is not None:
            sigma = scheduler.sigmas[fusion.t_start + i].to(device=latents.device, dtype=latents.dtype)
            background = background_velocity(latents, fusion.z_init, sigma)
            v = fuse_velocity(v, v_neg, background, fusion.union, cfg_scale, fusion.order, combine)
        elif v_neg is not None:
            assert cfg_scale is not None  # v_neg exists only with a cfg_scale
            v = combine(v, v_neg, cfg_scale)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        if fusion is not None and (fusion.order == "exact" or v_neg is None) and i == len(timesteps) - 1:
            # the last step lands on sigma 0, where the background velocity leads exactly to z_init (in both orders
            # without CFG); float rounding leaves it ~1e-7 off, so the background is set to z_init itself
            # (docs/design.md section 5)
            latents = torch.where(fusion.union == 0, fusion.z_init, latents)
        if on_step_end is not None:
            latents = on_step_end(i, t, latents)
        last = i == len(timesteps) - 1
        if progress_bar is not None and (last or ((i + 1) > warmup and (i + 1) % scheduler.order == 0)):
            progress_bar.update()
    return latents

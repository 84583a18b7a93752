"""Rectified-flow training maths (docs/design.md section 6): drawing noise levels, the loss. Each family's
training schedule (its noise levels and their weights) is the family's own (``ModelFamily.training_schedule``).

``x_sigma = (1 - sigma) x0 + sigma * noise``; the DiT predicts the velocity ``noise - x0``.
"""

from __future__ import annotations

import hashlib

import torch

from ..choices import TIMESTEP_SAMPLING
from ..schedules import TrainingSchedule


def batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator for global batch ``index`` of ``epoch`` (its place in the sampler's order of all batches, before
    they are dealt to the processes): every random draw of that batch (the entity-drop coin, the noise, the noise
    levels) comes from it, so the draws depend on the batch and not on which process takes it or how many there are.
    Seeded with the first 8 bytes (little-endian) of ``sha256("eligen-batch:{seed}:{epoch}:{index}")``: neighbouring
    seeds, epochs and batches get unrelated streams (docs/design.md section 6.1)."""
    if min(epoch, index) < 0:
        raise ValueError(f"epoch and batch index must be >= 0, got epoch={epoch}, index={index}")
    digest = hashlib.sha256(f"eligen-batch:{seed}:{epoch}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def sample_sigmas(
    batch: int, mode: str, generator: torch.Generator, schedule: TrainingSchedule | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels and loss weights ``(B,)`` each.

    ``reference``: uniform over the family's training ``schedule``'s levels, with its weights; ``logit_normal``:
    ``sigmoid(N(0, 1))`` (SD3), weight 1.
    """
    if mode == "reference":
        if schedule is None:
            raise ValueError("timestep sampling 'reference' needs the family's training schedule")
        index = torch.randint(0, schedule.sigmas.numel(), (batch,), generator=generator)
        return schedule.sigmas[index], schedule.weights[index]
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator)), torch.ones(batch)
    raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING}, got {mode!r}")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise`` with ``sigmas (B,)`` broadcast over the other axes."""
    s = sigmas.view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def per_sample_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE to the velocity target ``noise - x0`` per sample: ``(B,)`` in float32."""
    return (prediction.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)


def flow_loss(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The training loss: per-sample losses ``(B,)`` times their weights, averaged over the batch."""
    return (per_sample * weights.to(per_sample)).mean()

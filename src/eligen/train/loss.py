"""Rectified-flow training maths (docs/design.md section 6): noise levels, their weights, the loss.

``x_sigma = (1 - sigma) x0 + sigma * noise``; the DiT predicts the velocity ``noise - x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..schedules import REFERENCE_SHIFT, shift_sigmas

TIMESTEP_SAMPLING = ("reference", "logit_normal")


@dataclass(frozen=True)
class TrainingSchedule:
    """The reference trainer's 1000 training noise levels and their loss weights, ``(T,)`` each."""

    sigmas: torch.Tensor
    weights: torch.Tensor


def reference_schedule(num_train_timesteps: int = 1000, shift: float = REFERENCE_SHIFT) -> TrainingSchedule:
    """Shift-3 sigmas over ``linspace(1, 0, T + 1)[:-1]`` with weight ``exp(-2 ((t - T/2) / T)^2)``, shifted to a
    minimum of 0 and normalised to mean 1 (``t = T * sigma``)."""
    steps = num_train_timesteps
    return _bell_weighted(shift_sigmas(torch.linspace(1.0, 0.0, steps + 1)[:-1], shift), steps)


def _bell_weighted(sigmas: torch.Tensor, steps: int) -> TrainingSchedule:
    """The reference's loss weights over ``t = T * sigma``: ``exp(-2 ((t - T/2) / T)^2)``, min 0, mean 1."""
    timesteps = sigmas * steps
    bell = torch.exp(-2 * ((timesteps - steps / 2) / steps) ** 2)
    bell = bell - bell.min()
    return TrainingSchedule(sigmas=sigmas, weights=bell * (steps / bell.sum()))


QWEN_SHIFT_MU = 0.8  # the reference's Qwen-Image scheduler: exponential shift with mu 0.8, terminal sigma 0.02
QWEN_SHIFT_TERMINAL = 0.02


def qwen_reference_schedule(num_train_timesteps: int = 1000, mu: float = QWEN_SHIFT_MU,
                            terminal: float = QWEN_SHIFT_TERMINAL) -> TrainingSchedule:
    """The reference's Qwen-Image training levels: ``linspace(1, 0, T + 1)[:-1]`` shifted exponentially,
    ``s -> e^mu / (e^mu + 1/s - 1)``, then stretched so the last level is ``terminal``; the same bell weights."""
    steps = num_train_timesteps
    sigmas = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    one_minus = 1 - sigmas
    sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    return _bell_weighted(sigmas, steps)


def sample_sigmas(
    batch: int, mode: str, generator: torch.Generator, schedule: TrainingSchedule | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels and loss weights ``(B,)`` each.

    ``reference``: uniform over the training schedule's levels, with its weights; ``logit_normal``:
    ``sigmoid(N(0, 1))`` (SD3), weight 1.
    """
    if mode == "reference":
        schedule = schedule or reference_schedule()
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

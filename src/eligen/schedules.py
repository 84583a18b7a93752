"""Noise schedules (docs/design.md section 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

REFERENCE_SHIFT = 3.0
REFERENCE_SIGMA_MIN = 0.003 / 1.002


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static flow-matching shift ``s -> shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def reference_sigmas(num_inference_steps: int, shift: float = REFERENCE_SHIFT) -> list[float]:
    """The reference implementation's static schedule: ``shift(linspace(1, 0.003/1.002, N))`` in float32.

    The scheduler appends the final sigma 0 and uses ``timestep = 1000 * sigma``. Pass the result with
    ``shift_sigmas=False`` so the pipeline uses it verbatim instead of shifting it again by resolution::

        pipe(..., sigmas=reference_sigmas(50), shift_sigmas=False)
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    sigmas = torch.linspace(1.0, REFERENCE_SIGMA_MIN, num_inference_steps, dtype=torch.float32)
    return shift_sigmas(sigmas, shift).tolist()


@dataclass(frozen=True)
class TrainingSchedule:
    """A family's training noise levels and their loss weights, ``(T,)`` each (docs/design.md section 6)."""

    sigmas: torch.Tensor
    weights: torch.Tensor


def bell_weighted(sigmas: torch.Tensor) -> TrainingSchedule:
    """The reference trainer's loss weights over ``t = T * sigma``: ``exp(-2 ((t - T/2) / T)^2)``, shifted to a
    minimum of 0 and normalised to mean 1 (``T`` = the number of levels)."""
    steps = sigmas.numel()
    timesteps = sigmas * steps
    bell = torch.exp(-2 * ((timesteps - steps / 2) / steps) ** 2)
    bell = bell - bell.min()
    return TrainingSchedule(sigmas=sigmas, weights=bell * (steps / bell.sum()))


def shifted_training_schedule(num_train_timesteps: int = 1000, shift: float = REFERENCE_SHIFT) -> TrainingSchedule:
    """Static-shift sigmas over ``linspace(1, 0, T + 1)[:-1]`` with the bell weights (the reference's shift-3
    trainer)."""
    return bell_weighted(shift_sigmas(torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1], shift))


def exponential_training_schedule(num_train_timesteps: int, mu: float, terminal: float) -> TrainingSchedule:
    """``linspace(1, 0, T + 1)[:-1]`` shifted exponentially, ``s -> e^mu / (e^mu + 1/s - 1)``, then stretched so the
    last level is ``terminal``; the bell weights."""
    sigmas = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    one_minus = 1 - sigmas
    return bell_weighted(1 - one_minus / (one_minus[-1] / (1 - terminal)))


def resolution_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                     max_shift: float) -> float:
    """diffusers' resolution-dependent shift ``mu``: linear in the image token count between the two anchors."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flow_timesteps(scheduler, num_inference_steps: int, sigmas, shift_sigmas: bool, image_seq_len: int,
                   device: torch.device, mu: float | None = None):
    """Set up a flow-matching scheduler exactly as diffusers' flow-matching pipelines do (a
    resolution-dependent shift ``mu``, unless ``mu`` is given); ``shift_sigmas=False`` uses ``sigmas`` verbatim.
    Returns the scheduler used (a copy for verbatim sigmas), its timesteps and their number (given sigmas set the
    number of steps)."""
    if not shift_sigmas:
        if sigmas is None:
            raise ValueError("`shift_sigmas=False` needs explicit `sigmas`, e.g. eligen.reference_sigmas(50)")
        # shift 1 without dynamic shifting is the identity, so the given sigmas are used exactly.
        scheduler = type(scheduler).from_config(scheduler.config, use_dynamic_shifting=False, shift=1.0)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    config = scheduler.config
    if mu is None:
        mu = resolution_shift(image_seq_len, config.get("base_image_seq_len", 256),
                              config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                              config.get("max_shift", 1.15))
    if sigmas is None:  # as diffusers' retrieve_timesteps: given sigmas set the number of steps
        scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler, scheduler.timesteps, len(scheduler.timesteps)

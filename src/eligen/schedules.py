"""Noise schedules (docs/design.md section 3)."""

from __future__ import annotations

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

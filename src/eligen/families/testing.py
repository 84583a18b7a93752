"""Test support shared by the families' ``testing`` modules (never imported by the library)."""

from __future__ import annotations

import math

import torch


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter so no layer is zero-initialised: weights ~ N(0, 1/fan_in), 1-D ~ 1 + N(0, 0.1)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(1.0 + 0.1 * noise)

"""Test support shared by the families' ``testing`` modules (never imported by the library)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class RealShapes:
    """A released transformer's shapes, for benchmarks on random weights (``benchmarks/family_overhead.py --shapes
    real``): ``config`` the diffusers transformer's arguments (its released ``config.json``'s widths and depths),
    ``source`` where they were read; ``latent_dim`` and ``text_dim`` the last axis of the packed latents ``(B, n_img,
    C)`` and of the text ``(B, T, D)`` that the EliGen pipeline hands the transformer (``pooled_dim``: of the pooled
    text vector, if the family has one); ``text_tokens`` the global prompt's length in tokens (the pipeline's padded
    length, or for a family that does not pad a long prompt's); ``depth`` the config keys that count blocks (a
    benchmark may cap them); ``token_pixels`` the pixels per token side (VAE factor times patch)."""

    name: str
    config: dict[str, Any]
    source: str
    latent_dim: int
    text_dim: int
    text_tokens: int
    depth: tuple[str, ...]
    pooled_dim: int | None = None
    token_pixels: int = 16

    def __post_init__(self) -> None:
        missing = [key for key in self.depth if key not in self.config]
        if missing:
            raise ValueError(f"{self.name}: depth keys {missing} are not in its config; name config keys that count "
                             "blocks")
        if min(self.latent_dim, self.text_dim, self.text_tokens, self.token_pixels) < 1:
            raise ValueError(f"{self.name}: latent_dim, text_dim, text_tokens and token_pixels must be positive")

    def capped(self, layers: int | None) -> dict[str, Any]:
        """The config with at most ``layers`` blocks in each block list (None: as released)."""
        if layers is None:
            return dict(self.config)
        return {**self.config, **{key: min(self.config[key], layers) for key in self.depth}}

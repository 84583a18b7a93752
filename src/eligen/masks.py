"""Pure mask maths: pixel mask -> latent grid -> token cover (the regional mask itself: :mod:`eligen.regional`).

The rules are docs/design.md section 2 (the reference implementation's), the same for every family:

- a mask is resized with NEAREST to the latent grid ``(h, w) = (H // f, W // f)`` rounded down to the
  packing grid, where ``f`` is the pipeline's VAE scale factor;
- a token (``p x p`` latent pixels after packing; ``p`` is the family's patch size, usually 2) is covered if ANY
  of its latent pixels is.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange, reduce

from .entities import resize_nearest

PACK = 2  # latent pixels per token side, unless a family says otherwise (ModelFamily.patch_size)


def latent_grid_size(height: int, width: int, vae_scale_factor: int, patch: int = PACK) -> tuple[int, int]:
    """Latent ``(h, w)`` exactly as diffusers' ``prepare_latents`` compute it (a multiple of the ``patch``)."""
    return patch * (int(height) // (vae_scale_factor * patch)), patch * (int(width) // (vae_scale_factor * patch))


def token_cover(latent_mask: torch.Tensor, patch: int = PACK) -> torch.Tensor:
    """``(..., h, w)`` bool latent mask -> ``(..., h/p * w/p)`` bool: a token is covered if any pixel is.

    Token order is row-major over the ``(h/p, w/p)`` grid, the order of the pipelines' ``_pack_latents``.
    """
    cover = reduce(latent_mask.to(torch.uint8), "... (h p1) (w p2) -> ... h w", "max", p1=patch, p2=patch)
    return rearrange(cover, "... h w -> ... (h w)").bool()


def latent_mask(mask: np.ndarray, height: int, width: int, vae_scale_factor: int, patch: int = PACK) -> torch.Tensor:
    """A binary pixel mask of any resolution -> ``(h, w)`` bool on the latent grid of a ``height x width`` image."""
    return torch.from_numpy(resize_nearest(mask, *latent_grid_size(height, width, vae_scale_factor, patch)))


def mask_tokens(mask: np.ndarray, height: int, width: int, vae_scale_factor: int, patch: int = PACK) -> torch.Tensor:
    """A binary pixel mask of any resolution -> ``(n_img,)`` bool token cover for an ``height x width`` image."""
    return token_cover(latent_mask(mask, height, width, vae_scale_factor, patch), patch)


def pixel_masks_to_covers(masks: torch.Tensor, vae_scale_factor: int, patch: int = PACK) -> torch.Tensor:
    """Training batches: ``(B, N, H, W)`` bool pixel masks -> ``(B, N, n_img)`` token covers (empty stays empty)."""
    batch, n, height, width = masks.shape
    lat_h, lat_w = latent_grid_size(height, width, vae_scale_factor, patch)
    flat = masks.reshape(batch * n, height, width).cpu().numpy()
    latents = [latent_mask(m, height, width, vae_scale_factor, patch) for m in flat]  # the inference path's rule
    latent = torch.stack(latents) if latents else torch.zeros(0, lat_h, lat_w, dtype=torch.bool)
    return token_cover(latent, patch).reshape(batch, n, (lat_h // patch) * (lat_w // patch)).to(masks.device)


def reference_cover(cover: torch.Tensor, tokens: int) -> torch.Tensor:
    """Entity covers ``(B, N, n_img)`` -> ``(B, N, n_img + tokens)`` for an edit model that appends ``tokens``
    reference-image tokens after the image tokens: every entity covers every one of them, so under the regional rule
    each token sees them and they see each token (docs/design.md section 21)."""
    extra = torch.ones(*cover.shape[:-1], tokens, dtype=cover.dtype, device=cover.device)
    return torch.cat([cover, extra], dim=-1)

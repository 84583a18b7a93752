"""Pure mask maths: pixel mask -> latent grid -> token cover -> regional attention mask.

The rules are DESIGN.md section 2 (the reference implementation's):

- a mask is resized with NEAREST to the latent grid ``(h, w) = (H // f, W // f)`` rounded down to the
  packing grid, where ``f`` is the pipeline's VAE scale factor;
- a token (2x2 latent pixels after FLUX packing) is covered if ANY of its 4 latent pixels is;
- the sequence is ``[e_1 | ... | e_N | global | image]`` and the bool mask (True = may attend) lets an
  image token see all image tokens, the global prompt and every entity whose mask covers it; every text
  segment sees only itself and, for entities, the image tokens it covers (both directions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange, reduce
from PIL import Image

PACK = 2  # FLUX packs 2x2 latent pixels into one token
# The forms the regional mask reaches attention in (all exact; "auto" picks per device), and the entity segment
# lengths: "full" pads every entity prompt to max_sequence_length, "trim" keeps its real tokens plus a few pads.
ATTENTION_MODES = ("auto", "dense", "flex", "segmented")
ENTITY_TOKEN_MODES = ("full", "trim")


def latent_grid_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Latent ``(h, w)`` exactly as FluxPipeline.prepare_latents computes it (a multiple of the 2x2 packing)."""
    return PACK * (int(height) // (vae_scale_factor * PACK)), PACK * (int(width) // (vae_scale_factor * PACK))


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool -> ``(height, width)`` bool with PIL's NEAREST sampling (the reference's resize)."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    return np.asarray(image.resize((width, height), resample=Image.Resampling.NEAREST)) >= 128


def token_cover(latent_mask: torch.Tensor) -> torch.Tensor:
    """``(..., h, w)`` bool latent mask -> ``(..., h/2 * w/2)`` bool: a token is covered if any pixel is.

    Token order is row-major over the ``(h/2, w/2)`` grid, the order of FluxPipeline._pack_latents.
    """
    cover = reduce(latent_mask.to(torch.uint8), "... (h p1) (w p2) -> ... h w", "max", p1=PACK, p2=PACK)
    return rearrange(cover, "... h w -> ... (h w)").bool()


def latent_mask(mask: np.ndarray, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """A binary pixel mask of any resolution -> ``(h, w)`` bool on the latent grid of a ``height x width`` image."""
    return torch.from_numpy(resize_nearest(mask, *latent_grid_size(height, width, vae_scale_factor)))


def mask_tokens(mask: np.ndarray, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """A binary pixel mask of any resolution -> ``(n_img,)`` bool token cover for an ``height x width`` image."""
    return token_cover(latent_mask(mask, height, width, vae_scale_factor))


def pixel_masks_to_covers(masks: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """Training batches: ``(B, N, H, W)`` bool pixel masks -> ``(B, N, n_img)`` token covers (empty stays empty)."""
    batch, n, height, width = masks.shape
    lat_h, lat_w = latent_grid_size(height, width, vae_scale_factor)
    flat = masks.reshape(batch * n, height, width).cpu().numpy()
    latents = [latent_mask(m, height, width, vae_scale_factor) for m in flat]  # the inference path's rule
    latent = torch.stack(latents) if latents else torch.zeros(0, lat_h, lat_w, dtype=torch.bool)
    return token_cover(latent).reshape(batch, n, (lat_h // PACK) * (lat_w // PACK)).to(masks.device)


def segment_ids(entity_lengths: Sequence[int], global_length: int) -> torch.Tensor:
    """``(T,)`` segment id of every text token: ``0..N-1`` for the entities, ``N`` for the global prompt."""
    lengths = torch.tensor([*entity_lengths, global_length], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def regional_attention_mask(
    cover: torch.Tensor, entity_lengths: Sequence[int], global_length: int
) -> torch.Tensor:
    """The regional attention mask, bool ``(B, 1, L, L)`` with ``L = sum(entity_lengths) + global_length + n_img``.

    Args:
        cover: ``(B, N, n_img)`` bool, entity ``i`` covers image token ``z``. An entity whose cover is empty is
            exactly inert (its text sees only itself), which is how batches with fewer entities are padded.
        entity_lengths: ``N`` text lengths of the entity segments (512 each for FLUX).
        global_length: text length of the global prompt.
    """
    if cover.ndim != 3 or cover.shape[1] != len(entity_lengths):
        raise ValueError(f"cover must be (B, N, n_img) with N = {len(entity_lengths)}, got {tuple(cover.shape)}")
    batch, _, n_img = cover.shape
    device = cover.device
    seg = segment_ids(entity_lengths, global_length).to(device)  # (T,)
    text_len = seg.numel()
    sees_global = torch.ones(batch, 1, n_img, dtype=torch.bool, device=device)
    text_image = torch.cat([cover.bool(), sees_global], dim=1)[:, seg]  # (B, T, n_img)
    text_text = (seg[:, None] == seg[None, :]).expand(batch, text_len, text_len)
    image_image = torch.ones(batch, n_img, n_img, dtype=torch.bool, device=device)
    top = torch.cat([text_text, text_image], dim=2)
    bottom = torch.cat([text_image.transpose(1, 2), image_image], dim=2)
    return torch.cat([top, bottom], dim=1).unsqueeze(1)

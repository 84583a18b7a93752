"""Inpainting fusion (paper eqs. 14-19, docs/design.md section 5): pure functions on packed latents and pixels.

It works on velocities, so it is the same for every model family.

Each step the foreground velocity comes from the DiT with entities and the background velocity
``N_b = (z_t - z_init) / sigma_t`` is the exact velocity that leads back to ``z_init``. They are fused by the
union ``U`` of the entity masks on the latent grid:

- ``exact`` (default): ``N = (N_neg + cfg (N_f - N_neg)) U + N_b (1 - U)``: CFG first, so latents outside the
  union end exactly at ``z_init``;
- ``paper``: ``N = N_neg + cfg (N_f U + N_b (1 - U) - N_neg)``: the reference order, whose background drifts
  with ``cfg != 1``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image

from .choices import FUSIONS
from .files import open_image

logger = logging.getLogger(__name__)


def plain_cfg(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG ``N_neg + s (N_pos - N_neg)`` (the default combination; families may rescale it)."""
    return negative + scale * (positive - negative)


def background_velocity(latents: torch.Tensor, z_init: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``(z_t - z_init) / sigma_t``: Euler steps along it stay on the straight line to ``z_init``."""
    return (latents - z_init) / sigma


def fuse_velocity(
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    background: torch.Tensor,
    union: torch.Tensor,
    cfg_scale: float | None,
    fusion: str = "exact",
    combine=plain_cfg,
) -> torch.Tensor:
    """Combine foreground (``positive``/``negative`` DiT velocities) and background by the soft ``union``.

    Shapes: velocities ``(B, n_img, C*4)``, ``union`` broadcastable to them (values in [0, 1]).
    ``negative`` is None when true CFG is off (then both orders coincide and ``cfg_scale`` is unused).
    ``combine(pos, neg, scale)`` is the family's CFG combination (:func:`plain_cfg` by default).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if negative is None:
        return positive * union + background * (1 - union)
    if fusion == "exact":
        return combine(positive, negative, cfg_scale) * union + background * (1 - union)
    return combine(positive * union + background * (1 - union), negative, cfg_scale)


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Binary dilation of ``(h, w)`` bool by a square of radius ``pixels``."""
    if pixels <= 0:
        return mask
    grown = F.max_pool2d(mask[None, None].float(), kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    return grown[0, 0] > 0


def gaussian_blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(h, w)`` float, edges replicated, that never shrinks a fully-on region."""
    if sigma <= 0:
        return mask.float()
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    image = mask.float()[None, None]
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    image = F.conv2d(F.pad(image, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return image[0, 0].clamp(0, 1)


def soft_union(latent_masks: torch.Tensor, dilate_pixels: int = 0, blur_sigma: float = 0.0) -> torch.Tensor:
    """Entity masks on the latent grid ``(N, h, w)`` bool -> the union ``(h, w)`` in [0, 1].

    The union is dilated by ``dilate_pixels`` latent pixels, then blurred outwards: the blur only adds a soft
    rim around the dilated union (inside it the mask stays exactly 1).
    """
    union = dilate(latent_masks.any(dim=0), dilate_pixels)
    if blur_sigma <= 0:
        return union.float()
    return torch.maximum(gaussian_blur(union, blur_sigma), union.float())


def pack_mask(mask: torch.Tensor, channels: int, patch: int = 2) -> torch.Tensor:
    """A latent-grid mask ``(h, w)`` -> ``(h/p * w/p, channels * p * p)`` in the pipelines' ``_pack_latents`` order."""
    tokens = rearrange(mask, "(h p1) (w p2) -> (h w) (p1 p2)", p1=patch, p2=patch)
    return repeat(tokens, "n p -> n (c p)", c=channels)


def paste_back(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)`` images blended by ``mask (H, W)`` in [0, 1]: where the mask is 0 the original's bytes."""
    weight = mask.astype(np.float64)[..., None]
    blended = weight * generated.astype(np.float64) + (1 - weight) * original.astype(np.float64)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)  # weight 0 gives the original exactly


def to_rgb_array(image) -> tuple[np.ndarray, str | None]:
    """An input image -> ``uint8 (H, W, 3)`` and a note on any conversion made.

    Accepts a path, a PIL image (RGB, L, 1, P, LA/RGBA with an opaque alpha, 16-bit), a numpy array
    (uint8, uint16 or float in [0, 1]; ``(H, W)`` or ``(H, W, 3|4)``) or a tensor ``(3, H, W)`` / ``(1, 3, H, W)``
    in [0, 1]. Transparent images are refused: what should show through is not ours to guess.
    """
    if isinstance(image, (str, Path)):
        image = open_image(image, "input image")
    note = None
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image).astype(np.float64)
            if image.mode != "I" or array.max(initial=0) > 255:  # a 32-bit "I" image may hold 8-bit values
                array = array / 257.0
                note = "16-bit input reduced to 8 bits"
            image = Image.fromarray(np.rint(array).clip(0, 255).astype(np.uint8), mode="L")
        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode in ("LA", "RGBA", "PA"):
            alpha = np.asarray(image.getchannel("A"))
            if alpha.min() < 255:
                raise ValueError("the input image has transparent pixels; flatten it onto a background first "
                                 "(e.g. Image.alpha_composite) or pass image.convert('RGB')")
        if image.mode == "F":
            raise ValueError("32-bit float images are not supported as inpainting input; pass 8-bit RGB")
        if image.mode != "RGB":
            note = note or f"{image.mode} input converted to RGB"
            image = image.convert("RGB")
        return np.asarray(image).copy(), note
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu().float()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(f"tensor images are (3, H, W) or (1, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        image = tensor.permute(1, 2, 0).numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"unsupported input image type {type(image).__name__}; pass a path, PIL image, numpy "
                         "array or tensor")
    array = image
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image arrays are (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.dtype == np.uint16:
        array = np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)
        note = "16-bit input reduced to 8 bits"
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise ValueError("float images must lie in [0, 1]")
        array = np.rint(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {array.dtype}; use uint8, uint16 or float in [0, 1]")
    if array.shape[2] == 4:
        if array[..., 3].min() < 255:
            raise ValueError("the input image has transparent pixels; flatten it onto a background first")
        array = array[..., :3]
    return np.ascontiguousarray(array), note


def snap_size(size: int, multiple: int) -> int:
    """The nearest positive multiple of ``multiple`` (the pipeline's patch grid in pixels)."""
    return max(multiple, round(size / multiple) * multiple)


@dataclass
class InpaintSource:
    """The input image as ``uint8 (H, W, 3)`` at the output size and at the working size (the patch grid)."""

    rgb: np.ndarray
    work_rgb: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the output."""
        return self.rgb.shape[0], self.rgb.shape[1]

    @property
    def work_size(self) -> tuple[int, int]:
        """``(height, width)`` the model works at."""
        return self.work_rgb.shape[0], self.work_rgb.shape[1]


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.array(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS))


def prepare_source(image, height: int | None, width: int | None, grid: int) -> InpaintSource:
    """The inpainting input at the output size (``height x width``, default the input's; the aspect ratio must be
    kept) and at the working size: the nearest multiple of ``grid`` pixels (the model's patch grid)."""
    rgb, note = to_rgb_array(image)
    if note:
        logger.warning(note)
    in_height, in_width = rgb.shape[:2]
    height, width = height or in_height, width or in_width
    if (height, width) != (in_height, in_width):
        if abs(height / width - in_height / in_width) > 0.01 * (in_height / in_width):
            raise ValueError(f"the input image is {in_width}x{in_height} but the output is asked to be "
                             f"{width}x{height}, another aspect ratio; resize or crop the image, or scale the "
                             "layout to it")
        logger.warning(f"input image resized from {in_width}x{in_height} to {width}x{height}")
        rgb = resize_rgb(rgb, height, width)
    work_height, work_width = snap_size(height, grid), snap_size(width, grid)
    work_rgb = rgb
    if (work_height, work_width) != (height, width):
        logger.warning(f"{width}x{height} is not a multiple of the model's {grid}-pixel patch grid: generating "
                       f"at {work_width}x{work_height} and restoring {width}x{height}")
        work_rgb = resize_rgb(rgb, work_height, work_width)
    return InpaintSource(rgb, work_rgb)


def restore(images: np.ndarray, source: InpaintSource, repaint: np.ndarray | None) -> np.ndarray:
    """Generated ``uint8 (B, h, w, 3)`` at the working size -> the input's size, and where ``repaint`` (``(H, W)`` in
    [0, 1], None = no paste-back) is 0 the input's pixels byte for byte."""
    height, width = source.size
    if images.shape[1:3] != (height, width):
        images = np.stack([resize_rgb(im, height, width) for im in images])
    if repaint is not None:
        images = np.stack([paste_back(source.rgb, im, repaint) for im in images])
    return images

"""Refuse up front a call that cannot fit the device's memory (before minutes of work end in an out-of-memory
error)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..masks import latent_grid_size


def check_memory(pipe, batch: int, size: tuple[int, int], dense_mask: bool, device: torch.device) -> None:
    """Refuse a call whose tensors cannot fit ``device``: the activations (about 16 floats per image token and model
    width) and, for the dense form, the mask of each image: ``n_img x n_img`` bools and the float copy of it that
    scaled-dot-product attention adds to its scores (4 bytes an entry; measured: a 1024x1024 image on the shipped
    64-pixel model held 21.9 GB), against the memory free now. A lower bound (text tokens are not counted), so it
    only stops what cannot run."""
    patch = pipe.family.patch_size
    lat_h, lat_w = latent_grid_size(*size, pipe.vae_scale_factor, patch)
    n_img = (lat_h // patch) * (lat_w // patch)
    config = pipe.transformer.config
    width = getattr(config, "num_attention_heads", 1) * getattr(config, "attention_head_dim", 64)
    need = 16 * 4 * batch * n_img * width + (batch * n_img * n_img * (1 + 4) if dense_mask else 0)
    free = free_memory(device)
    if free is not None and need > free:
        raise ValueError(f"{size[1]}x{size[0]} needs at least {need / 2**30:.1f} GiB on {device} but "
                         f"{free / 2**30:.1f} GiB are free; use a smaller size or fewer images"
                         + (", or attention='segmented' (no mask tensor)" if dense_mask else ""))


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (CUDA: the driver's count; CPU: the kernel's MemAvailable); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None

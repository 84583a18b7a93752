"""A tiny random FLUX IP-Adapter and CLIP vision encoder, saved as the real files are: the offline stand-in for
XLabs' ``flux-ip-adapter`` and ``openai/clip-vit-large-patch14`` in tests.

The adapter is one safetensors file in the XLabs key format (``ip_adapter_proj_model.*`` for the image projection,
``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`` per double-stream block) and the encoder a
``CLIPVisionModelWithProjection`` folder, so ``pipe.load_ip_adapter(folder, weight_name=WEIGHT_NAME,
image_encoder_pretrained_model_name_or_path=folder / "image_encoder")`` loads them exactly as a user would.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

WEIGHT_NAME = "ip_adapter.safetensors"
IMAGE_TOKENS = 4  # diffusers reads 4 image tokens from a projection that is not 65536 rows tall


def _weight(generator: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=generator) / math.sqrt(cols)


def ip_adapter_state(joint_dim: int, inner_dim: int, num_double_blocks: int, clip_dim: int,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Random XLabs-format tensors: the projection ``clip_dim -> 4 x joint_dim`` (with its LayerNorm) and per
    double-stream block the image keys and values ``joint_dim -> inner_dim`` (with biases)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "ip_adapter_proj_model.proj.weight": _weight(g, IMAGE_TOKENS * joint_dim, clip_dim),
        "ip_adapter_proj_model.proj.bias": 0.1 * torch.randn(IMAGE_TOKENS * joint_dim, generator=g),
        "ip_adapter_proj_model.norm.weight": 1 + 0.1 * torch.randn(joint_dim, generator=g),
        "ip_adapter_proj_model.norm.bias": 0.1 * torch.randn(joint_dim, generator=g),
    }
    for i in range(num_double_blocks):
        for kind in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kind}_proj"
            state[f"{prefix}.weight"] = _weight(g, inner_dim, joint_dim)
            state[f"{prefix}.bias"] = 0.1 * torch.randn(inner_dim, generator=g)
    return state


def save_tiny_ip_adapter(folder: str | Path, transformer_config: Any, seed: int = 0, clip_dim: int = 24,
                         image_size: int = 32) -> dict[str, Any]:
    """Write a random IP-Adapter for a FLUX transformer of ``transformer_config`` and a tiny CLIP vision encoder
    into ``folder``; returns the keyword arguments of ``pipe.load_ip_adapter`` that load them."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = transformer_config
    inner = config.num_attention_heads * config.attention_head_dim
    save_file(ip_adapter_state(config.joint_attention_dim, inner, config.num_layers, clip_dim, seed),
              str(folder / WEIGHT_NAME))
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
        patch_size=8, projection_dim=clip_dim,
    )).eval()
    encoder.save_pretrained(folder / "image_encoder")
    return {"pretrained_model_name_or_path_or_dict": str(folder), "weight_name": WEIGHT_NAME,
            "image_encoder_pretrained_model_name_or_path": str(folder / "image_encoder")}

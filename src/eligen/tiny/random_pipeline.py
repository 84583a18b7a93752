"""A tiny random FLUX pipeline built from config objects: the offline stand-in for FLUX.1-dev in tests.

Every component is the real diffusers / transformers class at toy sizes, so ``save_pretrained`` and
``EliGenPipeline.from_pretrained`` exercise the same code as the full model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from .tokenizers import build_clip_tokenizer, build_t5_tokenizer


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of the random pipeline. ``vae_blocks=2`` gives a VAE scale factor of 2 (FLUX.1-dev: 8)."""

    text_dim: int = 32
    pooled_dim: int = 32
    latent_channels: int = 4
    vae_blocks: int = 2
    num_layers: int = 2
    num_single_layers: int = 2
    heads: int = 2
    head_dim: int = 16
    guidance_embeds: bool = True


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
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


def build_tiny_flux_components(seed: int = 0, config: TinyFluxConfig = TinyFluxConfig()) -> dict[str, Any]:
    """The seven FluxPipeline components at toy size, deterministic in ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.pooled_dim, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=config.pooled_dim,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=config.text_dim, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    blocks = config.vae_blocks
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks, block_out_channels=[8 * 2**i for i in range(blocks)],
        layers_per_block=1, latent_channels=config.latent_channels, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    rope = config.head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * config.latent_channels, num_layers=config.num_layers,
        num_single_layers=config.num_single_layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.heads, joint_attention_dim=config.text_dim,
        pooled_projection_dim=config.pooled_dim, guidance_embeds=config.guidance_embeds,
        axes_dims_rope=(config.head_dim - 2 * rope, rope, rope),
    )
    _randomise(transformer, generator)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    for model in (text_encoder, text_encoder_2, vae, transformer):
        model.eval()
    return {
        "scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "transformer": transformer,
    }


def save_tiny_flux_pipeline(path: str | Path, seed: int = 0, config: TinyFluxConfig = TinyFluxConfig()) -> Path:
    """Save a random tiny pipeline as a diffusers FluxPipeline directory and return its path."""
    from diffusers import FluxPipeline

    path = Path(path)
    FluxPipeline(**build_tiny_flux_components(seed, config)).save_pretrained(path)
    return path

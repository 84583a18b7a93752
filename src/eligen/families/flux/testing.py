"""Test support for FLUX.1 (never imported by the library): a tiny random pipeline built from config objects, the
offline stand-in for FLUX.1-dev, and a tiny random IP-Adapter with its CLIP vision encoder, the stand-in for XLabs'
``flux-ip-adapter`` and ``openai/clip-vit-large-patch14``.

Every component is the real diffusers / transformers class at toy sizes, so ``save_pretrained`` and
``EliGenPipeline.from_pretrained`` exercise the same code as the full model. The adapter is one safetensors file in
the XLabs key format (``ip_adapter_proj_model.*`` for the image projection,
``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`` per double-stream block) and the encoder a
``CLIPVisionModelWithProjection`` folder, so ``pipe.load_ip_adapter(folder, weight_name=WEIGHT_NAME,
image_encoder_pretrained_model_name_or_path=folder / "image_encoder")`` loads them exactly as a user would.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ...tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer
from ..testing import RealShapes, randomise

if TYPE_CHECKING:  # for mypy `from diffusers import ...` is diffusers' torch-less dummy class, without the methods
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
else:
    from diffusers import AutoencoderKL, FluxTransformer2DModel


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


def build_components(seed: int = 0, config: TinyFluxConfig = TinyFluxConfig()) -> dict[str, Any]:
    """The seven FluxPipeline components at toy size, deterministic in ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    eos = cast(int, tokenizer.convert_tokens_to_ids("<|endoftext|>"))  # one token in, one id out
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.pooled_dim, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=config.pooled_dim,
        bos_token_id=cast(int, tokenizer.convert_tokens_to_ids("<|startoftext|>")), eos_token_id=eos, pad_token_id=eos,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(  # type: ignore[call-arg]  # @strict config: extra keys go to **kwargs
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
    randomise(transformer, generator)
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


def save_tiny_pipeline(path: str | Path, seed: int = 0, config: TinyFluxConfig = TinyFluxConfig(),
                       layers: int | None = None) -> Path:
    """Save a random tiny pipeline as a diffusers FluxPipeline directory and return its path; ``layers=1`` makes
    the transformer one double-stream block (no single-stream ones)."""
    from diffusers import FluxPipeline

    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers, num_single_layers=0)
    path = Path(path)
    # mypy takes `from diffusers import FluxPipeline` for diffusers' torch-less dummy class, without the methods
    FluxPipeline(**build_components(seed, config)).save_pretrained(path)  # type: ignore[attr-defined]
    return path


def save_tiny_kontext_pipeline(path: str | Path, seed: int = 0, config: TinyFluxConfig = TinyFluxConfig(),
                               layers: int | None = None) -> Path:
    """The same random components saved as a diffusers FluxKontextPipeline directory (FLUX.1 Kontext: the same
    classes as FLUX.1-dev), ``layers`` as :func:`save_tiny_pipeline`."""
    from diffusers import FluxKontextPipeline

    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers, num_single_layers=0)
    path = Path(path)
    FluxKontextPipeline(**build_components(seed, config)).save_pretrained(path)  # type: ignore[attr-defined]
    return path


def build_controlnet(seed: int = 0, config: TinyFluxConfig = TinyFluxConfig(), layers: int = 1,
                     single_layers: int = 1):
    """A random ``FluxControlNetModel`` for the tiny transformer of ``config`` (latent input, no hint block):
    ``layers`` double- and ``single_layers`` single-stream blocks, every weight (the zero-initialised residual
    projections too) drawn from ``seed``, so its residuals change the image."""
    from diffusers.models.controlnets.controlnet_flux import FluxControlNetModel

    torch.manual_seed(seed)
    rope = config.head_dim // 4
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=4 * config.latent_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=config.head_dim, num_attention_heads=config.heads, joint_attention_dim=config.text_dim,
        pooled_projection_dim=config.pooled_dim, guidance_embeds=config.guidance_embeds,
        axes_dims_rope=(config.head_dim - 2 * rope, rope, rope),
    )
    randomise(controlnet, torch.Generator().manual_seed(seed + 1))
    return controlnet.eval()


def save_tiny_controlnet(path: str | Path, seed: int = 0, config: TinyFluxConfig = TinyFluxConfig()) -> Path:
    """Save :func:`build_controlnet` as a diffusers model folder (what ``--controlnet`` loads) and return its path."""
    path = Path(path)
    build_controlnet(seed, config).save_pretrained(path)
    return path


def save_tiny_controlnet_pipeline(path: str | Path, seed: int = 0, config: TinyFluxConfig = TinyFluxConfig(),
                                  layers: int | None = None) -> Path:
    """The random components with a random ControlNet, saved as a diffusers FluxControlNetPipeline directory;
    ``layers`` as :func:`save_tiny_pipeline`."""
    from diffusers import FluxControlNetPipeline

    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers, num_single_layers=0)
    path = Path(path)
    FluxControlNetPipeline(**build_components(seed, config),  # type: ignore[attr-defined]
                           controlnet=build_controlnet(seed, config)).save_pretrained(path)
    return path


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


def real_shapes(pipeline: str) -> tuple[RealShapes, ...]:
    """FLUX.1-dev's transformer (``FluxPipeline``; ``pipeline`` names the card's, one here), for benchmarks on random
    weights. Source: diffusers' ``FluxTransformer2DModel`` defaults, which are black-forest-labs/FLUX.1-dev's
    ``transformer/config.json`` (19 double- and 38 single-stream blocks, 24 heads x 128, T5 4096 wide, CLIP pooled 768,
    64 packed latent channels), with its ``guidance_embeds=True``; T5 pads every prompt to 512 tokens."""
    config = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
    return (RealShapes("FLUX.1-dev", config, "diffusers FluxTransformer2DModel defaults = FLUX.1-dev config.json",
                       latent_dim=64, text_dim=4096, pooled_dim=768, text_tokens=512,
                       depth=("num_layers", "num_single_layers")),)

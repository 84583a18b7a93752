"""Test support for Krea 2 (never imported by the library): a tiny random pipeline built from config objects, the
offline stand-in for a Krea 2 checkpoint converted to diffusers.

Every component is the real diffusers / transformers class at toy sizes (``AutoencoderKLQwenImage``,
``Qwen3VLModel``, ``Qwen2Tokenizer``, ``Krea2Transformer2DModel``, ``FlowMatchEulerDiscreteScheduler``), so
``Krea2Pipeline.from_pretrained`` on a directory written by :func:`save_tiny_pipeline` runs the same code as the
full model.

Sizes with the default :class:`TinyKrea2Config` (Krea 2 in brackets):

* VAE scale factor 2 [8]: one spatial downsample level, ``z_dim = 4`` latent channels [16], with non-trivial
  ``latents_mean`` / ``latents_std`` (the first four of Qwen-Image's VAE) so the de-normalisation matters.
* A 32x32 image has a 16x16 latent, packed in 2x2 patches into an 8x8 token grid: ``output_type="latent"`` gives
  packed latents of shape ``(1, 64, 16)``.
* Text encoder: a Qwen3-VL of 3 decoder layers, hidden size 32 [36 layers, 2560], grouped-query attention
  (2 query heads, 1 key/value head) and interleaved mRoPE; the pipeline stacks hidden states 1 and 3 [12 taps:
  2, 5, ..., 35] per token, so the transformer's ``num_text_layers`` is 2 [12].
* Transformer: 2 single-stream blocks [28] of 2 heads x 16 [48 x 128] with 1 key/value head [12], SwiGLU width 64,
  ``axes_dims_rope = (4, 6, 6)`` [(32, 48, 48)]; text fusion: 1 layer-wise block [2] and 2 refiner blocks [2].

The tokenizer is Qwen-Image's tiny byte-level BPE
(:func:`eligen.families.qwen_image.testing.build_qwen_image_tokenizer`): Krea 2 uses Qwen-Image's system prompt, so
the template's prefix is exactly ``prompt_template_encode_start_idx = 34`` tokens and its suffix
``<|im_end|>\\n<|im_start|>assistant\\n`` exactly the 5 tokens the pipeline appends after the padding, as with the
real Qwen tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import Qwen3VLConfig, Qwen3VLModel

from ...data.tiny_qwen2vl import _token_ids
from ..qwen_image.testing import build_qwen_image_tokenizer
from ..testing import RealShapes, randomise

if TYPE_CHECKING:  # for mypy `from diffusers import ...` is diffusers' torch-less dummy class, without the methods
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
    from diffusers.models.transformers.transformer_krea2 import Krea2Transformer2DModel
else:
    from diffusers import AutoencoderKLQwenImage, Krea2Transformer2DModel


@dataclass(frozen=True)
class TinyKrea2Config:
    """Sizes of the random pipeline; ``len(vae_dim_mult) - 1`` downsample levels give VAE scale factor 2."""

    text_dim: int = 32
    text_layers: int = 3
    text_heads: int = 2
    text_kv_heads: int = 1
    select_layers: tuple[int, ...] = (1, 3)  # indices into the encoder's hidden states (0: the embeddings)
    latent_channels: int = 4
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 2)
    latents_mean: tuple[float, ...] = (-0.7571, -0.7089, -0.9113, 0.1075)
    latents_std: tuple[float, ...] = (2.8184, 1.4541, 2.3275, 2.6558)
    num_layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 16
    intermediate_size: int = 64
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    layerwise_blocks: int = 1
    refiner_blocks: int = 2


def _text_encoder(tokenizer, config: TinyKrea2Config) -> Qwen3VLModel:
    head_dim = config.text_dim // config.text_heads
    half = head_dim // 2  # Qwen3-VL-4B: head_dim 128 -> mrope_section [24, 20, 20]
    return Qwen3VLModel(Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": config.text_dim, "intermediate_size": 2 * config.text_dim,
            "num_hidden_layers": config.text_layers, "num_attention_heads": config.text_heads,
            "num_key_value_heads": config.text_kv_heads, "head_dim": head_dim, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                "mrope_section": [half - 2 * (half // 4), half // 4, half // 4],
                                "mrope_interleaved": True},
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": config.text_dim,
            "patch_size": 14, "num_position_embeddings": 16, "deepstack_visual_indexes": [0],
        },
        **_token_ids(tokenizer),
    ))


def build_components(seed: int = 0, config: TinyKrea2Config = TinyKrea2Config()) -> dict[str, Any]:
    """The five Krea2Pipeline components at toy size, every parameter drawn deterministically from ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_qwen_image_tokenizer()
    text_encoder = _text_encoder(tokenizer, config)
    z_dim = config.latent_channels
    if not len(config.latents_mean) == len(config.latents_std) == z_dim:
        raise ValueError(f"latents_mean / latents_std need {z_dim} values, one per latent channel")
    if max(config.select_layers) > config.text_layers:
        raise ValueError(f"select_layers {config.select_layers} index past the {config.text_layers} encoder layers")
    vae = AutoencoderKLQwenImage(
        base_dim=config.vae_base_dim, z_dim=z_dim, dim_mult=list(config.vae_dim_mult), num_res_blocks=1,
        attn_scales=[], temperal_downsample=[False] * (len(config.vae_dim_mult) - 1),
        latents_mean=list(config.latents_mean), latents_std=list(config.latents_std),
    )
    transformer = Krea2Transformer2DModel(
        in_channels=4 * z_dim, num_layers=config.num_layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        intermediate_size=config.intermediate_size, timestep_embed_dim=32, text_hidden_dim=config.text_dim,
        num_text_layers=len(config.select_layers), text_num_attention_heads=config.text_heads,
        text_num_key_value_heads=config.text_heads, text_intermediate_size=2 * config.text_dim,
        num_layerwise_text_blocks=config.layerwise_blocks, num_refiner_text_blocks=config.refiner_blocks,
        axes_dims_rope=tuple(config.axes_dims_rope), rope_theta=1000.0,
    )
    for model in (text_encoder, vae, transformer):
        randomise(model, generator)
        model.eval()
    with torch.no_grad():  # the VAE's RMS-norm gains are (C, 1, 1) tensors, which randomise takes for weights
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
    # Krea2Pipeline's documented scheduler: the resolution-aware exponential shift
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=6400, time_shift_type="exponential",
    )
    return {
        "scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
        "transformer": transformer, "text_encoder_select_layers": tuple(config.select_layers),
    }


def save_tiny_pipeline(path: str | Path, seed: int = 0, config: TinyKrea2Config = TinyKrea2Config(),
                       layers: int | None = None) -> Path:
    """Save a random tiny pipeline as a diffusers Krea2Pipeline directory and return its path; ``layers``
    overrides the transformer's depth (its text fusion keeps its blocks)."""
    from diffusers import Krea2Pipeline

    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    path = Path(path)
    # mypy takes `from diffusers import Krea2Pipeline` for diffusers' torch-less dummy class, without the methods
    Krea2Pipeline(**build_components(seed, config)).save_pretrained(path)  # type: ignore[attr-defined]
    return path


def real_shapes(pipeline: str) -> tuple[RealShapes, ...]:
    """Krea 2's transformer, for benchmarks on random weights. The released checkpoint's config.json was not found
    (diffusers' docs name no hub id for it, "path/to/krea2-diffusers"): these are diffusers' ``Krea2Transformer2DModel``
    defaults (28 blocks, 48 heads x 128 with 12 key/value heads, 12 stacked text-encoder taps 2560 wide, 2 layerwise and
    2 refiner text blocks, 64 packed latent channels). Krea 2's padding is masked and dropped: 128 tokens stand for a
    long prompt."""
    config = dict(in_channels=64, num_layers=28, attention_head_dim=128, num_attention_heads=48, num_key_value_heads=12,
                  intermediate_size=16384, text_hidden_dim=2560, num_text_layers=12, num_layerwise_text_blocks=2,
                  num_refiner_text_blocks=2)
    return (RealShapes("Krea 2", config, "diffusers Krea2Transformer2DModel defaults (released config not found)",
                       latent_dim=64, text_dim=12 * 2560, text_tokens=128,
                       depth=("num_layers", "num_layerwise_text_blocks", "num_refiner_text_blocks")),)

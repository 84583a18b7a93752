"""Test support for Qwen-Image 2.1 (never imported by the library): a tiny random pipeline built from config objects,
the offline stand-in for Qwen/Qwen-Image-2.1.

Every component is the real diffusers / transformers class at toy sizes (``AutoencoderKLQwenImage21``,
``Qwen3VLForConditionalGeneration``, ``Qwen2Tokenizer`` in a Qwen3-VL processor, ``QwenImage21Transformer2DModel``,
``FlowMatchEulerDiscreteScheduler``), so ``QwenImage21Pipeline.from_pretrained`` on a directory written by
:func:`save_tiny_pipeline` runs the same code as the full model. The processor is
:class:`~.processor.TextOnlyQwen3VLProcessor` (Qwen3VLProcessor whose video slot holds a stand-in: its real video
processor needs torchvision), with the tokenizer carrying the chat template.

Sizes with the default :class:`TinyQwenImage21Config` (Qwen-Image 2.1 in brackets):

* VAE scale factor 16 [16]: four spatial downsample levels of 8 channels, ``z_dim = 4`` latent channels [64], RGBA in
  and out [the same], with non-trivial ``latents_mean`` / ``latents_std`` (the first four of the real ones).
* One token per latent pixel: a 32x32 image is a 2x2 token grid (one vision-language image slot), a 64x96 image 4x6;
  ``output_type="latent"`` gives ``(1, n_img, z_dim)``.
* Text encoder hidden size = transformer ``context_in_dim`` = 32 [4096]; transformer 2 blocks [32] of 2 heads x 16
  [32 x 128], ``axes_dims_rope = (4, 6, 6)`` [(16, 56, 56)], ``causal_condition`` on (the text KV cache works).

The tokenizer is a byte-level BPE whose merges make each word of the system prompt and of
:data:`eligen.tiny.tokenizers.DEFAULT_WORDS` one token (so "blue" and "red" are one token each), with Qwen's special
tokens; the chat template renders the system message exactly as the pipeline's prompt template starts, so the
pipeline's ``_drop_idx`` drops the system tokens and nothing of the prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ...data.tiny_qwen2vl import SPECIAL_TOKENS, _token_ids
from ...tiny.tokenizers import DEFAULT_WORDS, _byte_symbols
from ..testing import RealShapes, randomise
from .processor import TextOnlyQwen3VLProcessor

if TYPE_CHECKING:  # for mypy `from diffusers import ...` is diffusers' torch-less dummy class, without the methods
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import AutoencoderKLQwenImage21
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel
else:
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."  # QwenImage21Pipeline.sys_prompt
# Words that start a pre-token (after a newline or a special token) and words that follow a space ("Ġword").
TEMPLATE_HEAD_WORDS = ("system", "user", "assistant", "Comprehend")
TEMPLATE_WORDS = ("and", "analyze", "the", "provided", "prompt")

# Qwen3-VL's chat template, reduced to what text and image messages need: each message as
# "<|im_start|>{role}\n{content}<|im_end|>\n", images as the vision placeholder, then the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyQwenImage21Config:
    """Sizes of the random pipeline; ``len(vae_dim_mult) - 1`` downsample levels (4: scale factor 16)."""

    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    latent_channels: int = 4
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1, 1)
    latents_mean: tuple[float, ...] = (0.5126, 0.7721, -0.0631, 1.3506)
    latents_std: tuple[float, ...] = (3.2001, 3.2936, 3.4321, 3.0091)
    num_layers: int = 2
    heads: int = 2
    head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one pre-token: merge the lowest-ranked adjacent pair until none is in ``ranks``."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2:]]
    return symbols


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Qwen2Tokenizer:
    """Byte-level BPE: every byte symbol, merges making each template word and each of ``words`` (bare and after a
    space) one token, then Qwen's special tokens; the chat template is :data:`CHAT_TEMPLATE`. Each merge is added
    only after running BPE with the merges so far, so it never changes how an earlier word tokenizes."""
    byte_symbols = _byte_symbols()
    pieces = [*TEMPLATE_HEAD_WORDS, *(" " + w for w in TEMPLATE_WORDS)]
    for word in words:
        pieces += [word, " " + word]
    vocab: dict[str, int] = {s: i for i, s in enumerate(byte_symbols)}
    ranks: dict[tuple[str, str], int] = {}
    for piece in dict.fromkeys(pieces):
        tokens = _bpe([byte_symbols[b] for b in piece.encode("utf-8")], ranks)
        while len(tokens) > 1:
            ranks[(tokens[0], tokens[1])] = len(ranks)
            vocab.setdefault(tokens[0] + tokens[1], len(vocab))
            tokens = _bpe(tokens, ranks)
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    # the tokenizers BPE takes merges as (left, right) pairs; transformers annotates them list[str]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(ranks), model_max_length=32768)  # type: ignore[arg-type]
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer) -> TextOnlyQwen3VLProcessor:
    """The tokenizer (with its chat template) and Qwen3-VL's image geometry (16-pixel patches, 2x2 merges)."""
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                               min_pixels=32 * 32, max_pixels=64 * 64)
    return TextOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATE)


def _text_encoder(tokenizer: Qwen2Tokenizer, config: TinyQwenImage21Config) -> Qwen3VLForConditionalGeneration:
    head_dim = config.text_dim // config.text_heads
    half = head_dim // 2
    hw = 3 * half // 8  # the M-RoPE sections (time, height, width) sum to half the head size
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": config.text_dim, "intermediate_size": 2 * config.text_dim,
        "num_hidden_layers": config.text_layers, "num_attention_heads": config.text_heads, "num_key_value_heads": 1,
        "head_dim": head_dim, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                            "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True},
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    vision_config = {
        "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": config.text_dim,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0],
    }
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text_config, vision_config=vision_config,
                                                         **_token_ids(tokenizer)))


def build_components(seed: int = 0, config: TinyQwenImage21Config = TinyQwenImage21Config()) -> dict[str, Any]:
    """The five QwenImage21Pipeline components at toy size, every parameter drawn deterministically from ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = _text_encoder(tokenizer, config)
    z_dim = config.latent_channels
    if not len(config.latents_mean) == len(config.latents_std) == z_dim:
        raise ValueError(f"latents_mean / latents_std need {z_dim} values, one per latent channel")
    levels = len(config.vae_dim_mult) - 1
    vae = AutoencoderKLQwenImage21(
        base_dim=config.vae_base_dim, decoder_base_dim=config.vae_base_dim, z_dim=z_dim,
        dim_mult=list(config.vae_dim_mult), num_res_blocks=1, attn_scales=[], temperal_downsample=[False] * levels,
        latents_mean=list(config.latents_mean), latents_std=list(config.latents_std), scale_factor_spatial=2**levels,
    )
    transformer = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=z_dim, out_channels=z_dim, num_layers=config.num_layers,
        attention_head_dim=config.head_dim, num_attention_heads=config.heads, context_in_dim=config.text_dim,
        mlp_ratio=3, axes_dims_rope=tuple(config.axes_dims_rope), causal_condition=True,
    )
    for model in (text_encoder, vae, transformer):
        randomise(model, generator)
        model.eval()
    with torch.no_grad():  # the VAE's RMS-norm gains are (C, 1, 1) tensors, which randomise takes for weights
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=None, time_shift_type="exponential",
    )
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "processor": build_processor(tokenizer),
            "transformer": transformer}


def save_tiny_pipeline(path: str | Path, seed: int = 0, config: TinyQwenImage21Config = TinyQwenImage21Config(),
                       layers: int | None = None) -> Path:
    """Save a random tiny pipeline as a diffusers QwenImage21Pipeline directory and return its path; ``layers``
    overrides the transformer's depth."""
    from diffusers import QwenImage21Pipeline

    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    path = Path(path)
    # mypy takes `from diffusers import QwenImage21Pipeline` for diffusers' torch-less dummy class, without the methods
    QwenImage21Pipeline(**build_components(seed, config)).save_pretrained(path)  # type: ignore[attr-defined]
    return path


def real_shapes(pipeline: str) -> tuple[RealShapes, ...]:
    """Qwen-Image 2.1's transformer, for benchmarks on random weights. Qwen/Qwen-Image-2.1's config.json was not found:
    these are diffusers' ``QwenImage21Transformer2DModel`` defaults (32 blocks, 32 heads x 128, text 4096 wide, 64
    latent channels, one token per latent pixel of 16 px). It does not pad its prompt: 128 tokens stand for a long
    one."""
    config = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                  num_attention_heads=32, context_in_dim=4096)
    return (RealShapes("Qwen-Image 2.1", config, "diffusers QwenImage21Transformer2DModel defaults (released config "
                       "not found)", latent_dim=64, text_dim=4096, text_tokens=128, depth=("num_layers",)),)

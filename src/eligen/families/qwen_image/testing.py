"""Test support for Qwen-Image (never imported by the library): a tiny random pipeline built from config objects, the
offline stand-in for Qwen/Qwen-Image.

Every component is the real diffusers / transformers class at toy sizes (``AutoencoderKLQwenImage``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen2Tokenizer``, ``QwenImageTransformer2DModel``,
``FlowMatchEulerDiscreteScheduler``), so ``QwenImagePipeline.from_pretrained`` on a directory written by
:func:`save_tiny_pipeline` runs the same code as the full model.

Sizes with the default :class:`TinyQwenImageConfig` (Qwen-Image in brackets):

* VAE scale factor 2 [8]: one spatial downsample level, ``z_dim = 4`` latent channels [16], with non-trivial
  ``latents_mean`` / ``latents_std`` (the first four of Qwen-Image's) so the pipeline's de-normalisation matters.
* A 32x48 image has a 16x24 latent, packed in 2x2 patches into an 8x12 token grid: ``output_type="latent"``
  gives packed latents of shape ``(1, 96, 16)`` (96 tokens, ``4 * z_dim`` channels).
* Text encoder hidden size = transformer ``joint_attention_dim`` = 32 [3584]; transformer 2 layers [60] of
  2 heads x 16 [24 x 128], ``axes_dims_rope = (4, 6, 6)`` [(16, 56, 56)].

The tokenizer is a byte-level BPE (any text tokenizes, with single bytes as the fallback) whose merges spell the
words of ``QwenImagePipeline.prompt_template_encode`` as whole tokens, so the template's prefix (up to the user
prompt) is exactly ``prompt_template_encode_start_idx = 34`` tokens, as with the real Qwen tokenizer, and the
pipeline's drop of the first 34 hidden states removes the template and nothing of the prompt.
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
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from ...data.tiny_qwen2vl import SPECIAL_TOKENS, _text_config, _token_ids
from ...tiny.tokenizers import DEFAULT_WORDS, _byte_symbols
from ..testing import RealShapes, randomise

if TYPE_CHECKING:  # for mypy `from diffusers import ...` is diffusers' torch-less dummy class, without the methods
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
else:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

# QwenImagePipeline.prompt_template_encode (hard-coded in its __init__) and the number of its tokens before ``{}``.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_START_IDX = 34

# Words that start a pre-token (after a newline or a special token) and words that follow a space ("Ġword").
TEMPLATE_HEAD_WORDS = ("system", "user", "assistant", "Describe")
TEMPLATE_WORDS = (
    "the", "image", "by", "detailing", "color", "shape", "size", "texture", "quantity", "text", "spatial",
    "relationships", "of", "objects", "and", "background",
)


@dataclass(frozen=True)
class TinyQwenImageConfig:
    """Sizes of the random pipeline; ``len(vae_dim_mult) - 1`` downsample levels give VAE scale factor 2."""

    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    latent_channels: int = 4
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 2)
    latents_mean: tuple[float, ...] = (-0.7571, -0.7089, -0.9113, 0.1075)
    latents_std: tuple[float, ...] = (2.8184, 1.4541, 2.3275, 2.6558)
    num_layers: int = 2
    heads: int = 2
    head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one pre-token: merge the lowest-ranked adjacent pair until none is in ``ranks``."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def build_qwen_image_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Qwen2Tokenizer:
    """Byte-level BPE: every byte symbol, merges making each template word (and each of ``words``, bare and after a
    space) a single token, then Qwen2-VL's special tokens, as in :func:`eligen.data.tiny_qwen2vl.build_qwen2_tokenizer`.

    Each merge is appended only after running BPE with the merges so far, at the lowest priority, so it never changes
    how an earlier word tokenizes and every listed word ends as one token.
    """
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
    return tokenizer


def _text_encoder(tokenizer: Qwen2Tokenizer, config: TinyQwenImageConfig) -> Qwen2_5_VLForConditionalGeneration:
    half = config.text_dim // config.text_heads // 2
    hw = 3 * half // 8  # Qwen2.5-VL-7B: head_dim 128 -> mrope_section [16, 24, 24]
    text_config = _text_config(tokenizer, len(tokenizer))
    text_config.update(
        hidden_size=config.text_dim, intermediate_size=2 * config.text_dim, num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads, max_window_layers=config.text_layers,
        rope_scaling={"type": "mrope", "mrope_section": [half - 2 * hw, hw, hw]},
    )
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config={
            "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": config.text_dim,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [0],
        },
        **_token_ids(tokenizer),
    ))


def build_components(seed: int = 0, config: TinyQwenImageConfig = TinyQwenImageConfig()) -> dict[str, Any]:
    """The five QwenImagePipeline components at toy size, every parameter drawn deterministically from ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_qwen_image_tokenizer()
    text_encoder = _text_encoder(tokenizer, config)
    z_dim = config.latent_channels
    if not len(config.latents_mean) == len(config.latents_std) == z_dim:
        raise ValueError(f"latents_mean / latents_std need {z_dim} values, one per latent channel")
    vae = AutoencoderKLQwenImage(
        base_dim=config.vae_base_dim, z_dim=z_dim, dim_mult=list(config.vae_dim_mult), num_res_blocks=1,
        attn_scales=[], temperal_downsample=[False] * (len(config.vae_dim_mult) - 1),
        latents_mean=list(config.latents_mean), latents_std=list(config.latents_std),
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=config.num_layers,
        attention_head_dim=config.head_dim, num_attention_heads=config.heads, joint_attention_dim=config.text_dim,
        guidance_embeds=False, axes_dims_rope=tuple(config.axes_dims_rope),
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
    return {
        "scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
        "transformer": transformer,
    }


def save_tiny_pipeline(path: str | Path, seed: int = 0, config: TinyQwenImageConfig = TinyQwenImageConfig(),
                       layers: int | None = None) -> Path:
    """Save a random tiny pipeline as a diffusers QwenImagePipeline directory and return its path; ``layers``
    overrides the transformer's depth."""
    from diffusers import QwenImagePipeline

    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    path = Path(path)
    # mypy takes `from diffusers import QwenImagePipeline` for diffusers' torch-less dummy class, without the methods
    QwenImagePipeline(**build_components(seed, config)).save_pretrained(path)  # type: ignore[attr-defined]
    return path


def build_controlnet(seed: int = 0, config: TinyQwenImageConfig = TinyQwenImageConfig(), layers: int = 1):
    """A random ``QwenImageControlNetModel`` for the tiny transformer of ``config``: ``layers`` blocks, every weight
    (the zero-initialised residual projections too) drawn from ``seed``, so its residuals change the image."""
    from diffusers.models.controlnets.controlnet_qwenimage import QwenImageControlNetModel

    torch.manual_seed(seed)
    z_dim = config.latent_channels
    controlnet = QwenImageControlNetModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.heads, joint_attention_dim=config.text_dim,
        axes_dims_rope=tuple(config.axes_dims_rope),
    )
    randomise(controlnet, torch.Generator().manual_seed(seed + 1))
    return controlnet.eval()


def save_tiny_controlnet(path: str | Path, seed: int = 0, config: TinyQwenImageConfig = TinyQwenImageConfig()) -> Path:
    """Save :func:`build_controlnet` as a diffusers model folder (what ``--controlnet`` loads) and return its path."""
    path = Path(path)
    build_controlnet(seed, config).save_pretrained(path)
    return path


def save_tiny_controlnet_pipeline(path: str | Path, seed: int = 0,
                                  config: TinyQwenImageConfig = TinyQwenImageConfig(),
                                  layers: int | None = None) -> Path:
    """The random components with a random ControlNet, saved as a diffusers QwenImageControlNetPipeline directory;
    ``layers`` as :func:`save_tiny_pipeline`."""
    from diffusers import QwenImageControlNetPipeline

    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    path = Path(path)
    QwenImageControlNetPipeline(**build_components(seed, config),  # type: ignore[attr-defined]
                                controlnet=build_controlnet(seed, config)).save_pretrained(path)
    return path


def real_shapes(pipeline: str) -> tuple[RealShapes, ...]:
    """Qwen-Image's transformer (20B), for benchmarks on random weights. Source: diffusers'
    ``QwenImageTransformer2DModel`` defaults, which are Qwen/Qwen-Image's ``transformer/config.json`` (60 blocks, 24
    heads x 128, Qwen2.5-VL text 3584 wide, 64 packed latent channels). Qwen-Image does not pad its prompt: 128 tokens
    stand for a long one."""
    config = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
    return (RealShapes("Qwen-Image", config, "diffusers QwenImageTransformer2DModel defaults = Qwen-Image config.json",
                       latent_dim=64, text_dim=3584, text_tokens=128, depth=("num_layers",)),)


def build_edit_processor(tokenizer: Qwen2Tokenizer):
    """The Qwen2-VL processor of the edit pipelines (the tiny vision tower's 14-pixel patches, 2x2 merge), without
    torchvision (:class:`~.processor.NoVideoQwen2VLProcessor`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .processor import NoVideoQwen2VLProcessor

    image_processor = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                               min_pixels=28 * 28, max_pixels=56 * 56)
    return NoVideoQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _save_edit(pipeline_class, path: str | Path, seed: int, config: TinyQwenImageConfig, layers: int | None) -> Path:
    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    path = Path(path)
    components = build_components(seed, config)
    pipeline_class(**components, processor=build_edit_processor(components["tokenizer"])).save_pretrained(path)
    return path


def save_tiny_edit_pipeline(path: str | Path, seed: int = 0, config: TinyQwenImageConfig = TinyQwenImageConfig(),
                            layers: int | None = None) -> Path:
    """The same random components with the Qwen2-VL processor, saved as a diffusers QwenImageEditPlusPipeline
    directory; ``layers`` as :func:`save_tiny_pipeline`. Its ``model_index.json`` names the processor's module
    (:mod:`.processor`), which the EliGen edit pipeline imports: import it before loading with diffusers' own class.
    diffusers sizes the inputs at about 1024x1024 (``VAE_IMAGE_SIZE``) and 384x384 (``CONDITION_IMAGE_SIZE``):
    tests set those module constants small."""
    from diffusers import QwenImageEditPlusPipeline

    return _save_edit(QwenImageEditPlusPipeline, path, seed, config, layers)


def save_tiny_single_edit_pipeline(path: str | Path, seed: int = 0,
                                   config: TinyQwenImageConfig = TinyQwenImageConfig(),
                                   layers: int | None = None) -> Path:
    """As :func:`save_tiny_edit_pipeline`, saved as a diffusers QwenImageEditPipeline (Qwen-Image-Edit, one input
    image) directory. That pipeline sizes its input with ``calculate_dimensions(1024 * 1024, ratio)`` (a literal, no
    module constant): tests replace the module's ``calculate_dimensions`` by one at a small area."""
    from diffusers import QwenImageEditPipeline

    return _save_edit(QwenImageEditPipeline, path, seed, config, layers)

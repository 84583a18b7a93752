"""Test support for Z-Image (never imported by the library): a tiny random pipeline built from config objects, the
offline stand-in for Tongyi-MAI/Z-Image(-Turbo).

Every component is the real diffusers / transformers class at toy sizes (``AutoencoderKL``, ``Qwen3Model``,
``Qwen2Tokenizer`` with a chat template, ``ZImageTransformer2DModel``, ``FlowMatchEulerDiscreteScheduler``), so
``ZImagePipeline.from_pretrained`` on a directory written by :func:`save_tiny_pipeline` runs the same code as the
full model.

Sizes with the default :class:`TinyZImageConfig` (Z-Image in brackets):

* VAE scale factor 2 [8], ``latent_channels = 4`` [16], a shift and scaling factor like the real VAE's.
* A 32x32 image has a 16x16 latent, patchified in 2x2 patches into an 8x8 token grid (64 tokens, a multiple of 32:
  no image padding); 40x40 has 100 tokens, padded inside the transformer to 128.
* Text encoder (Qwen3, two layers; the pipeline reads the second-to-last hidden state) hidden size 32 =
  transformer ``cap_feat_dim`` [2560]; transformer ``dim`` 32 [3840] = 2 heads [30] x 16 [128],
  ``axes_dims = (8, 4, 4)`` [(32, 48, 48)], 2 main layers [30] and 1 refiner layer of each kind [2].

The tokenizer is a byte-level BPE (any text tokenizes; the template's and the tests' words are one token each) with
Qwen's special tokens and a chat template that writes
what Qwen3's writes for one user message (``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``, with
``enable_thinking=False`` adding the empty think block), the text ZImagePipeline encodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from ...data.tiny_qwen2vl import SPECIAL_TOKENS
from ...tiny.tokenizers import DEFAULT_WORDS, _byte_symbols
from ..testing import RealShapes, randomise

if TYPE_CHECKING:  # for mypy `from diffusers import ...` is diffusers' torch-less dummy class, without the methods
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
else:
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

# What Qwen3's chat template writes for a conversation of user messages (the only kind ZImagePipeline makes).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
THINK_TOKENS = ("<think>", "</think>")
TEMPLATE_WORDS = ("user", "assistant")


@dataclass(frozen=True)
class TinyZImageConfig:
    """Sizes of the random pipeline; ``vae_blocks=2`` gives VAE scale factor 2."""

    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    latent_channels: int = 4
    vae_blocks: int = 2
    num_layers: int = 2
    refiner_layers: int = 1
    heads: int = 2
    axes_dims: tuple[int, int, int] = (8, 4, 4)
    axes_lens: tuple[int, int, int] = (1024, 64, 64)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one pre-token: merge the lowest-ranked adjacent pair until none is in ``ranks``."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2:]]
    return symbols


def build_z_image_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Qwen2Tokenizer:
    """Byte-level BPE whose merges make each template word and each of ``words`` (bare and after a space) one token,
    Qwen's special tokens, the think tags and the chat template. Each merge is added after running BPE with the
    merges so far, so no later word changes how an earlier one tokenizes."""
    byte_symbols = _byte_symbols()
    vocab: dict[str, int] = {s: i for i, s in enumerate(byte_symbols)}
    ranks: dict[tuple[str, str], int] = {}
    pieces = [*TEMPLATE_WORDS, *(piece for word in words for piece in (word, " " + word))]
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
    tokenizer.add_tokens(list(THINK_TOKENS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_components(seed: int = 0, config: TinyZImageConfig = TinyZImageConfig()) -> dict[str, Any]:
    """The five ZImagePipeline components at toy size, every parameter drawn deterministically from ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_z_image_tokenizer()
    pad = cast(int, tokenizer.convert_tokens_to_ids("<|endoftext|>"))  # one token in, one id out
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=config.text_dim, intermediate_size=2 * config.text_dim,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads, num_key_value_heads=1,
        head_dim=config.text_dim // config.text_heads, max_position_embeddings=4096,
        max_window_layers=config.text_layers,
        pad_token_id=pad, bos_token_id=pad, eos_token_id=cast(int, tokenizer.convert_tokens_to_ids("<|im_end|>")),
    ))
    blocks = config.vae_blocks
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks, block_out_channels=[8 * 2**i for i in range(blocks)],
        layers_per_block=1, latent_channels=config.latent_channels, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
    )
    dim = config.heads * sum(config.axes_dims)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=config.latent_channels, dim=dim,
        n_layers=config.num_layers, n_refiner_layers=config.refiner_layers, n_heads=config.heads,
        n_kv_heads=config.heads, cap_feat_dim=config.text_dim, axes_dims=list(config.axes_dims),
        axes_lens=list(config.axes_lens),
    )
    for model in (text_encoder, vae, transformer):
        randomise(model, generator)
        model.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "transformer": transformer}


def save_tiny_pipeline(path: str | Path, seed: int = 0, config: TinyZImageConfig = TinyZImageConfig(),
                       layers: int | None = None) -> Path:
    """Save a random tiny pipeline as a diffusers ZImagePipeline directory and return its path; ``layers``
    overrides the number of main transformer layers (the refiners keep theirs: they see image or text alone)."""
    from diffusers import ZImagePipeline

    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    path = Path(path)
    # mypy takes `from diffusers import ZImagePipeline` for diffusers' torch-less dummy class, without the methods
    ZImagePipeline(**build_components(seed, config)).save_pretrained(path)  # type: ignore[attr-defined]
    return path


def build_controlnet(seed: int = 0, config: TinyZImageConfig = TinyZImageConfig(), places: tuple[int, ...] = (0, 1),
                     extra_channels: int = 4):
    """A random ``ZImageControlNetModel`` for the tiny transformer of ``config``: hints after the main layers
    ``places``, ``extra_channels`` zero control channels beyond the latents' (as the 2.0 ControlNets take), every
    weight (the zero-initialised projections too) drawn from ``seed``, so its hints change the image. Its shared
    parts (embedders, refiners) are the transformer's, attached by the pipeline (``from_transformer``)."""
    from diffusers.models.controlnets.controlnet_z_image import ZImageControlNetModel

    torch.manual_seed(seed)
    controlnet = ZImageControlNetModel(
        control_layers_places=list(places), control_in_dim=config.latent_channels + extra_channels,
        all_patch_size=(2,), all_f_patch_size=(1,), dim=config.heads * sum(config.axes_dims),
        n_refiner_layers=config.refiner_layers, n_heads=config.heads, n_kv_heads=config.heads,
    )
    randomise(controlnet, torch.Generator().manual_seed(seed + 1))
    return controlnet.eval()


def save_tiny_controlnet(path: str | Path, seed: int = 0, config: TinyZImageConfig = TinyZImageConfig()) -> Path:
    """Save :func:`build_controlnet` as a diffusers model folder (what ``--controlnet`` loads) and return its path."""
    path = Path(path)
    build_controlnet(seed, config).save_pretrained(path)
    return path


def save_tiny_controlnet_pipeline(path: str | Path, seed: int = 0, config: TinyZImageConfig = TinyZImageConfig(),
                                  layers: int | None = None) -> Path:
    """The random components with a random ControlNet, saved as a diffusers ZImageControlNetPipeline directory;
    ``layers`` as :func:`save_tiny_pipeline`."""
    from diffusers import ZImageControlNetPipeline

    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    path = Path(path)
    places = tuple(range(min(2, config.num_layers)))
    ZImageControlNetPipeline(**build_components(seed, config),  # type: ignore[attr-defined]
                             controlnet=build_controlnet(seed, config, places)).save_pretrained(path)
    return path


def real_shapes(pipeline: str) -> tuple[RealShapes, ...]:
    """Z-Image's transformer (6B), for benchmarks on random weights. Source: diffusers' ``ZImageTransformer2DModel``
    defaults, which match Tongyi-MAI/Z-Image-Turbo's as third-party ports document them (30 layers, 2 refiner layers
    each side, 30 heads, 3840 wide, Qwen3-4B captions 2560 wide, 16 latent channels in 2x2 patches: 64 per token).
    Z-Image does not pad its prompt (the transformer pads to a multiple of 32): 128 tokens stand for a long one."""
    config = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                  n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560)
    return (RealShapes("Z-Image (6B)", config, "diffusers ZImageTransformer2DModel defaults = Z-Image-Turbo",
                       latent_dim=64, text_dim=2560, text_tokens=128, depth=("n_layers", "n_refiner_layers")),)

"""Test support for FLUX.2 (never imported by the library): tiny random pipelines built from config objects, the
offline stand-ins for black-forest-labs/FLUX.2-dev (:func:`save_tiny_pipeline`, a ``Flux2Pipeline``) and
FLUX.2-klein (:func:`save_tiny_klein_pipeline`, a ``Flux2KleinPipeline``).

Every component is the real diffusers / transformers class at toy sizes (``AutoencoderKLFlux2``,
``Mistral3ForConditionalGeneration`` or ``Qwen3ForCausalLM``, ``Flux2Transformer2DModel``,
``FlowMatchEulerDiscreteScheduler``), so ``from_pretrained`` on a written directory runs the same code as the full
models. Sizes with the default :class:`TinyFlux2Config` (FLUX.2-dev in brackets):

* VAE scale factor 2 [8], 4 latent channels [32] with random batch-norm statistics (so the pipelines'
  de-normalisation matters): a 32x32 image is a 16x16 latent, patchified 2x2 into 16 channels [128] on an 8x8 token
  grid, so ``output_type="latent"`` gives ``(1, 64, 16)`` from [dev] (packed) and ``(1, 4, 16, 16)`` from [klein].
* Text encoders of hidden size 16 with 30 [40] (Mistral-3) or 27 [36] (Qwen3) layers, deep enough for the
  pipelines' default ``text_encoder_out_layers`` (10, 20, 30) and (9, 18, 27); the transformer's
  ``joint_attention_dim`` is their three stacked layers, 48 [15360].
* Transformer: 2 double-stream and 2 single-stream blocks [8, 48] of 2 heads x 16 [48 x 128], RoPE axes (4, 4, 4, 4)
  [(32, 32, 32, 32)]; ``layers=1`` is one double-stream block and no single-stream one.

The tokenizers are byte-level BPEs (any text tokenizes; bytes are the fallback) whose merges spell the words of the
toy world and of the chat templates as whole tokens, carrying the chat template the pipelines call
(``apply_chat_template``). [dev]'s real tokenizer component is a ``PixtralProcessor``, whose image processor needs
torchvision (which does not load here); the pipeline only calls its ``apply_chat_template``, which a tokenizer has
too, so the stand-in is a tokenizer with a Mistral-style template: ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]
...[/INST]``, padding on the left as the ``LlamaTokenizer`` class does. FLUX.2's system message is one added token
here, so a short test ``max_sequence_length`` (16) keeps the prompt's words (with the real tokenizer it is about 30
tokens of the 512). [klein]'s is Qwen3's template (a user turn, then the assistant's empty thinking block), padding
on the right as Qwen's tokenizer does.
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
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

from ...tiny.tokenizers import DEFAULT_WORDS, _byte_symbols
from ..testing import RealShapes, randomise

if TYPE_CHECKING:  # for mypy `from diffusers import ...` is diffusers' torch-less dummy class, without the methods
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
else:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

MISTRAL_SPECIALS = ("<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
QWEN3_WORDS = ("user", "assistant", "system", "\n\n")


@dataclass(frozen=True)
class TinyFlux2Config:
    """Sizes of the random pipelines; ``len(vae_channels)`` levels give VAE scale factor ``2 ** (levels - 1)``."""

    text_dim: int = 16
    mistral_layers: int = 30
    qwen_layers: int = 27
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (8, 16)
    num_layers: int = 2
    num_single_layers: int = 2
    heads: int = 2
    head_dim: int = 16
    axes_dims_rope: tuple[int, ...] = (4, 4, 4, 4)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE on one pre-token: merge the lowest-ranked adjacent pair until none is in ``ranks``."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2:]]
    return symbols


def build_tokenizer(pieces: Iterable[str], specials: Iterable[str], template: str, **kwargs: Any) -> Qwen2Tokenizer:
    """A byte-level BPE: every byte symbol, merges spelling each of ``pieces`` (each merge appended after running
    BPE with the merges so far, so no earlier piece changes), then ``specials`` as added special tokens."""
    byte_symbols = _byte_symbols()
    vocab: dict[str, int] = {s: i for i, s in enumerate(byte_symbols)}
    ranks: dict[tuple[str, str], int] = {}
    for piece in dict.fromkeys(pieces):
        tokens = _bpe([byte_symbols[b] for b in piece.encode("utf-8")], ranks)
        while len(tokens) > 1:
            ranks[(tokens[0], tokens[1])] = len(ranks)
            vocab.setdefault(tokens[0] + tokens[1], len(vocab))
            tokens = _bpe(tokens, ranks)
    specials = list(specials)
    for special in specials:
        vocab[special] = len(vocab)
    # the tokenizers BPE takes merges as (left, right) pairs; transformers annotates them list[str]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(ranks), model_max_length=32768, **kwargs)  # type: ignore[arg-type]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


def _words(words: Iterable[str]) -> list[str]:
    return [p for w in words for p in (w, " " + w)]


def build_mistral_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Qwen2Tokenizer:
    """[dev]'s stand-in tokenizer: Mistral-style specials and template, FLUX.2's system message one token."""
    return build_tokenizer(_words(words), [*MISTRAL_SPECIALS, SYSTEM_MESSAGE], MISTRAL_TEMPLATE, bos_token="<s>",
                           eos_token="</s>", pad_token="<pad>", unk_token=None, padding_side="left")


def build_qwen3_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Qwen2Tokenizer:
    """[klein]'s stand-in tokenizer: Qwen's specials and a Qwen3-style template."""
    return build_tokenizer([*QWEN3_WORDS, *_words(words)], QWEN_SPECIALS, QWEN3_TEMPLATE,
                           eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)


def _mistral(tokenizer: Qwen2Tokenizer, config: TinyFlux2Config) -> Mistral3ForConditionalGeneration:
    dim, heads = config.text_dim, 2
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": dim,
                     "intermediate_size": 2 * dim, "num_hidden_layers": config.mistral_layers,
                     "num_attention_heads": heads, "num_key_value_heads": 1, "head_dim": dim // heads,
                     "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 8},
        image_token_index=cast(int, tokenizer.convert_tokens_to_ids("[IMG]")),  # one token in, one id out
    ))


def _qwen3(tokenizer: Qwen2Tokenizer, config: TinyFlux2Config) -> Qwen3ForCausalLM:
    dim, heads = config.text_dim, 2
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=config.qwen_layers,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=dim // heads, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_components(seed: int = 0, config: TinyFlux2Config = TinyFlux2Config(), klein: bool = False) -> dict[str, Any]:
    """The five FLUX.2 components at toy size ([klein]'s text encoder and tokenizer with ``klein``), every parameter
    (and the VAE's batch-norm statistics) drawn deterministically from ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_qwen3_tokenizer() if klein else build_mistral_tokenizer()
    text_encoder = _qwen3(tokenizer, config) if klein else _mistral(tokenizer, config)
    levels = len(config.vae_channels)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.vae_channels), layers_per_block=1, latent_channels=config.latent_channels,
        norm_num_groups=4, sample_size=32,
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * config.latent_channels, num_layers=config.num_layers,
        num_single_layers=config.num_single_layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.heads, joint_attention_dim=3 * config.text_dim, timestep_guidance_channels=32,
        axes_dims_rope=tuple(config.axes_dims_rope), guidance_embeds=not klein,
    )
    for model in (text_encoder, vae, transformer):
        randomise(model, generator)
        model.eval()
    with torch.no_grad():  # batch-norm statistics are buffers, which randomise leaves alone
        channels = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_(0.3 * torch.randn(channels, generator=generator))
        vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.2-dev's scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "transformer": transformer}


def _sized(config: TinyFlux2Config, layers: int | None) -> TinyFlux2Config:
    if layers is None:
        return config
    return dataclasses.replace(config, num_layers=layers, num_single_layers=0 if layers == 1 else layers)


def save_tiny_pipeline(path: str | Path, seed: int = 0, config: TinyFlux2Config = TinyFlux2Config(),
                       layers: int | None = None) -> Path:
    """Save a random tiny FLUX.2 [dev] pipeline (a diffusers ``Flux2Pipeline`` directory) and return its path;
    ``layers=1`` makes the transformer one double-stream block (no single-stream ones)."""
    from diffusers import Flux2Pipeline

    path = Path(path)
    # mypy takes `from diffusers import Flux2Pipeline` for diffusers' torch-less dummy class, without the methods
    Flux2Pipeline(**build_components(seed, _sized(config, layers))).save_pretrained(path)  # type: ignore[attr-defined]
    return path


def save_tiny_klein_pipeline(path: str | Path, seed: int = 0, config: TinyFlux2Config = TinyFlux2Config(),
                             layers: int | None = None, distilled: bool = False) -> Path:
    """Save a random tiny FLUX.2 [klein] pipeline (a diffusers ``Flux2KleinPipeline`` directory; ``distilled``: a
    step-distilled checkpoint, which runs no CFG) and return its path; ``layers`` as :func:`save_tiny_pipeline`."""
    from diffusers import Flux2KleinPipeline

    path = Path(path)
    components = build_components(seed, _sized(config, layers), klein=True)
    Flux2KleinPipeline(**components, is_distilled=distilled).save_pretrained(path)  # type: ignore[attr-defined]
    return path


# The released FLUX.2 transformers (Flux2Transformer2DModel). [dev]: diffusers' defaults, which are
# black-forest-labs/FLUX.2-dev's transformer/config.json (8 double- and 48 single-stream blocks, 48 heads x 128, the
# three stacked Mistral-Small-3.2 layers 3 x 5120 = 15360 wide, 128 packed latent channels, embedded guidance).
# [klein] 4B: 5 + 20 blocks, 24 heads x 128 (3072 wide), three Qwen3-4B layers 3 x 2560 = 7680; [klein] 9B: 6 + 24
# blocks, 32 heads x 128 (4096 wide), three Qwen3-8B layers 3 x 4096 = 12288; no embedded guidance. The [klein]
# numbers are read from InvokeAI's FLUX.2 parameter presets (invokeai/backend/flux2, Klein4B / Klein9B) and mflux's
# FLUX.2 notes (5 + 20 and 6 + 24 blocks, 128 latent channels); the rest of each config is diffusers' default (its
# mlp_ratio 3, RoPE axes (32, 32, 32, 32), theta 2000), not read from the released config.json. Every prompt is padded
# to 512 tokens.
_FLUX2_DEV = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                  num_attention_heads=48, joint_attention_dim=15360, guidance_embeds=True)
_FLUX2_KLEIN = {"4B": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
                "9B": dict(num_layers=6, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)}


def real_shapes(pipeline: str) -> tuple[RealShapes, ...]:
    """The released transformers serving ``pipeline`` (``"Flux2Pipeline"``: [dev]; ``"Flux2KleinPipeline"``: [klein]
    4B and 9B), for benchmarks on random weights (sources above)."""
    depth = ("num_layers", "num_single_layers")
    if pipeline != "Flux2KleinPipeline":
        return (RealShapes("FLUX.2 [dev]", _FLUX2_DEV, "diffusers Flux2Transformer2DModel defaults = FLUX.2-dev",
                           latent_dim=128, text_dim=15360, text_tokens=512, depth=depth),)
    return tuple(RealShapes(f"FLUX.2 [klein] {size}", {**_FLUX2_DEV, **sizes, "guidance_embeds": False},
                            "InvokeAI / mflux FLUX.2 [klein] presets; the rest diffusers' defaults", latent_dim=128,
                            text_dim=sizes["joint_attention_dim"], text_tokens=512, depth=depth)
                 for size, sizes in _FLUX2_KLEIN.items())

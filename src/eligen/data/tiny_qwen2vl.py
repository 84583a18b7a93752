"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints built locally (no download), for tests of the VLM backend.

:func:`save_tiny_qwen2_vl` and :func:`save_tiny_qwen2_5_vl` write a directory with a random model (one text
layer, one vision block, hidden size 32), a real ``Qwen2Tokenizer`` (byte-level BPE over the 256 byte symbols plus
Qwen's special tokens), the PIL ``Qwen2VLImageProcessorPil`` (no torchvision needed), the Qwen2-VL chat template
and a generation config, all through ``save_pretrained``. ``TransformersBackend(path)`` then loads it through
exactly the same ``from_pretrained`` code as ``Qwen/Qwen2-VL-7B-Instruct``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..tiny.tokenizers import _byte_symbols

# Qwen2-VL's special tokens, in the order of the real vocabulary (151643 onwards there).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

MERGE_WORDS = ("Caption", "caption", "the", "image", "label", "bbox", "apple", "red", "blue")

# The chat template of Qwen/Qwen2-VL-7B-Instruct (Qwen2.5-VL uses the same one).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

HIDDEN = 32
HEADS = 2
MROPE_SECTION = [2, 3, 3]  # sums to head_dim / 2 = HIDDEN / HEADS / 2
MIN_PIXELS = 28 * 28  # a 56x56 image becomes 2x2 merged patches (4 image tokens)
MAX_PIXELS = 56 * 56


def build_qwen2_tokenizer(words=MERGE_WORDS) -> Qwen2Tokenizer:
    """Byte-level BPE: every byte symbol, merges spelling ``words``, then Qwen2-VL's special tokens."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {s: i for i, s in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        left = word[0]
        for char in word[1:]:
            merged = left + char
            if merged not in vocab:
                merges.append((left, char))
                vocab[merged] = len(vocab)
            left = merged
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    # the tokenizers BPE takes merges as (left, right) pairs; transformers annotates them list[str]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)  # type: ignore[arg-type]
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def _text_config(tokenizer: Qwen2Tokenizer, vocab_size: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "max_window_layers": 1,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(MROPE_SECTION)},
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def _token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, Any]:  # keyword arguments of the VL configs
    ids: dict[str, Any] = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    if tokenizer.unk_token_id in ids.values():
        raise RuntimeError(f"tiny Qwen2 tokenizer lacks a vision token: {ids}")
    return ids


def _save(path: Path, model, processor_class: str, tokenizer: Qwen2Tokenizer) -> Path:
    """Model, tokenizer (with the chat template) and image processor, laid out like a Hub checkpoint.

    ``Qwen2VLProcessor(...).save_pretrained`` cannot run without torchvision in transformers 5.x (the processor
    checks its ``video_processor`` argument against ``VideoProcessorMixin``, which only exists with torchvision),
    so the parts are saved one by one: ``config.json`` + weights, ``tokenizer.json`` + ``chat_template.jinja`` and
    ``preprocessor_config.json`` naming ``processor_class``, the same files as ``Qwen/Qwen2-VL-7B-Instruct``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    im_end, eot = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    model.save_pretrained(path)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    image_processor.save_pretrained(path)
    config_file = path / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["processor_class"] = processor_class
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def save_tiny_qwen2_vl(path: Path, seed: int = 0) -> Path:
    """Write a tiny random ``Qwen2VLForConditionalGeneration`` with its processor into ``path``; return ``path``."""
    tokenizer = build_qwen2_tokenizer()
    vocab_size = len(tokenizer)
    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer, vocab_size),
        vision_config={
            "depth": 1, "embed_dim": HIDDEN, "hidden_size": HIDDEN, "mlp_ratio": 2, "num_heads": HEADS,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return _save(path, model, "Qwen2VLProcessor", tokenizer)


def save_tiny_qwen2_5_vl(path: Path, seed: int = 0) -> Path:
    """Write a tiny random ``Qwen2_5_VLForConditionalGeneration`` with its processor into ``path``."""
    tokenizer = build_qwen2_tokenizer()
    vocab_size = len(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, vocab_size),
        vision_config={
            "depth": 1, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_heads": HEADS,
            "out_hidden_size": HIDDEN, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 56, "fullatt_block_indexes": [0],
        },
        **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return _save(path, model, "Qwen2_5_VLProcessor", tokenizer)

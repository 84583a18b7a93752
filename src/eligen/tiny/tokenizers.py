"""Tokenizers built locally (no download): a byte-level CLIP BPE and a T5 unigram vocabulary.

They are real ``CLIPTokenizer`` / ``T5Tokenizer`` objects, so a pipeline directory saved with them loads
through exactly the same ``from_pretrained`` code as the released models.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from transformers import CLIPTokenizer, T5Tokenizer

DEFAULT_WORDS = (
    "a an the and of on in with at to by near under over next left right top bottom middle small large big tiny "
    "red orange yellow green blue purple pink brown black white gray grey cyan magenta gold silver "
    "circle square triangle star heart ring cross diamond ellipse rectangle hexagon shape background "
    "cat dog bird apple tree house car person man woman child flower sky sea grass table chair sofa cup book "
    "photo painting picture blurry ugly"
).split()


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table, as a list indexed by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = dict(zip(printable, printable, strict=True)), 0
    for byte in range(256):
        if byte not in codes:
            codes[byte] = 256 + extra
            extra += 1
    return [chr(codes[b]) for b in range(256)]


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77) -> CLIPTokenizer:
    """Byte-level BPE with every byte (plain and word-final) plus merges that spell out ``words``."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        if not word.isascii() or len(word) < 2:
            continue
        left = word[0]
        for i, char in enumerate(word[1:], start=1):
            right = char + ("</w>" if i == len(word) - 1 else "")
            merged = left + right
            if merged not in vocab:
                merges.append((left, right))
                vocab[merged] = len(vocab)
            left = merged
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    # the tokenizers BPE takes merges as (left, right) pairs; transformers annotates them list[str]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)  # type: ignore[arg-type]


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 512) -> T5Tokenizer:
    """A unigram vocabulary: specials, whole words (``▁word``) and single characters as a fallback."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + w, -3.0) for w in sorted(set(words))]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)

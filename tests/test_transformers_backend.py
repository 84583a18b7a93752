"""TransformersBackend on tiny random Qwen2-VL / Qwen2.5-VL checkpoints saved to disk (offline, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from eligen.data.parse import ANNOTATE_INSTRUCTIONS_QWEN2, Annotation, ParseError, parse_annotation
from eligen.data.tiny_qwen2vl import SPECIAL_TOKENS, save_tiny_qwen2_5_vl, save_tiny_qwen2_vl
from eligen.data.transformers_backend import TransformersBackend

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl") / "model", seed=0)


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl") / "model", seed=0)


@pytest.fixture(scope="module")
def qwen2(qwen2_dir):
    return TransformersBackend(qwen2_dir, device="cpu", max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def qwen25(qwen25_dir):
    return TransformersBackend(qwen25_dir, device="cpu", max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def image():
    pixels = np.random.default_rng(0).integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_tiny_checkpoint_token_ids_match_tokenizer(qwen2):
    config, tokenizer = qwen2.model.config, qwen2.tokenizer
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    for token in SPECIAL_TOKENS:  # each special token is one id, not spelled out in bytes
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert config.text_config.vocab_size >= len(tokenizer)


@pytest.mark.parametrize(("backend", "convention"), [("qwen2", "qwen2"), ("qwen25", "qwen25")])
def test_convention_auto_detected(request, backend, convention):
    assert request.getfixturevalue(backend).convention == convention


def test_convention_override(qwen2_dir):
    assert TransformersBackend(qwen2_dir, device="cpu", convention="qwen25").convention == "qwen25"
    with pytest.raises(ValueError, match="convention"):
        TransformersBackend(qwen2_dir, device="cpu", convention="yolo")


@pytest.mark.parametrize("backend", ["qwen2", "qwen25"])
def test_ask_with_and_without_image_is_deterministic(request, backend, image):
    vlm = request.getfixturevalue(backend)
    with_image = vlm.ask("Describe this image.", image)
    assert isinstance(with_image, str)
    assert vlm.ask("Describe this image.", image) == with_image
    text_only = vlm.ask("Plan a layout of a cat on a sofa.")
    assert isinstance(text_only, str)
    assert vlm.ask("Plan a layout of a cat on a sofa.") == text_only
    for answer in (with_image, text_only):
        assert "<|im_end|>" not in answer and "<|endoftext|>" not in answer


def test_image_reaches_the_model(qwen2, image):
    import torch

    logits = []
    for picture in (image, Image.new("RGB", (56, 56), "red")):
        inputs = qwen2._inputs("Describe this image.", picture)
        n_image_tokens = int((inputs["input_ids"] == qwen2.model.config.image_token_id).sum())
        assert n_image_tokens == 4  # 56x56 -> 4x4 patches of 14 -> 2x2 after the 2x2 merge
        with torch.no_grad():
            logits.append(qwen2.model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("limit", [1, 5])
def test_max_new_tokens_respected(qwen2_dir, image, limit):
    vlm = TransformersBackend(qwen2_dir, device="cpu", max_new_tokens=limit)
    answer = vlm.ask("Describe this image.", image)
    assert 1 <= vlm.last_num_tokens <= limit
    # Random weights emit stray bytes that may not form valid UTF-8, so re-encoding the answer can take more
    # tokens than were generated; bound its length by the longest token text instead.
    assert len(answer) <= limit * max(len(token) for token in SPECIAL_TOKENS)


def test_grounding_tokens_are_kept(qwen2):
    """Decoding keeps <|box_start|> & co. (Qwen2-VL grounding) and drops only end/pad tokens."""
    tokenizer = qwen2.tokenizer
    ids = tokenizer("<|object_ref_start|>a red apple<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|><|im_end|>",
                    add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    for token in qwen2._strip:
        text = text.replace(token, "")
    assert text == "<|object_ref_start|>a red apple<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    assert parse_annotation("Caption: a table\n" + text, 1000, 1000, convention="qwen2").entities


def test_unsupported_model_type_refused(qwen2_dir, tmp_path):
    bad = tmp_path / "llama"
    bad.mkdir()
    config = json.loads((qwen2_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": config["text_config"]
                                                 ["vocab_size"], "hidden_size": 32, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"unsupported model type 'llama'.*qwen2_5_vl, qwen2_vl"):
        TransformersBackend(bad, device="cpu")


@pytest.mark.parametrize("backend", ["qwen2", "qwen25"])
def test_answer_goes_through_parse_annotation(request, backend, image):
    vlm = request.getfixturevalue(backend)
    answer = vlm.ask(ANNOTATE_INSTRUCTIONS_QWEN2.format(max_entities=3), image)
    try:
        result = parse_annotation(answer, image.width, image.height, convention=vlm.convention)
    except ParseError:
        return
    assert isinstance(result, Annotation)


def test_is_a_vlm_backend(qwen2):
    from eligen.data.vlm import VLMBackend

    assert isinstance(qwen2, VLMBackend)
    assert "qwen2_vl" in repr(qwen2)

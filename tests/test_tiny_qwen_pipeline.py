"""The tiny random QwenImagePipeline: saves, loads through from_pretrained, runs, and tokenizes the template right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

from eligen.families.qwen_image.testing import (
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_START_IDX,
    TinyQwenImageConfig,
)
from eligen.families.qwen_image.testing import build_components as build_tiny_qwen_image_components
from eligen.families.qwen_image.testing import save_tiny_pipeline as save_tiny_qwen_image_pipeline

CALL = {"height": 32, "width": 48, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def qwen_pipe(tmp_path_factory):
    path = save_tiny_qwen_image_pipeline(tmp_path_factory.mktemp("tiny-qwen-image") / "pipe", seed=0)
    pipe = QwenImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, output_type="np", **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt="a red circle", generator=generator, output_type=output_type, **CALL, **kwargs).images


def test_loads_with_the_documented_sizes(qwen_pipe):
    config = TinyQwenImageConfig()
    assert qwen_pipe.vae_scale_factor == 2
    assert qwen_pipe.vae.config.z_dim == config.latent_channels == 4
    assert qwen_pipe.transformer.config.in_channels == 16
    assert qwen_pipe.transformer.config.joint_attention_dim == qwen_pipe.text_encoder.config.text_config.hidden_size
    assert qwen_pipe.scheduler.config.use_dynamic_shifting
    built = _state(build_tiny_qwen_image_components(seed=0))
    loaded = _state({name: getattr(qwen_pipe, name) for name in ("vae", "text_encoder", "transformer")})
    assert built.keys() == loaded.keys() and all(torch.equal(built[k], loaded[k]) for k in built)


def test_generates_an_image_and_true_cfg_changes_it(qwen_pipe):
    image = _generate(qwen_pipe)
    assert image.shape == (1, 32, 48, 3)
    assert np.isfinite(image).all() and image.std() > 0
    guided = _generate(qwen_pipe, negative_prompt="blurry", true_cfg_scale=4.0)
    assert guided.shape == image.shape and np.isfinite(guided).all()
    assert not np.allclose(guided, image)


def test_latent_output_is_packed_8x12_tokens(qwen_pipe):
    latents = _generate(qwen_pipe, output_type="latent")
    assert latents.shape == (1, 96, 16)  # 32x48 -> 16x24 latent -> 8x12 patches of 2x2x4
    assert torch.isfinite(latents).all()


def test_template_prefix_is_exactly_the_dropped_tokens(qwen_pipe):
    tokenizer = qwen_pipe.tokenizer
    assert qwen_pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert qwen_pipe.prompt_template_encode_start_idx == PROMPT_TEMPLATE_START_IDX == 34
    prefix, suffix = PROMPT_TEMPLATE.split("{}")
    prefix_ids = tokenizer(prefix).input_ids
    assert len(prefix_ids) == 34
    user_ids = tokenizer("a red circle" + suffix).input_ids
    assert tokenizer(PROMPT_TEMPLATE.format("a red circle")).input_ids == prefix_ids + user_ids
    embeds, _ = qwen_pipe._get_qwen_prompt_embeds("a red circle")
    assert embeds.shape == (1, len(user_ids), qwen_pipe.transformer.config.joint_attention_dim)
    assert tokenizer.convert_ids_to_tokens(user_ids[:3]) == ["a", "Ġred", "Ġcircle"]


def test_prompts_tokenize_and_embed_differently(qwen_pipe):
    tokenizer = qwen_pipe.tokenizer
    unknown = tokenizer.unk_token_id
    for prompt in ("a red circle", "a dog", "a cat on a blue background", "blurry", "an unlisted zebra!"):
        ids = tokenizer(prompt).input_ids
        assert ids and unknown not in ids
        assert tokenizer.decode(ids) == prompt
    assert len(tokenizer("a cat on a blue background").input_ids) == 6  # one token per listed word
    red, _ = qwen_pipe._get_qwen_prompt_embeds("a red circle")
    blue, _ = qwen_pipe._get_qwen_prompt_embeds("a blue circle")
    assert red.shape == blue.shape and not torch.allclose(red, blue)
    assert torch.isfinite(red).all()


def _state(components):
    return {
        f"{name}.{key}": value
        for name in ("vae", "text_encoder", "transformer")
        for key, value in components[name].state_dict().items()
    }


def test_parameters_are_deterministic_in_the_seed():
    first, again, other = (_state(build_tiny_qwen_image_components(seed)) for seed in (0, 0, 1))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    params = [k for k in first if first[k].is_floating_point() and first[k].numel() > 1 and "freq" not in k]
    assert any(not torch.equal(first[k], other[k]) for k in params)
    # nothing is left zero-initialised (biases included)
    assert not [k for k in params if not first[k].abs().sum() > 0]

"""The Python API gives what the CLI gives: a model's declared defaults (steps, true CFG, token length, native
size, its LoRA) fill whatever a call leaves out; sizes far from the native one are warned about."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from eligen import EliGenPipeline, load_layout
from eligen.cli import main

LAYOUT = "examples/tiny_two_shapes.json"


@pytest.fixture(scope="module")
def tiny():
    pipe = EliGenPipeline.from_pretrained("eligen-tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_api_equals_the_cli_on_the_shipped_model(tiny, tmp_path):
    assert main(["generate", LAYOUT, "-o", str(tmp_path / "cli.png"), "--seed", "5", "--no-progress"]) == 0
    layout = load_layout(LAYOUT)
    steps = []
    image = tiny(prompt=layout.prompt, negative_prompt=layout.negative_prompt, entities=layout.entities,
                 height=layout.height, width=layout.width, generator=torch.Generator("cpu").manual_seed(5),
                 callback_on_step_end=lambda p, i, t, s: steps.append(i) or s).images[0]
    assert len(steps) == 20  # the model's 20 steps, not diffusers' 28
    assert tiny.get_active_adapters() == ["eligen"]  # its LoRA
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")))


def test_a_bare_call_uses_the_native_size_and_true_cfg(tiny):
    calls = []
    original = tiny._velocity

    def spy(latents, timestep, branch, geometry, guidance):
        calls.append(branch.context.shape[1])
        return original(latents, timestep, branch, geometry, guidance)

    tiny._velocity = spy
    try:
        image = tiny(prompt="a red circle on a gray background", num_inference_steps=2).images[0]
    finally:
        del tiny._velocity
    assert image.size == (64, 64)
    assert len(calls) == 4 and set(calls) == {32}  # true CFG with an empty negative prompt; 32-token prompts
    plain = tiny(prompt="a red circle on a gray background", num_inference_steps=2, true_cfg_scale=1.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert plain.size == (64, 64)


def test_without_the_default_lora_and_on_models_without_defaults(tiny_pipe):
    bare = EliGenPipeline.from_pretrained("eligen-tiny", load_default_lora=False)
    assert not getattr(bare.transformer, "peft_config", None)
    assert tiny_pipe.eligen_defaults == {} and tiny_pipe.native_size() == (256, 256)  # diffusers' default size


def test_a_size_far_from_the_native_one_is_named(tiny, caplog):
    for side in (160, 16):  # 6.25x and 1/16 of the native pixel count: both beyond the factor of 4
        with caplog.at_level(logging.WARNING, logger="eligen"):
            tiny(prompt="a red circle", height=side, width=side, num_inference_steps=1, output_type="latent")
        assert f"{side}x{side} is far from the 64x64" in caplog.text
        caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eligen"):
        tiny(prompt="a red circle", height=96, width=64, num_inference_steps=1, output_type="latent")
    assert "far from" not in caplog.text


def test_given_sigmas_set_the_number_of_steps_as_in_diffusers(tiny_pipe):
    from eligen import reference_sigmas

    steps = []
    tiny_pipe(prompt="a red circle", height=32, width=32, max_sequence_length=16, output_type="latent",
              sigmas=reference_sigmas(3), shift_sigmas=False,
              callback_on_step_end=lambda p, i, t, s: steps.append(i) or s)
    assert steps == [0, 1, 2]

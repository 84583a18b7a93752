"""A lean core install: inference pulls only what inference needs; training says how to get its extra."""

from __future__ import annotations

import importlib.metadata
import re

import pytest


def requirements(extra: str | None = None) -> set[str]:
    names = set()
    for line in importlib.metadata.requires("eligen") or []:
        marker = re.search(r'extra == "([^"]+)"', line)
        if (marker.group(1) if marker else None) == extra:
            names.add(re.split(r"[<>=!\[ ;]", line, maxsplit=1)[0].lower())
    return names


def test_the_core_install_is_inference_only():
    core = requirements()
    assert {"torch", "diffusers", "transformers", "peft", "safetensors", "pillow"} <= core
    assert not core & {"tensorboard", "deepspeed", "pyyaml", "pytest", "gradio"}
    assert {"tensorboard", "pyyaml"} <= requirements("train")
    assert "deepspeed" in requirements("deepspeed")
    assert "eligen" in requirements("dev")  # dev pulls the train extra: the tests train


def test_training_without_its_extra_names_the_fix(monkeypatch, tmp_path):
    import importlib.util

    from eligen.train.trainer import require_training_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'eligen\[train\]'"):
        require_training_extra()


def test_the_web_app_without_its_extra_names_the_fix(monkeypatch, capsys):
    import importlib.util

    from eligen.cli import main

    assert {"starlette", "uvicorn"} <= requirements("ui") and "eligen" in requirements("dev")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["ui", "--port", "0"]) == 2
    assert "pip install 'eligen[ui]'" in capsys.readouterr().err


def lock() -> dict[str, str]:
    """constraints.txt, the lock every Makefile install reads: package name -> pinned version."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "constraints.txt").read_text()
    pins = [line.split("==") for line in text.splitlines() if line and not line.startswith("#")]
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


def test_the_lock_pins_every_requirement_and_this_environment_is_it():
    from packaging.requirements import Requirement

    pins = lock()
    assert pins["torch"] == "2.13.0"
    for line in importlib.metadata.requires("eligen") or []:
        requirement = Requirement(line)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in ("eligen", "deepspeed"):  # deepspeed: an optional extra for GPU machines, not locked
            continue
        assert name in pins, f"{name} is not in constraints.txt; run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert installed.split("+")[0] == version, f"{name} {installed} is installed, the lock says {version}: " \
                                                    "make install-dev installs the lock"


def test_diffusers_loads_a_flux_lora_with_text_encoder_weights(tmp_path, tiny_pipeline_dir):
    # what diffusers' own Flux LoRA tests do: a LoRA on the CLIP text encoder and the transformer, saved with
    # save_lora_weights and loaded back with load_lora_weights, gives the same image (transformers 5.24 with the
    # released peft could not even add the adapter)
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    def image(pipe):
        return pipe(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
                    max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images

    pipe = FluxPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    plain = image(pipe)
    torch.manual_seed(0)
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with_lora = image(pipe)
    assert not (with_lora == plain).all()
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                   text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    fresh = FluxPipeline.from_pretrained(tiny_pipeline_dir)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    assert (image(fresh) == with_lora).all()

"""Shared fixtures: tiny random FLUX and Qwen-Image pipelines saved to disk and loaded through from_pretrained (no
download)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The models here are tiny: one thread is fastest and immune to a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A random tiny FluxPipeline directory (VAE scale factor 2, guidance-embedded transformer)."""
    from eligen.families.flux.testing import save_tiny_pipeline as save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A random tiny QwenImagePipeline directory (VAE scale factor 2, the real prompt template)."""
    from eligen.families.qwen_image.testing import save_tiny_pipeline as save_tiny_qwen_image_pipeline

    return save_tiny_qwen_image_pipeline(tmp_path_factory.mktemp("tiny-qwen") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_kontext_dir(tmp_path_factory):
    """A random tiny FluxKontextPipeline directory (an edit model: the same components as :func:`tiny_pipeline_dir`)."""
    from eligen.families.flux.testing import save_tiny_kontext_pipeline

    return save_tiny_kontext_pipeline(tmp_path_factory.mktemp("tiny-kontext") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipeline_dir):
    from eligen import EliGenPipeline

    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def stock_pipe(tiny_pipeline_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def random_lora_file(tiny_pipeline_dir, tmp_path_factory):
    """A diffusers-format LoRA for the tiny pipeline with random (non-zero) B matrices: it changes the output."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from eligen import EliGenPipeline

    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                            target_modules=["to_q", "to_k", "to_v", "proj_out"]))
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("random-lora")
    EliGenPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return next(folder.glob("*.safetensors"))

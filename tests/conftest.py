"""Shared fixtures: a tiny random FLUX pipeline saved to disk and loaded through from_pretrained (no download)."""

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
    from eligen.tiny.random_pipeline import save_tiny_flux_pipeline

    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipe", seed=0)


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

"""Small training runs shared by the training tests: a config at the tiny pipelines' sizes, the LoRA written."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from eligen.train.trainer import TrainConfig


def small_config(tmp_path: Path, model, data, **overrides) -> TrainConfig:
    base = dict(model=str(model), dataset=data, output_dir=tmp_path / "out", resolution=32, rank=4, max_steps=3,
                batch_size=2, checkpoint_every=100, max_sequence_length=16, log_every=1, learning_rate=1e-3)
    return TrainConfig(**{**base, **overrides})


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "eligen_lora.safetensors"))

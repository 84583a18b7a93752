"""`eligen tiny build`'s options (torch-free, so the CLI validates them before loading anything)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import option


@dataclass
class TinyBuildConfig:
    """`eligen tiny build`: sizes and budgets of the three training stages."""

    out: Path = option(Path("eligen-tiny"), "output pipeline directory", short="-o")
    seed: int = option(0, "seed of everything (data, initialisation, noise)")
    size: int = option(64, "image side in pixels")
    vae_steps: int = option(500, "VAE training steps")
    base_steps: int = option(3600, "text-to-image base training steps")
    lora_steps: int = option(1800, "EliGen LoRA training steps (eligen train)")
    vae_batch_size: int = option(16, "batch size of the VAE stage")
    batch_size: int = option(32, "batch size of the base stage")
    lora_batch_size: int = option(16, "batch size of the LoRA stage")
    base_samples: int = option(24000, "world images encoded once for the base stage (at most steps x batch)")
    base_learning_rate: float = option(1e-3, "peak AdamW learning rate of the base stage (cosine decay)")
    lora_rank: int = option(16, "LoRA rank")
    lora_learning_rate: float = option(1e-3, "AdamW learning rate of the LoRA stage")
    lora_samples: int = option(8000, "world images in the LoRA training set")
    max_sequence_length: int = option(32, "T5 tokens per prompt segment of the tiny model")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if min(self.vae_steps, self.base_steps, self.lora_steps, self.vae_batch_size, self.batch_size,
               self.lora_batch_size, self.base_samples) < 1:
            raise ValueError("step counts, batch sizes and base_samples must be >= 1")
        if min(self.base_learning_rate, self.lora_learning_rate) <= 0:
            raise ValueError("learning rates must be > 0")

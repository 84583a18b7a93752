"""Training throughput: samples/s of `eligen train` on the tiny random pipeline (or any --model), on this machine.

    python benchmarks/train_throughput.py                     # tiny random FLUX, toy boxes, CPU
    python benchmarks/train_throughput.py --model DIR --resolution 512

Runs the same number of steps twice in one process: with the toy data's 1-3 entities per image (regional mask,
64-token prompt segments) and with no entities at all (the plain FLUX training cost), and prints the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from eligen.families.flux.testing import save_tiny_pipeline as save_tiny_flux_pipeline
from eligen.tiny.toy_data import write_box_dataset
from eligen.train.trainer import TrainConfig, Trainer


def samples_per_second(config: TrainConfig) -> float:
    """Samples/s over ``max_steps`` steps that follow as many warm-up steps (text cache, allocator): the same trainer
    goes on from its own last checkpoint."""
    trainer = Trainer(config)
    trainer.train()
    trainer.config = dataclasses.replace(trainer.config, max_steps=2 * config.max_steps, resume=True)
    start, before = time.perf_counter(), trainer.step
    trainer.train()
    steps = trainer.step - before
    return steps * config.batch_size * config.gradient_accumulation / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers FLUX directory (default: a tiny random one built here)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eligen-throughput-") as folder:  # removed however the run ends
        run(args, Path(folder))


def run(args: argparse.Namespace, work: Path) -> None:
    model = args.model or str(save_tiny_flux_pipeline(work / "model"))
    data = write_box_dataset(work / "data", 32, args.resolution, args.resolution)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, model {model}, {args.resolution}px, "
          f"batch {args.batch_size}, rank {args.rank}")
    rates = {}
    for name, max_entities in (("global prompt only", 0), ("with entities", None)):
        config = TrainConfig(model=model, dataset=data, output_dir=work / name.replace(" ", "_"),
                             resolution=args.resolution, rank=args.rank, batch_size=args.batch_size,
                             max_steps=args.steps, checkpoint_every=10**6, max_entities=max_entities, log_every=10**6,
                             max_sequence_length=64, progress=False)
        rates[name] = samples_per_second(config)
        print(f"{name:20s}: {rates[name]:.2f} samples/s", flush=True)
    print(f"entities cost: {rates['global prompt only'] / rates['with entities']:.2f}x the plain training step")


if __name__ == "__main__":
    main()

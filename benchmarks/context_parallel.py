"""EliGen under diffusers' context parallelism (docs/design.md section 24): one image on several devices.

Launched by torchrun, every rank builds the same random pipeline (``e2e_models.SIZES``), rank 0 renders the image on
its own device first (the single-device reference), then all ranks render it with
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))``. Rank 0 writes the
largest difference between the two latents and both times.

    python3 -m torch.distributed.run --nproc_per_node 8 benchmarks/context_parallel.py --size flux-dev --json cp.json

``--device cuda`` puts rank r on GPU r (NCCL) and needs one GPU per rank; ``--device cpu`` runs the ranks on the CPU
with gloo (the equality at tiny sizes, when fewer GPUs than ranks exist: a lent machine has one).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from diffusers import ContextParallelConfig
from e2e_models import SIZES, build_components, make_inputs, pipelines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(s for s in SIZES if "1block" not in s))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--entities", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def render(pipe, inputs: dict, steps: int) -> tuple[torch.Tensor, float]:
    """``(latents, seconds)`` of one EliGen image with the dense mask and CFG off."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = pipe(**inputs, num_inference_steps=steps, output_type="latent", attention="dense",
               true_cfg_scale=1.0).images
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out.float().cpu(), time.perf_counter() - start


def main() -> None:
    args = parse_args()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    cuda = args.device == "cuda"
    if cuda and torch.cuda.device_count() < world:
        raise SystemExit(f"{world} ranks need {world} GPUs, {torch.cuda.device_count()} found; pass --device cpu")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(rank)
    else:  # diffusers 0.42.1 places rank r on device r % torch.accelerator.device_count(), 0 on a CPU-only torch
        torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    size = SIZES[args.size]
    torch.manual_seed(0)
    components = build_components(size, device, dtype)
    for param in components["transformer"].parameters():  # the same random weights on every rank
        torch.distributed.broadcast(param.data, 0)
    pipe, _ = pipelines(size, components)
    pipe.set_progress_bar_config(disable=True)
    inputs = make_inputs(pipe, size, args.entities, device, dtype)
    single, single_s = render(pipe, inputs, args.steps) if rank == 0 else (None, 0.0)
    torch.distributed.barrier()
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    parallel, parallel_s = render(pipe, inputs, args.steps)
    if rank == 0:
        assert single is not None
        diff = (parallel - single).abs().max().item()
        report = {"size": args.size, "device": args.device, "world_size": world, "entities": args.entities,
                  "steps": args.steps, "max_abs_diff": diff, "max_abs": single.abs().max().item(),
                  "single_s": single_s, "parallel_s": parallel_s}
        print(json.dumps(report))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

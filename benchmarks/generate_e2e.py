"""Whole EliGen images, end to end: 50 Euler steps of true CFG (an entity pass and a plain negative pass), decode.

    python benchmarks/generate_e2e.py --size flux-dev       # GPU: FLUX.1-dev shapes, random bf16 weights, 1024x1024
    python benchmarks/generate_e2e.py --size qwen-image     # GPU: Qwen-Image shapes (60 blocks), 1024x1024
    python benchmarks/generate_e2e.py --size tiny           # CPU: the tiny random pipeline (a smoke check)
    python benchmarks/generate_e2e.py --size qwen-tiny      # CPU: the tiny random Qwen-Image pipeline
    python benchmarks/generate_e2e.py --size qwen-1block --steps 2 --variants exact,reference   # CPU: the reference
    python benchmarks/generate_e2e.py --size tiny --shapesbench 50 --variants exact   # + accelerators' mIoU

Rows, all through ``__call__`` with the same embeddings, masks, latents and schedule:

- ``plain``: diffusers' ``FluxPipeline`` (``QwenImagePipeline``) on the same components (no entities, true CFG);
- ``exact``: ``EliGenPipeline`` (``EliGenQwenImagePipeline``) with N entities (``attention="auto"``), the reference
  point of every error column;
- ``reference``: the real ``diffsynth`` forward (``diffsynth_reference.py``) in its own true-CFG Euler loop on the
  same weights, schedule and latents, decoded by the same VAE (only where ``diffsynth`` is importable and at the
  released model's widths: ``flux-dev``, ``flux-1block``, ``qwen-image``, ``qwen-1block``; see ``e2e_models.py``);
- the opt-in accelerators of :mod:`eligen.speedups` at N = ``--accel-entities``: ``fbc-T`` (first-block cache,
  threshold T, per CFG branch), ``fp8`` (fp8 weight-only block linears), ``entity-steps-K`` (entities in the first
  K steps only), ``mask-every-M`` (the regional mask in every M-th block only), ``compile-plain`` / ``compile``
  (regional compilation), ``model-offload`` / ``sequential-offload`` (diffusers' CPU offloading; the second on
  CUDA only: diffusers names the CPU ``"cpu:0"``, with which accelerate fails).

Text encoding is left out (the embeddings are random and given to ``__call__``, as a caller with cached prompts
would); everything after it is in the time: schedule, masks, both CFG passes of every step, VAE decode. Prints
seconds per image, ratios to plain / exact / reference, peak memory (CUDA), PSNR of each decoded image against
the exact one; ``--shapesbench N`` adds ShapesBench mIoU of the exact mode and of each accelerator on the shipped
tiny model (``eligen-tiny``, a FLUX-family model, its LoRA, N held-out layouts, whatever ``--size``). Every row goes
to ``--json`` as soon as it is measured. Sizes and what differs per family: ``e2e_models.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import e2e_models
import numpy as np
import torch
from e2e_models import SIZES
from timing import sync, timed

from eligen import EliGenPipeline, speedups

DEFAULT_VARIANTS = ("plain,exact,reference,fbc-0.2,fbc-0.5,fp8,entity-steps-15,mask-every-2,compile-plain,compile,"
                    "model-offload,sequential-offload")
ACCELERATORS = ("fbc-", "fp8", "entity-steps-", "mask-every-", "compile", "model-offload", "sequential-offload")


@dataclass
class Row:
    variant: str
    entities: int
    seconds: float
    peak_mib: float | None
    psnr_vs_exact: float | None = None
    ratio_to_plain: float | None = None
    ratio_to_exact: float | None = None
    ratio_to_reference: float | None = None
    shapesbench_miou: float | None = None
    approximate: bool = False
    cache_skipped: float | None = None  # first-block cache: the fraction of forwards that skipped the other blocks


def is_approximate(variant: str) -> bool:
    """Accelerators that change the image (a first-block cache with threshold 0 skips nothing: exact)."""
    if variant.startswith("fbc-"):
        return float(variant.removeprefix("fbc-")) > 0
    return variant.startswith(("fp8", "entity-steps-", "mask-every-"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def call(pipe, inputs: dict, steps: int, true_cfg: float, **options) -> np.ndarray:
    """One whole image through ``__call__`` (``pipe`` may be a stock diffusers pipeline: then no entity arguments).
    ``options``: further ``__call__`` arguments (``guidance_scale`` for FLUX, an accelerator's)."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("entity_prompt_embeds", "entity_masks")}
    if inputs["entity_masks"]:
        kwargs |= dict(entity_prompt_embeds=inputs["entity_prompt_embeds"], entity_masks=inputs["entity_masks"])
    kwargs["latents"] = inputs["latents"].clone()
    out = pipe(**kwargs, **options, num_inference_steps=steps, true_cfg_scale=true_cfg, output_type="np")
    return out.images[0]


class Accelerated:
    """An accelerator put on a pipeline for one row, and taken off after it (``with Accelerated(...)``)."""

    def __init__(self, pipe, variant: str, steps: int, device: torch.device, of_steps: int | None = None) -> None:
        """``entity-steps-K`` means K of ``of_steps`` (default ``steps``): scaled to ``steps`` when they differ."""
        self.pipe, self.variant, self.steps, self.device = pipe, variant, steps, device
        self.of_steps = of_steps or steps
        self.call_options: dict = {}
        self.counts: dict[str, int] | None = None  # first-block cache: forwards, and those that ran every block
        self._undo = lambda: None

    def __enter__(self) -> Accelerated:
        pipe, variant = self.pipe, self.variant
        if variant.startswith("fbc-"):
            speedups.enable_first_block_cache(pipe, float(variant.removeprefix("fbc-")))
            transformer = pipe.transformer
            first = getattr(transformer, pipe.family.block_lists[0])[0]
            last = getattr(transformer, pipe.family.block_lists[-1])[-1]
            inner = next(m for m in last.modules() if isinstance(m, torch.nn.Linear))  # runs only when computed
            self.counts = {"forwards": 0, "full": 0}
            counters = [first.register_forward_hook(lambda *_: self._count("forwards")),
                        inner.register_forward_hook(lambda *_: self._count("full"))]

            def undo() -> None:
                speedups.disable_step_cache(pipe)
                for handle in counters:
                    handle.remove()

            self._undo = undo
        elif variant == "fp8":
            names = speedups.default_fp8_names(pipe)
            originals = {name: pipe.transformer.get_submodule(name) for name in names}
            speedups.quantize_fp8(pipe, names)

            def restore() -> None:
                for name, module in originals.items():
                    parent, _, child = name.rpartition(".")
                    setattr(pipe.transformer.get_submodule(parent), child, module)

            self._undo = restore
        elif variant.startswith("entity-steps-"):
            k = int(variant.removeprefix("entity-steps-"))
            self.call_options = {"entity_steps": min(round(k * self.steps / self.of_steps), self.steps)}
        elif variant.startswith("mask-every-"):
            hooks = speedups.mask_only_in_blocks(pipe, speedups.every_nth_block(pipe, int(variant.split("-")[-1])))
            self._undo = hooks.remove
        elif variant == "compile":
            self.call_options = {"compile": True}
        elif variant == "model-offload":
            pipe.enable_model_cpu_offload(device=self.device)
            self._undo = lambda: (pipe.remove_all_hooks(), pipe.to(self.device))
        elif variant == "sequential-offload":
            pipe.enable_sequential_cpu_offload(device=self.device)
            self._undo = lambda: (pipe.remove_all_hooks(), pipe.to(self.device))
        return self

    def _count(self, what: str) -> None:
        self.counts[what] += 1

    @property
    def cache_skipped(self) -> float | None:
        """The fraction of transformer forwards the first-block cache cut short (None: no cache here)."""
        if not self.counts or not self.counts["forwards"]:
            return None
        return round(1 - self.counts["full"] / self.counts["forwards"], 3)

    def __exit__(self, *exc) -> None:
        self._undo()


def shapesbench_miou(pipe, layouts: list, variant: str, steps: int, of_steps: int, device: torch.device) -> float:
    """Mean IoU of the entities of ``layouts`` on the shipped tiny model with one accelerator (``exact``: none);
    ``entity-steps-K`` keeps its fraction K / ``of_steps`` of the steps."""
    from eligen.tiny.bench import score_image
    from eligen.tiny.metrics import summarise

    scores = []
    with Accelerated(pipe, variant, steps, device, of_steps) as acc:
        for index, layout in enumerate(layouts):
            image = pipe(prompt=layout.prompt, entities=layout.entities, height=64, width=64,
                         num_inference_steps=steps, negative_prompt="",
                         generator=torch.Generator().manual_seed(index), **acc.call_options).images[0]
            scores.extend(score_image(image, layout))
    if acc.cache_skipped is not None:
        print(f"    ({variant}: {acc.cache_skipped:.0%} of the forwards skipped the blocks after the first)")
    return summarise(scores)["miou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--entities", default="0,2,4,7", help="entity counts of the exact (and reference) rows")
    parser.add_argument("--accel-entities", type=int, default=4, help="entity count of the accelerator rows")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--true-cfg", type=float, default=3.0)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed images per row after the first")
    parser.add_argument("--iters", type=int, default=2,
                        help="timed images per row (0: time the first image, compile and caches included)")
    parser.add_argument("--shapesbench", type=int, default=0, help="layouts for the ShapesBench mIoU column (0: off)")
    parser.add_argument("--shapesbench-steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=Path("outputs/generate_e2e.json"),
                        help="where the rows go (default: outputs/, which git ignores)")
    args = parser.parse_args()

    import logging

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # dtype casts of random components, not news
    diffusers_logging.disable_progress_bar()
    logging.getLogger("eligen").setLevel(logging.ERROR)  # "far from the native size": random models have none
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch._dynamo.config.cache_size_limit = 64
    variants = args.variants.split(",")
    counts = [int(n) for n in args.entities.split(",")]
    accel_n = args.accel_entities
    size = SIZES[args.size]
    pipe, plain_pipe = e2e_models.pipelines(size, e2e_models.build_components(size, device, dtype))
    for p in (pipe, plain_pipe):
        p.set_progress_bar_config(disable=True)
    side = size.side
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, size {args.size} "
          f"({side}x{side}), {args.steps} steps, true CFG {args.true_cfg}, dtype {dtype}", flush=True)

    rows: list[Row] = []
    exact_images: dict[int, np.ndarray] = {}
    record = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "size": args.size, "steps": args.steps, "true_cfg": args.true_cfg, "rows": rows}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**record, "rows": [asdict(r) for r in rows]}, indent=1))

    def measure(variant: str, n: int, image_fn) -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        image = image_fn()
        sync(device)
        first = time.perf_counter() - start
        seconds = timed(image_fn, device, args.warmup, args.iters) / 1000 if args.iters else first
        sync(device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        if variant == "exact":
            exact_images[n] = image
        error = psnr(image, exact_images[n]) if n in exact_images and variant != "exact" else None
        approximate = is_approximate(variant)
        rows.append(Row(variant, n, round(seconds, 4), None if peak is None else round(peak, 1),
                        None if error is None else round(error, 2), approximate=approximate))
        print(f"  {variant:18s} N={n}: {seconds:9.3f} s/image  peak {'-' if peak is None else f'{peak:.0f} MiB'}  "
              f"PSNR vs exact {'-' if error is None else f'{error:.1f} dB'}", flush=True)
        save()

    def attempt(variant: str, n: int, image_fn) -> None:
        try:
            measure(variant, n, image_fn)
        except Exception as exc:  # one failing row must not lose the others
            print(f"  {variant} N={n}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)

    gen = dict(steps=args.steps, true_cfg=args.true_cfg, **e2e_models.guidance_options(size, args.guidance))
    inputs = {n: e2e_models.make_inputs(pipe, size, n, device, dtype) for n in sorted({0, *counts, accel_n})}
    with torch.no_grad():
        if "plain" in variants:
            attempt("plain", 0, lambda: call(plain_pipe, inputs[0], **gen))
        if "exact" in variants:
            for n in sorted({*counts, accel_n}):
                attempt("exact", n, lambda n=n: call(pipe, inputs[n], **gen))
        if "reference" in variants:
            problem = e2e_models.reference_problem(size, pipe.transformer)
            if problem:
                print(f"  reference: {problem}; not timed")
            else:
                dit = e2e_models.reference_dit(size, pipe.transformer)
                for n in counts:
                    attempt("reference", n, lambda n=n: e2e_models.reference_image(
                        size, pipe, dit, inputs[n], args.steps, args.true_cfg, args.guidance))
                del dit
        later = ("compile-plain", "compile", "model-offload", "sequential-offload")
        for variant in [v for v in variants if v.startswith(ACCELERATORS) and v not in later]:
            with Accelerated(pipe, variant, args.steps, device) as acc:
                attempt(variant, accel_n, lambda acc=acc: call(pipe, inputs[accel_n], **gen, **acc.call_options))
            if rows and rows[-1].variant == variant and acc.cache_skipped is not None:
                rows[-1].cache_skipped = acc.cache_skipped
                print(f"    ({variant}: {acc.cache_skipped:.0%} of the forwards skipped the blocks after the first)")
        for variant in ("model-offload", "sequential-offload"):
            if variant not in variants:
                continue
            if variant == "sequential-offload" and not cuda:
                print("  sequential-offload: CUDA only (diffusers names the CPU 'cpu:0', with which accelerate fails; "
                      "tests/test_offload.py checks its hooks on the CPU)")
                continue
            with Accelerated(pipe, variant, args.steps, device):
                attempt(variant, accel_n, lambda: call(pipe, inputs[accel_n], **gen))
        if "compile-plain" in variants:
            plain_pipe.transformer.compile_repeated_blocks(fullgraph=True)
            plain_pipe.transformer._eligen_compiled = True  # the same transformer: the exact row reuses it
            attempt("compile-plain", 0, lambda: call(plain_pipe, inputs[0], **gen))
        if "compile" in variants:  # the same transformer, already compiled: entities reuse its graphs
            attempt("compile", accel_n, lambda: call(pipe, inputs[accel_n], **gen, compile=True))

    plain = {False: next((r.seconds for r in rows if r.variant == "plain"), None),
             True: next((r.seconds for r in rows if r.variant == "compile-plain"), None)}
    exact = {r.entities: r.seconds for r in rows if r.variant == "exact"}
    reference = {r.entities: r.seconds for r in rows if r.variant == "reference"}
    for row in rows:
        base = plain[row.variant.startswith("compile")] or plain[False]
        row.ratio_to_plain = round(row.seconds / base, 3) if base else None
        if row.variant != "exact" and row.entities in exact and row.variant not in ("plain", "compile-plain"):
            row.ratio_to_exact = round(row.seconds / exact[row.entities], 3)
        if row.entities in reference and row.variant != "reference":
            row.ratio_to_reference = round(row.seconds / reference[row.entities], 3)

    if args.shapesbench:
        from eligen.tiny.bench import FIRST_HELD_OUT_SEED
        from eligen.tiny.world import sample_layout

        tiny = EliGenPipeline.from_pretrained("eligen-tiny").to(device)
        tiny.set_progress_bar_config(disable=True)
        layouts = [sample_layout(FIRST_HELD_OUT_SEED + i, 64) for i in range(args.shapesbench)]
        record["shapesbench"] = {"layouts": args.shapesbench, "steps": args.shapesbench_steps, "miou": {}}
        for variant in ["exact", *[v for v in variants if v.startswith(("fbc-", "fp8", "entity-steps-",
                                                                        "mask-every-"))]]:
            steps = args.shapesbench_steps
            miou = shapesbench_miou(tiny, layouts, variant, steps, args.steps, device)
            record["shapesbench"]["miou"][variant] = round(miou, 4)
            for row in rows:
                if row.variant == variant and row.entities == accel_n:
                    row.shapesbench_miou = round(miou, 4)
            print(f"  ShapesBench {variant:18s}: mIoU {miou:.3f}", flush=True)

    print("\n| variant | N | s / image | x plain | x exact | x reference | peak MiB | PSNR vs exact dB | "
          "ShapesBench mIoU |")
    print("|---|---|---|---|---|---|---|---|---|")

    def cell(value) -> str:
        return "-" if value is None else str(value)

    for r in rows:
        name = f"{r.variant} (approximate)" if r.approximate else r.variant
        print(f"| {name} | {r.entities} | {r.seconds} | {cell(r.ratio_to_plain)} | {cell(r.ratio_to_exact)} | "
              f"{cell(r.ratio_to_reference)} | {cell(r.peak_mib)} | {cell(r.psnr_vs_exact)} | "
              f"{cell(r.shapesbench_miou)} |")
    if "exact" in record.get("shapesbench", {}).get("miou", {}):
        print(f"ShapesBench mIoU of the exact mode: {record['shapesbench']['miou']['exact']}")
    save()
    print(f"\njson: {args.json}")


if __name__ == "__main__":
    main()

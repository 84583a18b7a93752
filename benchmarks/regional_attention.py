"""Regional attention speed: one transformer forward and one true-CFG step, plain FLUX vs EliGen.

    python benchmarks/regional_attention.py --size tiny               # CPU, the tiny random transformer
    python benchmarks/regional_attention.py --size flux-dev           # GPU, FLUX.1-dev shapes, random bf16 weights
    python benchmarks/regional_attention.py --size flux-1block --variants dense,diffsynth   # the reference, CPU

Variants (each at N entities): ``dense`` (bool mask, SDPA), ``reference`` (the reference implementation's
additive float mask, SDPA, on the same weights), ``flex`` (FlexAttention BlockMask, compiled kernel on CUDA),
``segmented`` (unmasked flash calls merged by log-sum-exp: exact), ``trim`` (dense,
entity prompts trimmed to 64 tokens: fewer tokens, approximate), and after regional compilation of the
transformer's blocks ``compile-plain``, ``compile-dense``, ``compile-flex``, ``compile-segmented``,
``compile-trim``. ``diffsynth``: the reference package itself (DiffSynth-Studio's DiT, its mask builder
and forward, see ``diffsynth_reference.py``) on identical weights and inputs, when it is importable and the
size has FLUX.1's widths (``flux-dev``); its outputs are compared with ours. Prints ms, ratio to plain (same
compile state), ratio to the reference (the ``diffsynth`` row when measured, else the ``reference`` row),
peak memory above what was resident before the row; writes every row to JSON as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import diffsynth_reference
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from timing import timed

from eligen.families.flux.model import FLUX
from eligen.regional.dense import regional_attention_mask
from eligen.regional.flex import regional_block_mask
from eligen.regional.processors import install_regional_processors
from eligen.regional.segmented import segmented_mask

SIZES = {
    # name: (transformer config, image side in pixels, VAE factor, prompt tokens per segment, trimmed tokens)
    "tiny": (dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 4, 4)),
             64, 2, 512, 64),
    "flux-dev": (dict(guidance_embeds=True), 1024, 8, 512, 64),
    # FLUX.1's widths with one block of each kind: checks the diffsynth path on a CPU
    "flux-1block": (dict(guidance_embeds=True, num_layers=1, num_single_layers=1), 128, 8, 16, 8),
}


@dataclass
class Row:
    variant: str
    entities: int
    forward_ms: float
    cfg_step_ms: float | None
    peak_mib: float
    ratio_to_plain: float | None = None
    ratio_to_reference: float | None = None


def build_transformer(size: str, device: torch.device, dtype: torch.dtype) -> FluxTransformer2DModel:
    """A transformer of the named size with random weights (initialised on the device, no fp32 copy)."""
    return random_model(FluxTransformer2DModel, SIZES[size][0], device, dtype)


def random_model(cls: type, config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``cls(**config)`` with random weights drawn on the device in ``dtype``: matrices ``N(0, 1 / fan_in)``,
    norm gains ``N(1, 0.02)``, other vectors ``N(0, 0.02)``."""
    with torch.device("meta"):
        model = cls(**config).to(dtype)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    generator = torch.Generator(device).manual_seed(0)
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            param.normal_(0, 1 / math.sqrt(param[0].numel()), generator=generator)
        else:
            param.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=generator)
    return model


def random_covers(n: int, n_img: int, side: int, device: torch.device) -> torch.Tensor:
    """``(1, n, n_img)``: n overlapping rectangles on the token grid (about a third of the image each)."""
    cover = torch.zeros(1, n, side, side, dtype=torch.bool, device=device)
    generator = torch.Generator().manual_seed(n)
    for i in range(n):
        h, w = (torch.randint(side // 3, side // 2 + 1, (2,), generator=generator)).tolist()
        y, x = torch.randint(0, side - h + 1, (1,), generator=generator).item(), torch.randint(
            0, side - w + 1, (1,), generator=generator).item()
        cover[0, i, y:y + h, x:x + w] = True
    return cover.view(1, n, n_img)


def make_inputs(model, size: str, n_text: int, device, dtype):
    _, pixels, vae, _, _ = SIZES[size]
    side = pixels // vae // 2
    cfg = model.config
    g = torch.Generator(device).manual_seed(n_text)  # same inputs for every variant of one sequence length

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    return {
        "hidden_states": randn(1, side * side, cfg.in_channels),
        "encoder_hidden_states": randn(1, n_text, cfg.joint_attention_dim),
        "pooled_projections": randn(1, cfg.pooled_projection_dim),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=torch.float32),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype),
        "txt_ids": torch.zeros(n_text, 3, device=device, dtype=dtype),
    }


def diffsynth_forward(dit, inputs: dict, cover: torch.Tensor, seg_len: int):
    """The reference's forward on the same inputs as ours: entity segments then the global one in
    ``encoder_hidden_states``, ``cover`` ``(1, N, n_img)`` as latent masks ``(1, N, 1, h, w)``."""
    packed = inputs["hidden_states"]
    side = math.isqrt(packed.shape[1])
    latents = FluxPipeline._unpack_latents(packed, 2 * side * 8, 2 * side * 8, 8)
    segments = inputs["encoder_hidden_states"].split(seg_len, dim=1)
    n = cover.shape[1]
    masks = cover.view(1, n, 1, side, side).repeat_interleave(2, -2).repeat_interleave(2, -1).to(packed.dtype)
    entity_prompts = torch.stack(segments[:n], dim=1) if n else None

    def forward():
        return diffsynth_reference.reference_forward(
            dit, latents, inputs["timestep"] * 1000, segments[n], inputs["pooled_projections"], inputs["guidance"],
            entity_prompts, masks if n else None)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--entities", default="0,2,4,7", help="comma-separated entity counts")
    parser.add_argument("--variants", default="dense,reference,diffsynth,flex,segmented,trim,compile-plain,"
                        "compile-dense,compile-flex,compile-segmented,compile-trim")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/regional_attention.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch._dynamo.config.cache_size_limit = 64
    model = build_transformer(args.size, device, dtype)
    install_regional_processors(model, FLUX.processors)  # every mask form reaches attention through eligen's processors
    _, pixels, vae, seg_len, trim_len = SIZES[args.size]
    side = pixels // vae // 2
    n_img = side * side
    counts = [int(n) for n in args.entities.split(",")]
    variants = args.variants.split(",")
    uncond = make_inputs(model, args.size, seg_len, device, dtype)
    rows: list[Row] = []
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"size {args.size} ({pixels}x{pixels}, {n_img} image tokens), dtype {dtype}")

    reference_dit = None

    def measure(variant: str, n: int) -> None:
        nonlocal reference_dit
        mode = variant.removeprefix("compile-")
        if mode == "diffsynth" and reference_dit is None:  # a second copy of the weights, not counted in peaks
            reference_dit = diffsynth_reference.reference_dit(model)
        resident = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        length = trim_len if mode == "trim" else seg_len
        lengths = [length] * n
        inputs = make_inputs(model, args.size, length * n + seg_len, device, dtype)
        mask = None
        if n and mode in ("dense", "trim", "reference"):
            cover = random_covers(n, n_img, side, device)
            mask = regional_attention_mask(cover, lengths, seg_len)
            if mode == "reference":  # the reference builds an additive float mask: 0 / -inf
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
        elif n and mode == "segmented":
            mask = segmented_mask(random_covers(n, n_img, side, device), lengths, seg_len)
        elif n and mode == "flex":
            mask = regional_block_mask(random_covers(n, n_img, side, device), lengths, seg_len, slot="bench")
        kwargs = {"joint_attention_kwargs": {"attention_mask": mask}} if mask is not None else {}

        def forward():
            return model(**inputs, **kwargs, return_dict=False)[0]

        def unconditional():
            return model(**uncond, return_dict=False)[0]

        if mode == "diffsynth":  # both CFG passes through the reference
            forward = diffsynth_forward(reference_dit, inputs, random_covers(n, n_img, side, device), seg_len)
            unconditional = diffsynth_forward(reference_dit, uncond, random_covers(0, n_img, side, device), seg_len)

        def cfg_step():
            latents = inputs["hidden_states"]
            positive = forward()
            negative = unconditional()
            return latents + (-0.02) * (negative + 3.0 * (positive - negative))

        with torch.no_grad():
            outputs[(variant, n)] = forward().float().cpu()
            forward_ms = timed(forward, device, args.warmup, args.iters)
            cfg_ms = timed(cfg_step, device, 1, max(1, args.iters // 2)) if n in (0, 4) else None
        peak = torch.cuda.max_memory_allocated() / 2**20 - resident if device.type == "cuda" else 0.0
        rows.append(Row(variant, n, round(forward_ms, 2), None if cfg_ms is None else round(cfg_ms, 2),
                        round(peak, 1)))
        print(f"  {variant:14s} N={n}: forward {forward_ms:8.2f} ms  cfg step "
              f"{'-' if cfg_ms is None else f'{cfg_ms:8.2f} ms'}  peak +{peak:.0f} MiB", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))

    plan = [("plain", 0)]
    if "diffsynth" in variants and not diffsynth_reference.available():
        print("  diffsynth: not importable, the reference package is not timed (the 'reference' rows stand in)")
        variants.remove("diffsynth")
    elif "diffsynth" in variants and not diffsynth_reference.has_flux_widths(model):
        print(f"  diffsynth: skipped, the reference DiT needs FLUX.1's widths (--size flux-dev), not {args.size}'s")
        variants.remove("diffsynth")
    plan += [(v, 4) for v in ("dense", "reference", "diffsynth", "flex", "segmented", "trim")
             if v in variants and 4 in counts]
    compiled = [v for v in variants if v.startswith("compile-")]
    if compiled:
        plan += [("compile", None)]
        plan += [("compile-plain", 0)] if "compile-plain" in compiled else []
        plan += [(v, 4) for v in compiled if v != "compile-plain" and 4 in counts]
    plan += [(v, n) for n in counts if n not in (0, 4) for v in ("dense", "reference", "diffsynth", "flex",
                                                                  "segmented") if v in variants]
    for variant, n in plan:
        if variant == "compile":
            model.compile_repeated_blocks(fullgraph=True)
            print("  (transformer blocks compiled)", flush=True)
            continue
        try:
            measure(variant, n)
        except Exception as exc:  # one failing variant must not lose the others
            print(f"  {variant} N={n}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)

    print("'reference' rows: the reference implementation's additive float mask on this transformer (same "
          "weights, same shapes); 'diffsynth' rows: the reference package itself")
    plain = {r.variant.startswith("compile-"): r.forward_ms for r in rows if r.entities == 0}
    reference = {r.entities: r.forward_ms for r in rows if r.variant == "reference"}
    reference |= {r.entities: r.forward_ms for r in rows if r.variant == "diffsynth"}
    for row in rows:
        base = plain.get(row.variant.startswith("compile-"))
        row.ratio_to_plain = round(row.forward_ms / base, 3) if base else None
        ref = reference.get(row.entities)
        row.ratio_to_reference = round(row.forward_ms / ref, 3) if ref and row.entities else None
    for (variant, n), out in outputs.items():
        if n and variant != "dense" and ("dense", n) in outputs and "trim" not in variant:
            diff = (out - outputs[("dense", n)]).abs().max().item()
            print(f"  max |{variant} - dense| at N={n}: {diff:.3g}")
    print("\n| variant | N | forward ms | x plain | x reference | CFG step ms | peak MiB above resident |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.variant} | {r.entities} | {r.forward_ms} | {r.ratio_to_plain} | {r.ratio_to_reference} | "
              f"{r.cfg_step_ms if r.cfg_step_ms is not None else '-'} | {r.peak_mib} |")
    args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(f"\njson: {args.json}")


if __name__ == "__main__":
    main()

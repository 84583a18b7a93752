"""EliGen's cost per model family: the stock diffusers pipeline vs the EliGen one on the same components, in one run.

    python benchmarks/family_overhead.py                          # CPU: every family's tiny random pipeline
    python benchmarks/family_overhead.py --families flux2,z_image --iters 3
    python benchmarks/family_overhead.py --shapes real            # GPU: the released transformers' shapes

``--shapes tiny`` (the default): for every registered family (each pipeline a family serves: FLUX.2 [dev] and
[klein]) its tiny random pipeline, written once by the card's ``tiny_pipeline`` (the code the tests use; nothing
downloads), loaded as the EliGen pipeline, and the stock diffusers pipeline (``card.pipelines[0]``) built on the
same components. Whole images (``--steps`` steps, decoded; every other argument the pipeline's own default, so a
family whose diffusers pipeline runs CFG by default runs it here, with an empty negative prompt) timed in one run:
``stock``; ``eligen`` with zero entities, whose image must equal the stock one bit for bit (printed ``exact``); and
N entities (``--entities``) in each attention form (``dense``, ``flex``, ``segmented``), with the largest difference
from the dense image. Median milliseconds per image and the ratio to ``stock`` of the same run.

``--shapes real``: the family's released transformer (its config from the family's ``testing.real_shapes``; random
weights drawn on the device, bf16 on CUDA) and one transformer forward at 1024x1024 (``--tokens`` per side) with the
family's text length: ``stock`` (diffusers' attention processors, no entities), ``eligen`` (EliGen's processors, no
entities), and N entities (``--real-entities``, default 4) per attention form. The inputs are those the EliGen
pipeline hands its transformer: one call of the tiny pipeline at the same token grid and text lengths is stopped at
its first forward, and its latents and text are replaced by random tensors of the real widths (sequence, positions
and masks are the family's own). ``--layers K`` caps every block list at K blocks (a CPU check of this mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timing import timed_median

from eligen.families import cards
from eligen.families.card import FamilyCard, load

FORMS = ("dense", "flex", "segmented")
ENTITY_PROMPTS = ("a dog", "a blue square", "a green tree", "a red circle", "a cat", "a yellow star", "a house")
WORDS = ("a", "red", "circle", "on", "gray", "background", "blue", "square", "green", "tree")


@dataclass
class Row:
    family: str
    variant: str  # stock, eligen, or an attention form
    entities: int
    ms: float
    ratio_to_stock: float | None = None
    exact: bool | None = None  # eligen with no entities: bit-identical to stock
    max_abs_diff_from_dense: float | None = None
    text_tokens: int | None = None  # real shapes: the text sequence of the forward
    image_tokens: int | None = None


def benchmark_cards(names: str | None) -> list[FamilyCard]:
    """The cards to time: every registered family's (``names``: a comma-separated subset), each text-to-image
    pipeline a family serves (its own card first, then its variants'). Edit and ControlNet variants run the family's
    own transformer and need an input image besides the text: they are not timed apart."""
    known = cards()
    chosen = list(known) if not names else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return [c for name in chosen for c in (known[name], *known[name].variants)
            if not {"edit", "controlnet"} & set(c.features)]


def slug(card: FamilyCard) -> str:
    """``"FLUX.2 [klein]"`` -> ``"flux-2-klein"``: a file-name form of the card's title."""
    return re.sub(r"[^a-z0-9]+", "-", card.title.lower()).strip("-")


def entity_masks(n: int, height: int, width: int) -> list[np.ndarray]:
    """``n`` disjoint boxes side by side over the middle half of the image's height."""
    masks = []
    for i in range(n):
        mask = np.zeros((height, width), dtype=bool)
        mask[height // 4:3 * height // 4, i * width // n:(i + 1) * width // n] = True
        masks.append(mask)
    return masks


def entity_kwargs(n: int, height: int, width: int) -> dict[str, Any]:
    if not n:
        return {}
    prompts = [ENTITY_PROMPTS[i % len(ENTITY_PROMPTS)] for i in range(n)]
    return {"entity_prompts": prompts, "entity_masks": entity_masks(n, height, width)}


def load_pipelines(card: FamilyCard, root: Path, device: torch.device, dtype: torch.dtype):
    """The card's tiny random pipeline, written once under ``root``: (EliGen pipeline, stock pipeline on the same
    components)."""
    import diffusers

    path = load(card.tiny_pipeline)(root / slug(card), seed=0)
    pipe = load(card.eligen_pipeline).from_pretrained(path).to(device, dtype)
    # from_pretrained with every component given loads none: it only reads the pipeline's own settings from
    # model_index.json (Krea 2's encoder taps, [klein]'s is_distilled), which a plain constructor would leave default
    stock = getattr(diffusers, card.pipelines[0]).from_pretrained(path, **pipe.components)
    for p in (pipe, stock):
        p.set_progress_bar_config(disable=True)
    return pipe, stock


def token_pixels(pipe) -> int:
    """Pixels per token side of ``pipe``'s model (its VAE's scale factor times the family's patch)."""
    return pipe.vae_scale_factor * pipe.family.patch_size


def accepted(pipe, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``kwargs`` that ``pipe``'s ``__call__`` takes."""
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in kwargs.items() if k in parameters}


def tiny_rows(card: FamilyCard, root: Path, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Whole images of the card's tiny pipeline: stock, EliGen with no entities (checked bit-identical), EliGen with
    ``args.entities`` entities in each attention form."""
    pipe, stock = load_pipelines(card, root, device, torch.float32)
    side = max(args.side, 4 * token_pixels(pipe))  # at least 4x4 tokens
    common = dict(prompt=" ".join(WORDS[:6]), height=side, width=side, num_inference_steps=args.steps,
                  max_sequence_length=args.max_sequence_length, output_type="pt")

    def image(target, **extra):
        kwargs = accepted(target, common) if target is stock else common
        return target(**kwargs, **extra, generator=torch.Generator(device).manual_seed(0)).images

    runs: list[tuple[str, int, Any, dict[str, Any]]] = [("stock", 0, stock, {}), ("eligen", 0, pipe, {})]
    runs += [(form, args.entities, pipe, {"attention": form, **entity_kwargs(args.entities, side, side)})
             for form in args.forms]
    rows, outputs = [], {}
    with torch.no_grad():
        for variant, n, target, extra in runs:
            outputs[variant] = image(target, **extra)
            ms = timed_median(lambda t=target, e=extra: image(t, **e), device, args.warmup, args.iters)
            rows.append(Row(card.title, variant, n, round(ms, 2), image_tokens=(side // token_pixels(pipe)) ** 2))
            print(f"  {card.title:16s} {variant:9s} N={n}: {ms:9.2f} ms/image", flush=True)
    finish(rows, outputs)
    return rows


def finish(rows: list[Row], outputs: dict[str, torch.Tensor]) -> None:
    """Ratios to the stock row, the zero-entity row's bit-identity with it, each form's distance from dense."""
    stock = next(r.ms for r in rows if r.variant == "stock")
    for row in rows:
        row.ratio_to_stock = round(row.ms / stock, 3)
        if row.variant == "eligen":
            row.exact = bool(torch.equal(outputs["eligen"], outputs["stock"]))
        if row.variant in FORMS and "dense" in outputs:
            diff = (outputs[row.variant].float() - outputs["dense"].float()).abs().max().item()
            row.max_abs_diff_from_dense = float(f"{diff:.3g}")


class _Stop(Exception):
    """Raised by :func:`capture` at the pipeline's first transformer forward, carrying its inputs."""

    def __init__(self, inputs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.inputs = inputs


def capture(pipe, text_tokens: int, tokens: int, n: int, form: str) -> dict[str, Any]:
    """The inputs the EliGen pipeline hands its first transformer forward (``_velocity``'s) for a ``tokens x tokens``
    token grid, the global prompt ``text_tokens`` long, ``n`` entities in attention form ``form``."""
    side = tokens * token_pixels(pipe)

    def stop(latents, timestep, branch, geometry, guidance):
        raise _Stop(dict(latents=latents, timestep=timestep, branch=branch, geometry=geometry, guidance=guidance))

    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(text_tokens))
    pipe._velocity = stop
    try:
        pipe(prompt=prompt, height=side, width=side, num_inference_steps=1, output_type="latent",
             max_sequence_length=text_tokens, attention=form, **entity_kwargs(n, side, side))
    except _Stop as stopped:
        return stopped.inputs
    finally:
        del pipe._velocity
    raise RuntimeError(f"{type(pipe).__name__} ran no transformer forward")


def widened(inputs: dict[str, Any], shapes, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """``inputs`` with random latents and text of the released model's widths (``shapes``); the sequence, positions
    and masks stay the family's own."""
    latents, branch = inputs["latents"], inputs["branch"]
    generator = torch.Generator(latents.device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=latents.device, dtype=dtype)

    context = branch.context
    pooled = None if branch.pooled is None else randn(branch.pooled.shape[0], shapes.pooled_dim)
    branch = dataclasses.replace(branch, context=randn(*context.shape[:2], shapes.text_dim), pooled=pooled)
    return {**inputs, "latents": randn(*latents.shape[:2], shapes.latent_dim), "branch": branch}


def real_rows(card: FamilyCard, root: Path, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """One transformer forward of each released model serving the card (random weights): stock processors,
    EliGen's with no entities, EliGen's with ``args.real_entities`` entities per attention form."""
    module = card.tiny_pipeline.rpartition(":")[0]
    try:
        real_shapes = load(f"{module}:real_shapes")
    except AttributeError:
        raise SystemExit(f"error: {module} has no real_shapes(pipeline); give the family's released transformer "
                         "config there (docs/adding-a-family.md)") from None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe, _ = load_pipelines(card, root, device, dtype)
    rows = []
    for shapes in real_shapes(card.pipelines[0]):
        rows += shape_rows(card, pipe, shapes, args, device, dtype)
    return rows


def random_transformer(class_name: str, shapes, layers: int | None, device: torch.device,
                       dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers transformer ``class_name`` of the released model's ``shapes`` (at most ``layers`` blocks per
    list) with random weights drawn on the device (no fp32 copy: ``regional_attention.random_model``). Tensors the
    constructor computes (buffers, and RoPE tables kept as plain attributes) are taken from a one-block copy built on
    the CPU, since the device copy is made without running the constructor's arithmetic."""
    import diffusers
    from regional_attention import random_model

    cls = getattr(diffusers, class_name)
    model = random_model(cls, shapes.capped(layers), device, dtype)
    computed = list(_computed_tensors(model))
    if computed:
        reference = {name: value for name, _, _, value in _computed_tensors(cls(**shapes.capped(1)))}
        for name, owner, attribute, value in computed:
            if name not in reference:
                raise SystemExit(f"error: {class_name}'s tensor {name} has no counterpart in a one-block copy; "
                                 "initialise it in family_overhead.random_transformer")
            if attribute in owner._buffers:
                owner._buffers[attribute] = reference[name].to(device, value.dtype)
            elif isinstance(value, torch.Tensor):
                setattr(owner, attribute, reference[name].to(device))
            else:
                setattr(owner, attribute, type(value)(t.to(device) for t in reference[name]))
    return model


def _computed_tensors(model: torch.nn.Module):
    """``(name, module, attribute, value)`` of every buffer of ``model`` and every plain attribute holding a tensor or
    a list / tuple of tensors."""
    for prefix, module in model.named_modules():
        values = {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor) or (
            isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v))}
        for attribute, value in {**module._buffers, **values}.items():
            if value is not None:
                yield f"{prefix}.{attribute}" if prefix else attribute, module, attribute, value

def shape_rows(card: FamilyCard, pipe, shapes, args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype) -> list[Row]:
    """The rows of one released model's shapes (``shapes``): its transformer on random weights, built on the device."""
    tokens = args.tokens or 1024 // shapes.token_pixels
    n = args.real_entities
    plan = [("stock", 0, "dense"), ("eligen", 0, "dense"), *[(form, n, form) for form in args.forms]]
    with torch.no_grad():
        text = args.text_tokens or shapes.text_tokens
        inputs = {variant: widened(capture(pipe, text, tokens, k, form), shapes, dtype) for variant, k, form in plan}
        transformer = random_transformer(card.transformers[0], shapes, args.layers, device, dtype)
        rows, outputs = time_forwards(pipe.family, transformer, plan, inputs, args, device)
    for row in rows:
        row.family, row.image_tokens = shapes.name, tokens * tokens
    del transformer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    finish(rows, outputs)
    return rows


def time_forwards(family, transformer, plan, inputs: dict[str, dict[str, Any]], args: argparse.Namespace,
                  device: torch.device) -> tuple[list[Row], dict[str, torch.Tensor]]:
    """Each planned forward timed in turn, diffusers' processors for ``stock``, then EliGen's for the rest."""
    from eligen.regional.processors import install_regional_processors

    rows, outputs = [], {}
    for variant, n, _ in plan:
        if variant == "eligen":
            install_regional_processors(transformer, family.processors)
        x = inputs[variant]

        def forward(x=x):
            return family.forward(transformer, x["latents"], x["timestep"], x["branch"], x["geometry"], x["guidance"],
                                  {})

        outputs[variant] = forward().float().cpu()
        ms = timed_median(forward, device, args.warmup, args.iters)
        text = x["branch"].context.shape[1]
        rows.append(Row(family.card.title, variant, n, round(ms, 2), text_tokens=text))
        print(f"  {family.card.title:16s} {variant:9s} N={n}: {ms:9.2f} ms/forward ({text} text tokens)", flush=True)
    return rows, outputs

def table(rows: list[Row]) -> str:
    """The rows as a markdown table (``exact``: the zero-entity image equals the stock one bit for bit)."""
    lines = ["| family | variant | N | ms | x stock | vs stock | max abs diff from dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        check = "-" if r.exact is None else ("exact" if r.exact else "DIFFERS")
        diff = "-" if r.max_abs_diff_from_dense is None else f"{r.max_abs_diff_from_dense:.3g}"
        lines.append(f"| {r.family} | {r.variant} | {r.entities} | {r.ms} | {r.ratio_to_stock} | {check} | {diff} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--families", default=None, help="comma-separated registry names (default: every family)")
    parser.add_argument("--entities", type=int, default=2, help="entities of the tiny rows")
    parser.add_argument("--real-entities", type=int, default=4, help="entities of the real-shape rows")
    parser.add_argument("--forms", default=",".join(FORMS), help="attention forms of the entity rows")
    parser.add_argument("--steps", type=int, default=4, help="steps per tiny image")
    parser.add_argument("--side", type=int, default=32, help="tiny image side in pixels (at least 4x4 tokens)")
    parser.add_argument("--max-sequence-length", type=int, default=32,
                        help="tiny: the text length of the families that pad their prompts")
    parser.add_argument("--tokens", type=int, default=None,
                        help="real: image tokens per side (default: a 1024x1024 image's)")
    parser.add_argument("--layers", type=int, default=None, help="real: at most this many blocks per block list")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="real: the global prompt's tokens (and a padded entity prompt's; default: the family's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one: immune to a busy machine)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/family_overhead.json"))
    args = parser.parse_args()
    args.forms = [f for f in args.forms.split(",") if f]
    bad = [f for f in args.forms if f not in FORMS]
    counts = (args.entities, args.real_entities, args.steps, args.iters, args.text_tokens or 1, args.warmup + 1)
    if bad or min(counts) < 1:
        parser.error(f"--forms takes {', '.join(FORMS)} (got {', '.join(bad)})" if bad else
                     "--entities, --real-entities, --steps, --iters and --text-tokens must be at least 1, --warmup at "
                     "least 0")
    return args


def main() -> None:
    args = parse_args()
    import logging

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # dtype casts of random components, not news
    diffusers_logging.disable_progress_bar()
    logging.getLogger("eligen").setLevel(logging.ERROR)  # "far from the native size": random models have none
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    chosen = benchmark_cards(args.families)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    record: dict[str, Any] = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "shapes": args.shapes, "steps": args.steps, "entities": args.entities,
                              "real_entities": args.real_entities, "iters": args.iters, "warmup": args.warmup,
                              "rows": []}
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, shapes {args.shapes}, "
          f"families: {', '.join(c.title for c in chosen)}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as root:
        for card in chosen:
            if args.shapes == "tiny":
                rows += tiny_rows(card, Path(root), args, device)
            else:
                rows += real_rows(card, Path(root), args, device)
            record["rows"] = [asdict(r) for r in rows]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=1))
    print("\n" + table(rows))
    print(f"\njson: {args.json}")
    if any(r.exact is False for r in rows):
        raise SystemExit("error: EliGen with no entities differs from the stock pipeline (see 'DIFFERS' above)")


if __name__ == "__main__":
    main()

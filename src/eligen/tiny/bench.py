"""ShapesBench: entity control measured exactly on the shapes world (docs/design.md sections 8 and 13).

Held-out layouts (1-4 entities; box, ellipse and irregular masks) are generated three ways: (a) the base model
with the global prompt only, (b) train-free regional attention (entities, no LoRA), (c) the EliGen LoRA. Each
entity is segmented by its colour and scored against its conditioning mask: IoU, colour accuracy and recall
(IoU > 0.5), overall and per mask kind. The layouts come from the world itself (no files) and each is scored as
soon as it is drawn; the JSON record and the contact sheet are written by the benchmark harness's report helpers
(:mod:`eligen.evals.report`), atomically, like those of `eligen bench layoutsam` and `eligen bench cocomig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import jsonable, option
from ..evals.report import save_sheet, write_json
from ..generate import resolve_device
from ..models import loading, model_loras
from ..options import SAMPLING_FIELDS, EntityOptions, SamplingOptions, pipeline_sampling_defaults, resolve_sampling
from ..overlay import render_overlay
from ..scale.options import EngineOptions
from .metrics import entity_scores, summarise
from .world import COLOURS, has_gap, is_rectangle, sample_layout

VARIANTS = ("base", "train-free", "eligen")
FIRST_HELD_OUT_SEED = 1_000_000  # the world's training data uses seeds below this


@dataclass
class BenchConfig(SamplingOptions, EntityOptions, EngineOptions):
    """Everything `eligen bench shapes` reads; the sampling options left unset are the model's
    (:func:`eligen.options.resolve_sampling`)."""

    model: str | None = option("eligen-tiny", "diffusers pipeline trained on the shapes world (default: the "
                               "shipped tiny model)")
    lora: str | None = option(None, "EliGen LoRA for variant (c) (default: the model's own, if it declares one; "
                              "without any, (c) is skipped)")
    n: int = option(200, "number of held-out layouts")
    seed: int = option(FIRST_HELD_OUT_SEED, "seed of the first layout")
    size: int = option(64, "image side in pixels")
    output_dir: Path = option(Path("shapesbench"), "where the JSON report and the contact sheet go", short="-o")
    sheet: int = option(8, "layouts shown on the contact sheet")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        SamplingOptions.__post_init__(self)
        EntityOptions.__post_init__(self)
        EngineOptions.__post_init__(self)
        self.output_dir = Path(self.output_dir)
        if self.n < 1 or self.size < 16 or self.sheet < 0:
            raise ValueError("n must be >= 1, size >= 16, sheet >= 0")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"-o {self.output_dir} is a file; give the folder the report and the contact sheet go "
                             "to")


def mask_kind(mask: np.ndarray) -> str:
    """``box``, ``ellipse`` or ``irregular``: how the benchmark drew this mask."""
    return "box" if is_rectangle(mask) else "irregular" if has_gap(mask) else "ellipse"


def entity_colour(prompt: str) -> str:
    words = [w for w in prompt.lower().split() if w in COLOURS]
    if len(words) != 1:
        raise ValueError(f"ShapesBench entity prompts name exactly one palette colour, got {prompt!r}")
    return words[0]


def score_image(image, layout) -> list[dict[str, Any]]:
    """Per-entity scores of one generated image, each tagged with its mask kind."""
    masks = [np.asarray(e.mask, dtype=bool) for e in layout.entities]
    scores = entity_scores(np.asarray(image), masks, [entity_colour(e.prompt) for e in layout.entities])
    for score, mask in zip(scores, masks, strict=True):
        score["kind"] = mask_kind(mask)
    return scores


def report(scores: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: the overall summary and one per mask kind."""
    out = {}
    for variant, rows in scores.items():
        kinds = sorted({r["kind"] for r in rows})
        out[variant] = {**summarise(rows), "by_kind": {k: summarise([r for r in rows if r["kind"] == k])
                                                       for k in kinds}}
    return out


def format_table(summary: dict[str, Any]) -> str:
    lines = ["| variant | mIoU | colour accuracy | recall (IoU > 0.5) | mIoU box / ellipse / irregular | entities |",
             "|---|---|---|---|---|---|"]
    for variant, s in summary.items():
        by_kind = " / ".join(f"{s['by_kind'][k]['miou']:.3f}" if k in s["by_kind"] else "-"
                             for k in ("box", "ellipse", "irregular"))
        lines.append(f"| {variant} | {s['miou']:.3f} | {s['colour_accuracy']:.3f} | {s['recall']:.3f} | {by_kind} | "
                     f"{s['n']} |")
    return "\n".join(lines)


def prepare(config: BenchConfig, pipe=None) -> tuple[Any, BenchConfig, list[str], str | None]:
    """The pipeline (loaded unless given, with the EliGen LoRA), ``config`` with its sampling filled from the
    model, the variants to run and the LoRA: what every layout is rendered with, locally and on each Ray actor."""
    from ..pipelines import load_eligen_pipeline

    if pipe is None:
        if not config.model:
            raise ValueError("give the model to benchmark with --model")
        device = resolve_device(config.device)  # the one device check every command makes, before loading
        with loading("the model", config.model):
            pipe = load_eligen_pipeline(config.model, load_default_lora=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    if config.size % pipe.patch_grid:
        grid = pipe.patch_grid
        raise ValueError(f"--size {config.size} is off the model's {grid}-pixel patch grid; use a multiple of {grid} "
                         f"(e.g. {config.size // grid * grid} or {(config.size // grid + 1) * grid})")
    lora = config.lora or next(iter(model_loras(config.model) if config.model else []), None)
    config = dataclasses.replace(config, **resolve_sampling(config, pipeline_sampling_defaults(pipe)))
    variants = [v for v in VARIANTS if v != "eligen" or lora is not None]
    if lora is not None:
        pipe.load_eligen_lora(lora, adapter_name="shapesbench")
    return pipe, config, variants, lora


def bench_layout(pipe, config: BenchConfig, variants: list[str], lora: str | None, index: int) -> dict[str, Any]:
    """Layout ``index`` rendered by every variant and scored: ``{"scores": {variant: rows}, "row": sheet tiles}``
    (tiles only for the first ``config.sheet`` layouts). The per-layout work of both engines."""
    import torch

    assert config.true_cfg is not None  # prepare fills every sampling option
    layout = sample_layout(config.seed + index, config.size)
    scores: dict[str, list[dict[str, Any]]] = {}
    row = []
    for variant in variants:
        if lora is not None:
            (pipe.enable_lora if variant == "eligen" else pipe.disable_lora)()
        entities = layout.entities if variant != "base" else None
        image = pipe(prompt=layout.prompt, entities=entities, height=config.size, width=config.size,
                     num_inference_steps=config.steps, guidance_scale=config.guidance,
                     true_cfg_scale=config.true_cfg, cfg_mode=config.cfg_mode,
                     negative_prompt="" if config.true_cfg > 1 else None,
                     max_sequence_length=config.max_sequence_length,
                     entities_on_negative=config.entities_on_negative, entity_tokens=config.entity_tokens,
                     attention=config.attention, compile=config.compile,
                     generator=torch.Generator().manual_seed(config.seed + index)).images[0]
        scores[variant] = [{**s, "layout": index} for s in score_image(image, layout)]
        if index < config.sheet:
            row.append(render_overlay(image, [e.mask for e in layout.entities],
                                      [f"{variant}: {e.prompt}" for e in layout.entities]))
    return {"scores": scores, "row": row}


def _replica(config: BenchConfig):
    """A Ray actor's worker: the model loaded once, then each layout benchmarked, with the settings it resolved."""
    pipe, config, variants, lora = prepare(config)
    settings = {"config": config, "variants": variants, "lora": lora}
    return lambda items: [{**bench_layout(pipe, config, variants, lora, item["index"]), **settings} for item in items]


def _layouts_on_ray(config: BenchConfig) -> tuple[list[dict[str, Any]], BenchConfig, list[str], str | None]:
    """Every layout's result from Ray actors, in order, and the settings the actors resolved; a ValueError naming
    the layouts that failed (a benchmark is not reported with layouts missing)."""
    from functools import partial

    from ..scale.ray_engine import report_failures, run_items

    items: list[dict[str, Any]] = [{"key": f"layout {index}", "index": index} for index in range(config.n)]
    run = run_items(items, partial(_replica, config), config, device=config.device, desc="shapes: generate and "
                    "score", progress=config.progress)
    if run.failed:
        report_failures(run.failed, config.retries)
        raise ValueError(f"{len(run.failed)} layout(s) failed on every attempt (named above); no report written")
    results = [run.results[item["key"]] for item in items]
    return results, results[0]["config"], results[0]["variants"], results[0]["lora"]


def run_shapes_bench(config: BenchConfig, pipe=None) -> dict[str, Any]:
    """Generate, score and report; writes ``shapesbench.json`` and ``contact_sheet.png`` to ``output_dir``.
    ``--engine ray`` benchmarks the layouts on Ray actors that load their own model (``pipe`` is then not used)."""
    if config.engine == "ray":
        results, config, variants, lora = _layouts_on_ray(config)
    else:
        pipe, config, variants, lora = prepare(config, pipe)
        results = [bench_layout(pipe, config, variants, lora, index)
                   for index in tqdm(range(config.n), desc="shapes: generate and score", disable=not config.progress)]
    scores: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    sheet: list = []
    for result in results:
        for variant in variants:
            scores[variant].extend(result["scores"][variant])
        sheet.extend(result["row"])
    summary = report(scores)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"lora": lora, **{name: getattr(config, name) for name in SAMPLING_FIELDS}}
    record = {"config": jsonable(config), "resolved": settings, "summary": summary,
              "scores": scores}
    write_json(config.output_dir / "shapesbench.json", record)
    save_sheet(sheet, config.output_dir / "contact_sheet.png", columns=len(variants))
    return summary

"""The generation stage of the benchmarks: every layout rendered once, sharded and resumable.

Layout ``i`` is written atomically to ``OUT/images/{i:06d}.png`` with its record in the PNG (the layout's key,
the boxes the generator was given in pixels, the size, the seed and every setting), so the PNGs are the state: a
PNG whose record matches this run is finished and never redone, a killed run restarts where it stopped, and
``--shard i/n`` (or RANK/WORLD_SIZE) processes render disjoint layouts into one folder. Boxes are scaled from the
benchmark's normalised boxes to the size the model renders (its native size unless ``--width/--height``).

The settings left unset are EliGen's reference ones for the model's family (:func:`eligen.options.resolve_sampling`;
the negative prompt is the family card's ``reference_negative_prompt``), and every image records what it ran with.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tqdm.auto import tqdm

from .. import __version__
from ..choices import DTYPE_NAMES
from ..config import option
from ..data.shards import parse_shard, shard_from_env
from ..families import card, model_family, titles
from ..generate import default_dtype, load_pipeline, read_metadata, resolve_device, save_png
from ..models import model_loras
from ..options import (
    ENTITY_FIELDS,
    SAMPLING_FIELDS,
    EntityOptions,
    SamplingOptions,
    check_lora_scales,
    model_sampling_defaults,
    pipeline_sampling_defaults,
    resolve_sampling,
)
from ..scale.options import EngineOptions
from .boxes import pixel_box
from .layouts import BenchLayout

IMAGES_DIR = "images"
SETTINGS = ("model", "lora", "lora_scale", *SAMPLING_FIELDS, "negative_prompt", *ENTITY_FIELDS)


@dataclass
class BenchRunConfig(SamplingOptions, EntityOptions, EngineOptions):
    """What every benchmark run reads: the data, the model, how to render, which shard, where to write. The sampling
    options left unset are the model's (:func:`eligen.options.resolve_sampling`), recorded in every image."""

    data: Path | None = option(None, "the benchmark's files (see the command's description)", required=True,
                               metavar="PATH")
    model: str | None = option("eligen-tiny", f"diffusers {titles()} pipeline directory or hub id")
    lora: list[str] = option([], "LoRA file, folder or hub id (repeat to stack), e.g. the EliGen LoRA", repeat=True,
                             metavar="PATH")
    lora_scale: list[float] = option([], "weight of the matching --lora (default 1.0 each)", repeat=True,
                                     metavar="S")
    out: Path | None = option(None, "output folder: images/, scores/, the JSON report, table.md, contact_sheet.png",
                              short="-o", metavar="DIR", required=True)
    limit: int | None = option(None, "only the first N layouts (a quick subset)", metavar="N")
    stage: str = option("all", "run one stage only (all: generate, score, report)",
                        choices=("all", "generate", "score", "report"))
    negative_prompt: str | None = option(None, "negative prompt, used when the true CFG scale is above 1 (default: "
                                         "the one of EliGen's reference examples for the model's family)")
    height: int | None = option(None, "image height (default: the model's native size); boxes are scaled to it")
    width: int | None = option(None, "image width (default: the model's native size); boxes are scaled to it")
    seed: int = option(42, "seed of every layout (the benchmarks' protocol: one fixed seed)")
    seeds: int = option(1, "run the whole benchmark N times, with seeds SEED, SEED+1, ... (each in OUT/seed_S); the "
                        "report gives each run and their mean and spread", metavar="N")
    indices: Path | None = option(None, "score only these layouts: a file of their indices in the benchmark's file "
                                  "(one per line, a JSON list, or JSON objects with an \"index\")", metavar="FILE")
    shard: str | None = option(None, "I/N: handle the layouts whose index is I mod N (default: from RANK and "
                               "WORLD_SIZE when WORLD_SIZE > 1, else 0/1)", metavar="I/N")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str | None = option(None, "weights dtype (default: bfloat16 on cuda, float32 elsewhere)",
                               choices=DTYPE_NAMES)
    sheet: int = option(12, "layouts on the contact sheet (0: none)")
    progress: bool = option(True, "show a progress bar per stage")

    def __post_init__(self) -> None:
        SamplingOptions.__post_init__(self)
        EntityOptions.__post_init__(self)
        EngineOptions.__post_init__(self)
        if self.data is None or self.out is None:
            raise ValueError("give the benchmark's files with --data PATH and an output folder with --out DIR")
        self.data, self.out = Path(self.data), Path(self.out)
        for name in ("height", "width", "limit", "seeds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value}")
        if self.sheet < 0:
            raise ValueError(f"--sheet must be >= 0, got {self.sheet}")
        check_lora_scales(self.lora_scale)
        if self.shard is not None:
            parse_shard(self.shard)
        if self.indices is not None:
            self.indices = Path(self.indices)

    def shard_spec(self) -> tuple[int, int]:
        return parse_shard(self.shard) if self.shard is not None else shard_from_env()

    def settings(self) -> dict[str, Any]:
        """The settings an image records; a PNG recording others is redone."""
        return {name: getattr(self, name) for name in SETTINGS}


def image_path(out: Path, index: int) -> Path:
    return out / IMAGES_DIR / f"{index:06d}.png"


def my_layouts(layouts: list[BenchLayout], config: BenchRunConfig) -> list[BenchLayout]:
    """This shard's layouts: index ``i`` mod ``n``."""
    shard, shards = config.shard_spec()
    return [layout for layout in layouts if layout.index % shards == shard]


def finished(path: Path, layout: BenchLayout, config: BenchRunConfig, benchmark: str) -> bool:
    """The PNG exists and records this layout, seed, size and settings."""
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except ValueError:  # unreadable: redone
        return False
    same = (meta.get("benchmark") == benchmark and meta.get("key") == layout.key and meta.get("seed") == config.seed
            and all(meta.get(k) == v for k, v in config.settings().items()))
    sized = all(getattr(config, k) is None or meta.get(k) == getattr(config, k) for k in ("width", "height"))
    return same and sized


def load_bench_pipeline(config: BenchRunConfig):
    """The model the run benchmarks, with its LoRAs (the model's declared LoRA when no ``--lora``)."""
    assert config.model is not None  # resolve_settings refuses a run without one
    device = resolve_device(config.device)
    return load_pipeline(config.model, device, config.dtype or default_dtype(device),
                         config.lora or model_loras(config.model), config.lora_scale)


class PipelineHolder:
    """Loads the benchmark's pipeline on first use and keeps it for every later sub-run (seeds, splits)."""

    def __init__(self, config: BenchRunConfig, pipe=None) -> None:
        self.config, self.pipe = config, pipe

    def load(self):
        if self.pipe is None:
            self.pipe = load_bench_pipeline(self.config)
        return self.pipe


def render_size(pipe, config: BenchRunConfig) -> tuple[int, int]:
    """``(width, height)``: the flags, else the model's native size, rounded down to the model's patch grid."""
    native_height, native_width = pipe.native_size()
    width, height = config.width or native_width, config.height or native_height
    grid = pipe.patch_grid
    if width % grid or height % grid:
        fitted = max(grid, width // grid * grid), max(grid, height // grid * grid)
        print(f"note: {width}x{height} is off the model's {grid}-pixel patch grid; rendering {fitted[0]}x"
              f"{fitted[1]}", file=sys.stderr)
        width, height = fitted
    return width, height


def render_layout(pipe, layout: BenchLayout, config: BenchRunConfig, width: int, height: int):
    """One image of ``layout`` at ``width`` x ``height``, and the pixel boxes its entities were given."""
    import torch

    from ..entities import Entity

    boxes = [pixel_box(e.box, width, height) for e in layout.entities]
    entities = [Entity(e.prompt, box=box) for e, box in zip(layout.entities, boxes, strict=True)]
    assert config.true_cfg is not None  # filled by resolve_sampling in generate_stage
    image = pipe(prompt=layout.prompt, entities=entities, height=height, width=width,
                 num_inference_steps=config.steps, guidance_scale=config.guidance, true_cfg_scale=config.true_cfg,
                 cfg_mode=config.cfg_mode, negative_prompt=config.negative_prompt if config.true_cfg > 1 else None,
                 max_sequence_length=config.max_sequence_length, entities_on_negative=config.entities_on_negative,
                 entity_tokens=config.entity_tokens, attention=config.attention, compile=config.compile,
                 generator=torch.Generator("cpu").manual_seed(config.seed), output_type="pil").images[0]
    return image, boxes


def resolve_settings(config: BenchRunConfig, pipe=None) -> BenchRunConfig:
    """``config`` with every unset sampling option and the negative prompt filled from the model and its family
    (EliGen's reference settings): what the images record."""
    if pipe is None and not config.model:
        raise ValueError(f"give the model to benchmark with --model (a {titles()} directory or hub id)")
    if pipe is not None:
        defaults, family = pipeline_sampling_defaults(pipe), pipe.family.card
    else:  # a model: refused above without one
        defaults, family = model_sampling_defaults(cast(str, config.model)), card(model_family(cast(str, config.model)))
    negative = config.negative_prompt if config.negative_prompt is not None else family.reference_negative_prompt
    return dataclasses.replace(config, negative_prompt=negative, **resolve_sampling(config, defaults))


def generate_stage(layouts: list[BenchLayout], config: BenchRunConfig, benchmark: str, pipe=None) -> tuple[int, int]:
    """Render this shard's unfinished layouts; ``(rendered, already there)``. ``pipe``: a loaded pipeline, or a
    holder with ``load()`` (loaded only when there is something to render)."""
    loaded = pipe.pipe if hasattr(pipe, "load") else pipe
    config = resolve_settings(config, loaded)
    assert config.out is not None  # __post_init__ refuses a missing --out
    mine = my_layouts(layouts, config)
    todo = [layout for layout in mine if not finished(image_path(config.out, layout.index), layout, config, benchmark)]
    if not todo:
        return 0, len(mine)
    if config.engine == "ray":
        _generate_on_ray(todo, config, benchmark)
        return len(todo), len(mine) - len(todo)
    if pipe is None or hasattr(pipe, "load"):
        pipe = pipe.load() if pipe is not None else load_bench_pipeline(config)
    dtype, width, height = _ready(pipe, config)
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{benchmark}: generate", unit="img",
              disable=not config.progress) as bar:
        for layout in todo:
            write_layout(pipe, layout, config, benchmark, dtype, width, height)
            bar.update(1)
    return len(todo), len(mine) - len(todo)


def _ready(pipe, config: BenchRunConfig) -> tuple[str, int, int]:
    """The pipeline's dtype name and the render size; its progress bar off."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    width, height = render_size(pipe, config)
    return str(getattr(pipe, "dtype", "")).removeprefix("torch."), width, height


def write_layout(pipe, layout: BenchLayout, config: BenchRunConfig, benchmark: str, dtype: str, width: int,
                 height: int) -> Path:
    """Render one layout and write its PNG with its record, atomically: the per-layout work of both engines.
    Returns the PNG's path."""
    assert config.out is not None  # __post_init__ refuses a missing --out
    image, boxes = render_layout(pipe, layout, config, width, height)
    record = {"version": __version__, "command": f"bench-{benchmark}", "benchmark": benchmark,
              "index": layout.index, "key": layout.key, "prompt": layout.prompt, "seed": config.seed,
              "width": width, "height": height, "dtype": dtype, **config.settings(),
              "entities": [{"prompt": e.prompt, "box": list(b)} for e, b in zip(layout.entities, boxes, strict=True)]}
    save_png(image, image_path(config.out, layout.index), record)
    return image_path(config.out, layout.index)


def _replica(config: BenchRunConfig, benchmark: str, layouts: dict[int, BenchLayout]):
    """A Ray actor's worker: the model loaded once, then :func:`write_layout` on each layout it is given."""
    pipe = load_bench_pipeline(config)
    dtype, width, height = _ready(pipe, config)
    return lambda items: [write_layout(pipe, layouts[item["index"]], config, benchmark, dtype, width, height)
                          for item in items]


def _generate_on_ray(todo: list[BenchLayout], config: BenchRunConfig, benchmark: str) -> None:
    """``todo`` rendered on Ray actors; a ValueError naming the layouts that failed after their retries."""
    from functools import partial

    from ..scale.ray_engine import report_failures, run_items

    items: list[dict[str, Any]] = [{"key": f"{layout.index:06d}", "index": layout.index} for layout in todo]
    run = run_items(items, partial(_replica, config, benchmark, {layout.index: layout for layout in todo}), config,
                    device=config.device, desc=f"{benchmark}: generate", progress=config.progress)
    if run.failed:
        report_failures(run.failed, config.retries)
        raise ValueError(f"{len(run.failed)} layout(s) failed after {config.retries + 1} attempt(s) (named above); "
                         "the others are rendered: rerun to retry them")

"""Dataset step one: render images from captions with any diffusers model of a family eligen runs.

Every image is written atomically to ``OUT/images/{index:06d}.png`` with its caption and parameters in the PNG's
metadata, so the PNGs are the record: a run is resumable (an existing PNG is a finished item and is never
regenerated or overwritten), shards can run side by side in one folder, and ``OUT/captions.jsonl`` is rebuilt at
the end of every run from the finished images of the captions file's lines (shards and reruns converge to the same
file; other PNGs in the folder are left out).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import __version__
from ..choices import DTYPE_NAMES
from ..config import option
from ..families import titles
from ..files import read_utf8, write_text_atomic
from ..generate import default_dtype, load_pipeline, read_metadata, resolve_device, save_png
from ..options import SamplingOptions, pipeline_sampling_defaults, resolve_sampling
from ..scale.options import EngineOptions
from .shards import parse_shard, shard_from_env

IMAGES_DIR = "images"
CAPTIONS_FILE = "captions.jsonl"
_IMAGE_NAME = re.compile(r"^(\d{6,})\.png$")


@dataclass
class DataGenerateConfig(SamplingOptions, EngineOptions):
    """Everything `eligen data generate` reads. The CLI flags are built from these fields; the sampling options left
    unset are the model's, else its diffusers pipeline's (plain generation: :func:`eligen.options.sampling_defaults`
    with the ``diffusers`` baseline)."""

    captions: Path | None = option(None, "captions: a .txt file (one caption per non-empty line) or a .jsonl file "
                                   "of {\"prompt\": ..., \"seed\": optional int}", positional=True, required=True)
    model: str | None = option("eligen-tiny", f"diffusers {titles()} pipeline directory or hub id (default: the "
                               "shipped tiny model, with its own defaults)")
    out: Path | None = option(None, "output folder (images in OUT/images/000000.png, ..., and OUT/captions.jsonl)",
                              short="-o", metavar="DIR")
    negative_prompt: str = option("", "negative prompt (used when the true CFG scale is above 1)")
    height: int | None = option(None, "image height in pixels (default: the model's native size)")
    width: int | None = option(None, "image width in pixels (default: the model's native size)")
    seed: int = option(0, "base seed: item i uses SEED + i unless its JSONL record gives a seed")
    shard: str | None = option(None, "I/N: render the items whose index is I mod N (default: from RANK and "
                               "WORLD_SIZE when WORLD_SIZE > 1, else 0/1)", metavar="I/N")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str | None = option(None, "weights dtype (default: bfloat16 on cuda, float32 elsewhere)",
                               choices=DTYPE_NAMES)
    batch_size: int = option(1, "captions per pipeline call (each keeps its own seed)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        SamplingOptions.__post_init__(self)
        EngineOptions.__post_init__(self)
        if self.captions is None:
            raise ValueError("give a captions file (.txt, one caption per line, or .jsonl)")
        self.captions = Path(self.captions)
        if self.out is not None:
            self.out = Path(self.out)
        for name in ("height", "width", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.shard is not None:
            parse_shard(self.shard)

    def shard_spec(self) -> tuple[int, int]:
        """``(i, n)`` from ``--shard``, else from the launcher's RANK/WORLD_SIZE, else ``(0, 1)``."""
        if self.shard is not None:
            return parse_shard(self.shard)
        return shard_from_env()


@dataclass
class DataGenerateResult:
    done: int  # items of this shard rendered by this run
    skipped: int  # items of this shard already finished (their PNG existed)
    out: Path
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (item key, reason): --engine ray


def load_captions(path: str | Path) -> list[dict[str, Any]]:
    """The items of a captions file: ``{"index", "prompt", "seed"}`` (seed None unless a JSONL record gives one).

    ``.jsonl``: one JSON object per non-empty line with a ``"prompt"`` and an optional integer ``"seed"``;
    any other suffix: one caption per non-empty line. Errors name the line number.
    """
    path = Path(path)
    jsonl = path.suffix.lower() == ".jsonl"
    items: list[dict[str, Any]] = []
    for number, line in enumerate(read_utf8(path, "captions file").splitlines(), start=1):
        if not line.strip():
            continue
        prompt, seed = _parse_jsonl_line(line, path, number) if jsonl else (line.strip(), None)
        items.append({"index": len(items), "prompt": prompt, "seed": seed})
    return items


def _parse_jsonl_line(line: str, path: Path, number: int) -> tuple[str, int | None]:
    """``(prompt, seed)`` from one JSONL record, or a ValueError naming the line."""
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a \"prompt\", got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"{where}: \"seed\" must be a non-negative integer, got {seed!r}")
    return prompt.strip(), seed


def image_path(out: Path, index: int) -> Path:
    """Where item ``index`` is written."""
    return out / IMAGES_DIR / f"{index:06d}.png"


def item_metadata(config: DataGenerateConfig, item: dict[str, Any], seed: int, dtype: str) -> dict[str, Any]:
    """The record stored in an item's PNG."""
    assert config.true_cfg is not None  # filled by resolve_sampling in generate_images
    return {
        "version": __version__,
        "command": "data-generate",
        "index": item["index"],
        "prompt": item["prompt"],
        "seed": seed,
        "model": config.model,
        "steps": config.steps,
        "guidance": config.guidance,
        "true_cfg": config.true_cfg,
        "cfg_mode": config.cfg_mode,
        "negative_prompt": config.negative_prompt if config.true_cfg > 1 else None,
        "width": config.width,
        "height": config.height,
        "max_sequence_length": config.max_sequence_length,
        "dtype": dtype,
    }


def _render_batch(pipe, config: DataGenerateConfig, prompts: list[str], seeds: list[int]) -> list:
    """One pipeline call: a PIL image per prompt, each from its own seeded generator."""
    import torch

    kwargs: dict[str, Any] = {}
    assert config.true_cfg is not None  # filled by resolve_sampling in generate_images
    if config.true_cfg > 1:
        kwargs["negative_prompt"] = [config.negative_prompt] * len(prompts)
    return pipe(
        prompt=prompts,
        height=config.height,
        width=config.width,
        num_inference_steps=config.steps,
        true_cfg_scale=config.true_cfg,
        cfg_mode=config.cfg_mode,
        guidance_scale=config.guidance,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        max_sequence_length=config.max_sequence_length,
        output_type="pil",
        **kwargs,
    ).images


def write_captions_index(out: Path, items: list[dict[str, Any]]) -> int:
    """Rebuild ``out/captions.jsonl`` atomically from the finished PNGs of ``items`` (every line of the captions
    file, seeds filled): a PNG is listed when it records its line's caption and seed. Anything else in
    ``out/images`` (a PNG dropped there, another command's image, a line since removed from the captions file or
    changed) is left out and counted in a note. Returns the line count."""
    records, others = [], 0
    for path in sorted((out / IMAGES_DIR).glob("*.png")):
        match = _IMAGE_NAME.match(path.name)
        index = int(match.group(1)) if match else -1
        if 0 <= index < len(items) and _finished(out, items[index]):
            item = items[index]
            records.append({"index": index, "image": f"{IMAGES_DIR}/{path.name}", "prompt": item["prompt"],
                            "seed": item["seed"]})
        else:
            others += 1
    if others:
        print(f"note: {others} image(s) in {out / IMAGES_DIR} are no line of the captions file as it is now (left "
              f"out of {CAPTIONS_FILE})", file=sys.stderr)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(out / CAPTIONS_FILE, text)
    return len(records)


def _load(config: DataGenerateConfig) -> tuple[Any, str]:
    """The pipeline named by the config, and the dtype it runs in."""
    if not config.model:
        raise ValueError(f"give a model with --model (a diffusers {titles()} directory or hub id)")
    device = resolve_device(config.device)
    dtype = config.dtype or default_dtype(device)
    return load_pipeline(config.model, device, dtype, [], []), dtype


def _finished(out: Path, item: dict[str, Any]) -> bool:
    """An item is done when its image exists and records this caption and seed: an edited captions file re-renders
    the lines that changed instead of keeping another caption's image under their number."""
    path = image_path(out, item["index"])
    if not path.exists():
        return False
    try:
        meta = read_metadata(path)
    except ValueError:  # an unreadable image is redone
        return False
    return (meta.get("command") == "data-generate" and meta.get("index") == item["index"]
            and meta.get("prompt") == item["prompt"] and meta.get("seed") == item["seed"])


def _pipe_dtype(pipe) -> str:
    """The dtype name of a pipeline passed in (recorded in the metadata)."""
    dtype = str(getattr(pipe, "dtype", None))
    return dtype.removeprefix("torch.") if dtype.removeprefix("torch.") in DTYPE_NAMES else dtype


def prepare(config: DataGenerateConfig, pipe=None) -> tuple[Any, str, DataGenerateConfig]:
    """The pipeline (loaded unless given), the dtype it runs in, and ``config`` with its size and sampling filled
    from the model: what every item is rendered with, by the local loop and by each Ray actor."""
    pipe, dtype = (pipe, _pipe_dtype(pipe)) if pipe is not None else _load(config)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    native_height, native_width = pipe.native_size()
    config = dataclasses.replace(config, height=config.height or native_height, width=config.width or native_width,
                                 **resolve_sampling(config, pipeline_sampling_defaults(pipe, "diffusers")))
    return pipe, dtype, config


def render_items(pipe, config: DataGenerateConfig, dtype: str, batch: list[dict[str, Any]]) -> list[None]:
    """Render one batch of items (one pipeline call) and write each item's PNG atomically: the per-item work of
    both engines."""
    assert config.out is not None  # generate_images refuses a run without --out
    seeds = [item["seed"] for item in batch]
    images = _render_batch(pipe, config, [item["prompt"] for item in batch], seeds)
    for item, seed, image in zip(batch, seeds, images, strict=True):
        save_png(image, image_path(config.out, item["index"]), item_metadata(config, item, seed, dtype))
    return [None] * len(batch)


def _replica(config: DataGenerateConfig):
    """A Ray actor's worker: the pipeline loaded once, then :func:`render_items` on each group of items."""
    pipe, dtype, config = prepare(config)
    return lambda batch: render_items(pipe, config, dtype, batch)


def _run_local(config: DataGenerateConfig, todo: list[dict[str, Any]], mine: int, pipe=None) -> None:
    pipe, dtype, config = prepare(config, pipe)
    with tqdm(total=mine, initial=mine - len(todo), desc="generate", unit="img", disable=not config.progress) as bar:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start:start + config.batch_size]
            render_items(pipe, config, dtype, batch)
            bar.update(len(batch))


def _run_ray(config: DataGenerateConfig, todo: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The pending items on Ray actors (each loads the model once); ``(key, reason)`` of the items that failed."""
    from functools import partial

    from ..scale.ray_engine import run_items

    items = [{"key": f"{item['index']:06d}", **item} for item in todo]
    result = run_items(items, partial(_replica, config), config, device=config.device, desc="generate",
                       progress=config.progress, group=config.batch_size)
    return result.failed


def generate_images(config: DataGenerateConfig, pipe=None) -> DataGenerateResult:
    """Render this shard's unfinished captions to ``config.out/images`` and refresh ``config.out/captions.jsonl``.
    ``--engine ray`` renders them on Ray actors that load their own pipeline (``pipe`` is then not used)."""
    if config.out is None:
        raise ValueError("give an output folder with --out DIR")
    assert config.captions is not None  # __post_init__ refuses a missing captions file
    items = load_captions(config.captions)
    for item in items:
        item["seed"] = item["seed"] if item["seed"] is not None else config.seed + item["index"]
    shard, shards = config.shard_spec()
    mine = [item for item in items if item["index"] % shards == shard]
    todo = [item for item in mine if not _finished(config.out, item)]
    failed: list[tuple[str, str]] = []
    if todo and config.engine == "ray":
        failed = _run_ray(config, todo)
    elif todo:
        _run_local(config, todo, len(mine), pipe)
    write_captions_index(config.out, items)
    return DataGenerateResult(done=len(todo) - len(failed), skipped=len(mine) - len(todo), out=config.out,
                              failed=failed)

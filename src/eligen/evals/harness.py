"""One harness for the quality benchmarks: read layouts -> generate (sharded, resumable) -> score -> report.

Stages and files, for ``eligen bench layoutsam`` and ``eligen bench cocomig`` (docs/design.md section 13)::

    OUT/images/{i:06d}.png    layout i rendered, its record inside (generation.py)
    OUT/scores/{i:06d}.json   its per-entity scores and the record of the image they were computed on
    OUT/{benchmark}.json      summary, settings and every per-entity score of all scored layouts
    OUT/table.md              the table in the papers' columns, beside the published numbers
    OUT/contact_sheet.png     the first layouts with their boxes and verdicts

Scoring is resumable like generation: a score file whose image record matches the PNG is kept. Each image is
scored at its own size with the pixel boxes its generator was given (an image resized afterwards has its boxes
rescaled when the aspect ratio is the same and is refused otherwise). The report gathers the score files of
every shard present, so the last shard to finish (or ``--stage report``) writes the complete table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import jsonable, option
from ..data.vlm import VLM_KINDS, VLMError, make_backend
from ..files import open_image, write_text_atomic
from ..generate import read_metadata
from . import cocomig, layoutsam
from .boxes import crop_bounds, rescale_box
from .generation import SETTINGS, BenchRunConfig, generate_stage, image_path, my_layouts
from .layouts import BenchLayout, read_cocomig, read_layoutsam
from .report import box_tile, read_json, save_sheet, write_json

SCORES_DIR = "scores"
TABLE_FILE = "table.md"
SHEET_FILE = "contact_sheet.png"
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"


@dataclass
class LayoutSamConfig(BenchRunConfig):
    """`eligen bench layoutsam`: the run, and the VLM that judges each box."""

    vlm: str = option("openai", "the judge's backend: an OpenAI-compatible server, or a local Qwen2-VL / Qwen2.5-VL",
                      choices=VLM_KINDS)
    vlm_model: str | None = option(None, "the judge: the model name the server serves (openai), or a local path / "
                                   "hub id (transformers)")
    base_url: str | None = option(None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang)")
    api_key_env: str = option("OPENAI_API_KEY", "name of the environment variable holding the API key")
    timeout: float = option(60.0, "seconds to wait for one answer (openai)")
    concurrency: int = option(4, "layouts judged in parallel (openai; transformers always uses 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.timeout > 0:
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")


@dataclass
class CocoMigConfig(BenchRunConfig):
    """`eligen bench cocomig`: the run, and the detector that finds each instance."""

    detector: str = option(DEFAULT_DETECTOR, "Grounding DINO checkpoint (local folder or hub id) loaded with "
                           "transformers")
    box_threshold: float = option(0.25, "detections kept above this box score")
    text_threshold: float = option(0.25, "phrase tokens kept above this score")
    iou_threshold: float = option(cocomig.IOU_THRESHOLD, "IoU at which an instance counts as detected")
    colour_threshold: float = option(cocomig.COLOUR_THRESHOLD, "fraction of a detection's pixels that must show "
                                     "the colour")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("box_threshold", "text_threshold", "iou_threshold", "colour_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class Benchmark:
    """What differs between benchmarks; everything else is the harness."""

    name: str
    read: Callable[[Path], list[BenchLayout]]
    make_judge: Callable[[Any], Any]
    score: Callable[[Any, Any, Any, BenchLayout, list], list[dict[str, Any]]]
    summarise: Callable[[list[dict[str, Any]]], dict[str, Any]]
    format_table: Callable[[dict[str, Any], str], str]
    verdict: Callable[[dict[str, Any]], str]


def _entity_row(layout: BenchLayout, index: int, box) -> dict[str, Any]:
    entity = layout.entities[index]
    return {"layout": layout.index, "key": layout.key, "entity": index, "name": entity.name, "prompt": entity.prompt,
            "box": [round(float(v), 3) for v in box]}


def score_layoutsam(config: LayoutSamConfig, judge, image, layout: BenchLayout, boxes: list) -> list[dict[str, Any]]:
    """Each box cropped from ``image`` and judged by the VLM (:mod:`eligen.evals.layoutsam`)."""
    rows = []
    for index, box in enumerate(boxes):
        crop = image.crop(crop_bounds(box, image.width, image.height))
        rows.append({**_entity_row(layout, index, box), **layoutsam.score_entity(judge, crop, layout.entities[index])})
    return rows


def score_cocomig(config: CocoMigConfig, judge, image, layout: BenchLayout, boxes: list) -> list[dict[str, Any]]:
    """Each instance detected by its noun and colour-checked (:mod:`eligen.evals.cocomig`)."""
    pixels = np.asarray(image.convert("RGB"))
    detections: dict[str, list] = {}
    rows = []
    for index, box in enumerate(boxes):
        entity = layout.entities[index]
        if entity.name not in detections:
            detections[entity.name] = judge.detect(image, entity.name)
        scores = cocomig.score_instance(detections[entity.name], box, pixels, entity.colour or "",
                                        config.iou_threshold, config.colour_threshold)
        rows.append({**_entity_row(layout, index, box), "level": layout.level, "colour": entity.colour, **scores,
                     "detections": len(detections[entity.name])})
    return rows


def _vlm_judge(config: LayoutSamConfig):
    return make_backend(config.vlm, config.vlm_model, config.base_url, config.api_key_env, config.timeout)


def _detector_judge(config: CocoMigConfig):
    from .detector import GroundingDinoDetector

    return GroundingDinoDetector(config.detector, device=config.device, box_threshold=config.box_threshold,
                                 text_threshold=config.text_threshold)


BENCHMARKS = {
    "layoutsam": Benchmark("layoutsam", read_layoutsam, _vlm_judge, score_layoutsam, layoutsam.summarise,
                           layoutsam.format_table, layoutsam.verdict),
    "cocomig": Benchmark("cocomig", read_cocomig, _detector_judge, score_cocomig, cocomig.summarise,
                         cocomig.format_table, cocomig.verdict),
}


@dataclass
class BenchResult:
    summary: dict[str, Any]
    table: str
    generated: int  # images rendered by this run (this shard)
    scored: int  # images scored by this run (this shard)
    layouts: int  # layouts in the run (after --limit)
    reported: int  # layouts whose scores are in the report (all shards)
    report: Path | None


def image_identity(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """What an image's scores depend on: its record and its bytes (an image replaced by another is scored again)."""
    return {**{k: meta.get(k) for k in ("benchmark", "key", "seed", "width", "height", "entities", *SETTINGS)},
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def scoring_boxes(meta: dict[str, Any], size: tuple[int, int], layout: BenchLayout, path: Path) -> list:
    """The pixel boxes the generator was given, on an image of ``size = (width, height)``."""
    if meta.get("key") != layout.key or len(meta.get("entities") or []) != len(layout.entities):
        raise ValueError(f"{path} was rendered for another layout ({meta.get('key')!r}, not {layout.key!r}); delete "
                         "it or run the generate stage again")
    drawn_at = (int(meta["width"]), int(meta["height"]))
    try:
        return [rescale_box(e["box"], drawn_at, size) for e in meta["entities"]]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def score_stage(bench: Benchmark, layouts: list[BenchLayout], config, judge=None) -> int:
    """Score this shard's rendered, unscored images; the number scored."""
    todo = []
    for layout in my_layouts(layouts, config):
        path = image_path(config.out, layout.index)
        if not path.is_file():
            continue
        meta = read_metadata(path)
        done = read_json(config.out / SCORES_DIR / f"{layout.index:06d}.json")
        if done is None or done.get("image") != image_identity(meta, path):
            todo.append((layout, path, meta))
    if not todo:
        return 0
    judge = judge if judge is not None else bench.make_judge(config)

    def score_one(item: tuple[BenchLayout, Path, dict[str, Any]]) -> None:
        layout, path, meta = item
        image = open_image(path, "generated image").convert("RGB")
        boxes = scoring_boxes(meta, image.size, layout, path)
        try:
            rows = bench.score(config, judge, image, layout, boxes)
        except VLMError as exc:
            raise ValueError(f"{path}: the judge failed ({exc}); finished scores are kept, rerun to go on") from None
        write_json(config.out / SCORES_DIR / f"{layout.index:06d}.json", {"image": image_identity(meta, path),
                                                                          "entities": rows})

    workers = getattr(config, "concurrency", 1) if getattr(config, "vlm", None) == "openai" else 1
    with tqdm(total=len(todo), desc=f"{bench.name}: score", unit="img", disable=not config.progress) as bar:
        if workers == 1:
            for item in todo:
                score_one(item)
                bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="score") as pool:
                futures = [pool.submit(score_one, item) for item in todo]
                try:
                    for future in as_completed(futures):
                        future.result()
                        bar.update(1)
                finally:  # on an error or Ctrl-C, drop what has not started; finished scores are on disk
                    for future in futures:
                        future.cancel()
    return len(todo)


def _sheet(bench: Benchmark, config, scored: list[tuple[BenchLayout, list]]) -> Path | None:
    tiles = []
    for layout, rows in scored[:config.sheet]:
        image = open_image(image_path(config.out, layout.index), "generated image").convert("RGB")
        tiles.append(box_tile(image, [r["box"] for r in rows], [f"{r['name']}: {bench.verdict(r)}" for r in rows]))
    return save_sheet(tiles, config.out / SHEET_FILE)


def report_stage(bench: Benchmark, layouts: list[BenchLayout], config) -> tuple[dict[str, Any], str, int, Path]:
    """Gather every score file of the run's layouts; write the JSON, the table and the contact sheet."""
    scored = []
    for layout in layouts:
        record = read_json(config.out / SCORES_DIR / f"{layout.index:06d}.json")
        if record is not None and record.get("image", {}).get("key") == layout.key:
            scored.append((layout, record["entities"]))
    rows = [row for _, entity_rows in scored for row in entity_rows]
    summary = bench.summarise(rows)
    label = f"this run ({len(scored)}/{len(layouts)} layouts)"
    table = bench.format_table(summary, label)
    path = config.out / f"{bench.name}.json"
    write_json(path, {"benchmark": bench.name, "config": jsonable(config),
                      "layouts": len(layouts), "scored_layouts": len(scored), "summary": summary, "entities": rows})
    write_text_atomic(config.out / TABLE_FILE, table + "\n")
    if config.sheet:
        _sheet(bench, config, scored)
    return summary, table, len(scored), path


def run_benchmark(name: str, config, pipe=None, judge=None) -> BenchResult:
    """The stages ``config.stage`` asks for, in order. ``pipe`` / ``judge``: already loaded ones (else loaded
    from the config when there is work for them)."""
    bench = BENCHMARKS[name]
    layouts = bench.read(config.data)
    if not layouts:
        raise ValueError(f"{config.data}: no layouts")
    layouts = layouts[:config.limit] if config.limit else layouts
    generated = scored = 0
    if config.stage in ("all", "generate"):
        generated, _ = generate_stage(layouts, config, name, pipe)
    if config.stage in ("all", "score"):
        scored = score_stage(bench, layouts, config, judge)
    summary: dict[str, Any]
    report: Path | None
    summary, table, reported, report = {}, "", 0, None
    if config.stage in ("all", "report"):
        summary, table, reported, report = report_stage(bench, layouts, config)
    return BenchResult(summary=summary, table=table, generated=generated, scored=scored, layouts=len(layouts),
                       reported=reported, report=report)

"""One harness for the quality benchmarks: read layouts -> generate (sharded, resumable) -> score -> report.

Stages and files, for ``eligen bench layoutsam``, ``cocomig`` and ``overlaybench`` (docs/design.md section 13)::

    OUT/images/{i:06d}.png    layout i rendered, its record inside (generation.py)
    OUT/scores/{i:06d}.json   its scores and the record of the image they were computed on
    OUT/{benchmark}.json      summary, settings and every score of all scored layouts
    OUT/table.md              the table beside the published numbers, their sources, the protocol deviations still
                              present and what makes this run not comparable
    OUT/contact_sheet.png     the first layouts with their boxes and verdicts

A run with several seeds (``--seeds N``) or OverLayBench's splits is several such runs, each in its own folder
(``OUT/seed_S``, ``OUT/SPLIT``, ``OUT/SPLIT/seed_S``), and ``OUT/table.md`` then lists each with the mean and spread.
Scoring is resumable like generation: a score file whose image record matches the PNG is kept. The report gathers the
score files of every shard present, so the last shard to finish (or ``--stage report``) writes the complete table.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import jsonable
from ..data.vlm import VLMError
from ..files import open_image, write_text_atomic
from ..generate import read_metadata
from . import cocomig, layoutsam, notes, overlaybench
from .boxes import rescale_box
from .configs import CocoMigConfig, LayoutSamConfig, OverLayBenchConfig
from .generation import SETTINGS, PipelineHolder, generate_stage, image_path, my_layouts, resolve_settings
from .judges import MINICPM_CHAT, MODEL_DEFAULTS, make_judge
from .layouts import BenchLayout, read_cocomig, read_indices, read_layoutsam, read_overlaybench
from .published import Published, sources
from .report import box_tile, read_json, save_sheet, write_json

SCORES_DIR = "scores"
TABLE_FILE = "table.md"
SHEET_FILE = "contact_sheet.png"
__all__ = ["BENCHMARKS", "CocoMigConfig", "LayoutSamConfig", "OverLayBenchConfig", "run_benchmark"]


@dataclass(frozen=True)
class Benchmark:
    """What differs between benchmarks; everything else is the harness."""

    name: str
    groups: Callable[[Any], list[tuple[str, list[BenchLayout]]]]  # (folder name or "", layouts) per split
    make_judge: Callable[[Any], Any]
    score: Callable[[Any, Any, Any, BenchLayout, list], list[dict[str, Any]]]
    summarise: Callable[[list[dict[str, Any]]], dict[str, Any]]
    format_table: Callable[[dict[str, Any], str], str]
    sheet_items: Callable[[list[dict[str, Any]]], list[tuple[list[float], str]]]
    headline: Callable[[dict[str, Any]], dict[str, Any]]  # the summary's overall numbers (for seeds and splits)
    header: str
    columns: tuple[str, ...]  # the headline's metric keys, in the header's order
    format_row: Callable[[str, dict[str, Any]], str]
    published: tuple[Published, ...]
    run_notes: Callable[[Any, Any], list[str]]


def _by_verdict(verdict: Callable[[dict[str, Any]], str]):
    return lambda rows: [(r["box"], f"{r['name']}: {verdict(r)}") for r in rows]


def _cocomig_judge(config: CocoMigConfig) -> cocomig.Judge:
    from .detector import GroundingDinoDetector
    from .segment import SamSegmenter

    detector = GroundingDinoDetector(config.detector, device=config.device, box_threshold=config.box_threshold,
                                     text_threshold=config.text_threshold)
    segmenter = SamSegmenter(config.sam, device=config.device)
    return cocomig.Judge(detector, segmenter, comparable_segmenter=segmenter.is_vit_h)


def _vlm_judge(protocol):
    return lambda config: make_judge(config.vlm, config.vlm_model, config.base_url, config.api_key_env,
                                     config.timeout, config.decoding(protocol))


BENCHMARKS = {
    "layoutsam": Benchmark(
        "layoutsam", lambda c: [("", read_layoutsam(c.data))], _vlm_judge(MINICPM_CHAT),
        lambda c, j, image, layout, boxes: layoutsam.score_layout(j, image, layout, boxes), layoutsam.summarise,
        layoutsam.format_table, _by_verdict(layoutsam.verdict), lambda s: s, layoutsam.HEADER,
        layoutsam.COLUMNS, layoutsam.format_row, layoutsam.PUBLISHED, notes.layoutsam_notes),
    "cocomig": Benchmark(
        "cocomig", lambda c: [("", read_cocomig(c.data))], _cocomig_judge,
        lambda c, j, image, layout, boxes: cocomig.score_layout(j, image, layout, boxes, c.iou_threshold),
        cocomig.summarise, cocomig.format_table, _by_verdict(cocomig.verdict), lambda s: s["all"], cocomig.HEADER,
        cocomig.COLUMNS, cocomig.format_row, cocomig.PUBLISHED, notes.cocomig_notes),
    "overlaybench": Benchmark(
        "overlaybench", lambda c: [(s, read_overlaybench(c.data, s)) for s in c.splits()], _vlm_judge(MODEL_DEFAULTS),
        lambda c, j, image, layout, boxes: overlaybench.score_layout(j, image, layout, boxes), overlaybench.summarise,
        overlaybench.format_table, overlaybench.sheet_items, lambda s: s, overlaybench.HEADER,
        overlaybench.COLUMNS, overlaybench.format_row, overlaybench.PUBLISHED, notes.overlaybench_notes),
}


@dataclass
class BenchResult:
    summary: dict[str, Any]
    table: str
    generated: int  # images rendered by this run (this shard)
    scored: int  # images scored by this run (this shard)
    layouts: int  # layouts in the run (after --limit / --indices)
    reported: int  # layouts whose scores are in the report (all shards)
    report: Path | None


class JudgeHolder:
    """Loads the judge on first use (never when every image is already scored) and keeps it for every sub-run."""

    def __init__(self, bench: Benchmark, config, judge=None) -> None:
        self.bench, self.config, self.judge = bench, config, judge

    def load(self):
        if self.judge is None:
            self.judge = self.bench.make_judge(self.config)
        return self.judge


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


def _todo(layouts: list[BenchLayout], config) -> list[tuple[BenchLayout, Path, dict[str, Any]]]:
    todo = []
    for layout in my_layouts(layouts, config):
        path = image_path(config.out, layout.index)
        if not path.is_file():
            continue
        meta = read_metadata(path)
        done = read_json(config.out / SCORES_DIR / f"{layout.index:06d}.json")
        if done is None or done.get("image") != image_identity(meta, path):
            todo.append((layout, path, meta))
    return todo


def score_stage(bench: Benchmark, layouts: list[BenchLayout], config, judge=None) -> int:
    """Score this shard's rendered, unscored images; the number scored. ``judge``: a judge or a holder."""
    todo = _todo(layouts, config)
    if not todo:
        return 0
    judge = judge.load() if isinstance(judge, JudgeHolder) else judge if judge is not None else bench.make_judge(config)

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
        items = bench.sheet_items(rows)
        tiles.append(box_tile(image, [box for box, _ in items], [label for _, label in items]))
    return save_sheet(tiles, config.out / SHEET_FILE)


def reference_settings(config) -> dict[str, Any] | None:
    """EliGen's reference generation settings for the run's model family (None when the model cannot be read)."""
    from ..families import card, model_family
    from ..options import sampling_defaults

    try:
        family = card(model_family(config.model))
    except (ValueError, OSError):
        return None
    return {**sampling_defaults(family, {}), "negative_prompt": family.reference_negative_prompt}


def comparability(bench: Benchmark, config, judge, layouts: int, total: int) -> str:
    """The lines under a table: the published rows' sources, the deviations, what makes this run not comparable."""
    try:
        record = dataclasses.asdict(resolve_settings(config))
        reference = reference_settings(config)
    except (ValueError, OSError):  # the model's files are not here: its settings cannot be told
        record, reference = {}, None
    problems = [*notes.subset_notes(config, layouts, total), *bench.run_notes(config, judge),
                *notes.generation_notes(record, reference)]
    lines = ["", "Published rows: " + "; ".join(sources(bench.published)) + ".",
             "Protocol deviations still present: " + "; ".join(notes.DEVIATIONS[bench.name]) + "."]
    lines.append("**Not comparable with the published numbers**: " + "; ".join(problems) + "." if problems else
                 "Nothing in this run's settings departs from the protocol.")
    return "\n".join(lines)


def report_stage(bench: Benchmark, layouts: list[BenchLayout], config, total: int,
                 judge=None) -> tuple[dict[str, Any], str, int, Path]:
    """Gather every score file of the run's layouts; write the JSON, the table and the contact sheet."""
    scored = []
    for layout in layouts:
        record = read_json(config.out / SCORES_DIR / f"{layout.index:06d}.json")
        if record is not None and record.get("image", {}).get("key") == layout.key:
            scored.append((layout, record["entities"]))
    rows = [row for _, entity_rows in scored for row in entity_rows]
    summary = bench.summarise(rows)
    label = f"this run ({len(scored)}/{len(layouts)} layouts)"
    loaded = judge.judge if isinstance(judge, JudgeHolder) else judge
    table = bench.format_table(summary, label) + "\n" + comparability(bench, config, loaded, len(layouts), total)
    path = config.out / f"{bench.name}.json"
    write_json(path, {"benchmark": bench.name, "config": jsonable(config),
                      "layouts": len(layouts), "scored_layouts": len(scored), "summary": summary, "entities": rows})
    write_text_atomic(config.out / TABLE_FILE, table + "\n")
    if config.sheet:
        _sheet(bench, config, scored)
    return summary, table, len(scored), path


def select(layouts: list[BenchLayout], config) -> list[BenchLayout]:
    """``--indices`` (by the benchmark's own index), then ``--limit``."""
    if config.indices is not None:
        wanted = read_indices(config.indices)
        known = {layout.index for layout in layouts}
        missing = [i for i in wanted if i not in known]
        if missing:
            raise ValueError(f"{config.indices}: {len(missing)} index(es) not in the benchmark (it has "
                             f"{len(layouts)} layouts), e.g. {missing[0]}")
        layouts = [layout for layout in layouts if layout.index in set(wanted)]
    return layouts[:config.limit] if config.limit else layouts


def run_one(bench: Benchmark, layouts: list[BenchLayout], config, total: int, pipe: PipelineHolder,
            judge: JudgeHolder) -> BenchResult:
    """The stages ``config.stage`` asks for, in order, for one folder (one seed of one split)."""
    generated = scored = reported = 0
    if config.stage in ("all", "generate"):
        generated, _ = generate_stage(layouts, config, bench.name, pipe)
    if config.stage in ("all", "score"):
        scored = score_stage(bench, layouts, config, judge)
    summary: dict[str, Any] = {}
    table, report = "", None
    if config.stage in ("all", "report"):
        summary, table, reported, report = report_stage(bench, layouts, config, total, judge)
    return BenchResult(summary=summary, table=table, generated=generated, scored=scored, layouts=len(layouts),
                       reported=reported, report=report)


def _spread(values: list[float]) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return "-"
    return f"{np.mean(finite):.2f} ± {np.std(finite, ddof=1) if len(finite) > 1 else 0.0:.2f}"


def aggregate(bench: Benchmark, runs: list[tuple[str, str, BenchResult]]) -> str:
    """The table of several runs (``(group, label, result)``): one row each, then per group the mean ± sample
    standard deviation over its seeds, then the published rows."""
    names = [c.strip() for c in bench.header.split("|")[2:-1]]
    lines = ["| runs | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [bench.format_row(f"{group} {label}".strip(), bench.headline(result.summary))
              for group, label, result in runs]
    for group in dict.fromkeys(g for g, _, _ in runs):
        heads = [bench.headline(r.summary) for g, _, r in runs if g == group]
        if len(heads) > 1:
            cells = [_spread([h[k] for h in heads]) for k in bench.columns]
            cells += ["-"] * (len(names) - len(cells))
            lines.append(f"| **{group + ' ' if group else ''}mean ± std over {len(heads)} seeds** | "
                         + " | ".join(cells) + " |")
    lines += [bench.format_row(p.label, p.numbers) for p in bench.published]
    return "\n".join(lines)


def _folder(config, group: str, seed: int) -> Path:
    folder = config.out / group if group else config.out
    return folder / f"seed_{seed}" if config.seeds > 1 else folder


def run_benchmark(name: str, config, pipe=None, judge=None) -> BenchResult:
    """Every run the config asks for (each split, each seed), each with the stages ``config.stage`` names; with
    several, ``OUT/table.md`` and ``OUT/{name}.json`` gather them. ``pipe`` / ``judge``: already loaded ones (else
    loaded when there is work for them, once for all runs)."""
    bench = BENCHMARKS[name]
    pipes, judges = PipelineHolder(config, pipe), JudgeHolder(bench, config, judge)
    runs = []
    for group, layouts in bench.groups(config):
        if not layouts:
            raise ValueError(f"{config.data}: no layouts" + (f" in split {group}" if group else ""))
        chosen = select(layouts, config)
        for seed in range(config.seed, config.seed + config.seeds):
            sub = dataclasses.replace(config, out=_folder(config, group, seed), seed=seed)
            runs.append((group, f"seed {seed}", run_one(bench, chosen, sub, len(layouts), pipes, judges)))
    if len(runs) == 1:
        return runs[0][2]
    results = [r for _, _, r in runs]
    table, report = "", None
    if config.stage in ("all", "report"):
        table = aggregate(bench, runs)
        report = config.out / f"{name}.json"
        write_json(report, {"benchmark": name, "runs": [{"group": g, "run": label, "folder": str(r.report),
                                                         "summary": r.summary} for g, label, r in runs]})
        write_text_atomic(config.out / TABLE_FILE, table + "\n")
    return BenchResult(summary={"runs": [r.summary for r in results]}, table=table,
                       generated=sum(r.generated for r in results), scored=sum(r.scored for r in results),
                       layouts=sum(r.layouts for r in results), reported=sum(r.reported for r in results),
                       report=report)

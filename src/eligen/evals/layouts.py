"""Benchmark layouts read from the benchmarks' own public files.

- **LayoutSAM-Eval** (the ``test`` split of the LayoutSAM-eval dataset, parquet): one row per layout with
  ``global_caption``, ``bbox_list`` (pixel boxes on the source image, often stored as the text of a Python list),
  ``region_captions`` (short names), ``detail_region_captions`` (the full entity prompts), ``width``, ``height``
  and ``file_name``. The generator gets the detailed captions; the judge checks the short names and the details.
  Boxes are normalised and rounded to 3 decimals, as the benchmark's own dataset class does.
- **COCO-MIG** (MIG-Bench): ``mig_bench_anno.yaml`` maps each global prompt to its instance phrases ("a black
  airplane"), each with a list of normalised boxes, plus a ``coco_id``; ``mig_bench.txt`` beside it lists the
  prompts in order. The evaluation's JSON form (``{id: {"caption", "segment": [{"label", "bbox"}]}}``) is read too.
  The level of a layout is its number of instances (L2-L6).
- **OverLayBench** (its evaluation dataset, parquet, splits ``simple``, ``medium``, ``hard``): one row per layout
  with ``image_id`` and ``annotation``, the text of a Python dict: ``caption``, ``annotations`` (instance name ->
  ``category``, ``bbox`` in pixels of a 1024x1024 canvas, and its description), ``relations`` and
  ``valid_overlap``. The parsed dict is kept whole (:attr:`BenchLayout.annotation`): the judge's questions embed it.

Boxes are kept normalised (:mod:`eligen.evals.boxes`): they become pixels only at the size an image is made at.
:func:`read_indices` reads a subset (``--indices FILE``).
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import read_utf8
from .boxes import Box, box_numbers, check_normalised, normalise

LAYOUTSAM_DECIMALS = 3  # the benchmark's dataset class rounds each normalised coordinate to 3 decimals
LAYOUTSAM_FIELDS = ("global_caption", "bbox_list", "region_captions", "detail_region_captions", "width", "height")
MIG_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown")
MIG_ANNOTATION = "mig_bench_anno.yaml"
MIG_PROMPTS = "mig_bench.txt"
ARTICLES = ("a", "an", "the")
OVERLAYBENCH_SPLITS = ("simple", "medium", "hard")
OVERLAYBENCH_CANVAS = 1024  # OverLayBench's boxes are pixels of a 1024x1024 canvas
OVERLAYBENCH_PROMPT_KEYS = ("local_prompt", "local_prompts", "description")  # an instance's description, if any


@dataclass(frozen=True)
class BenchEntity:
    """One box of a layout: what the generator is asked (``prompt``), where (``box``, normalised), and what the
    judge checks: ``name`` (LayoutSAM: the short region caption; COCO-MIG: the object noun), ``detail``
    (LayoutSAM: the detailed caption) and ``colour`` (COCO-MIG)."""

    prompt: str
    box: Box
    name: str
    detail: str | None = None
    colour: str | None = None
    category: str | None = None  # OverLayBench: the instance's category


@dataclass(frozen=True)
class BenchLayout:
    index: int  # position in the benchmark file (the image is OUT/images/{index:06d}.png)
    key: str  # the benchmark's own name for it (LayoutSAM: file_name; COCO-MIG: the prompt and coco_id)
    prompt: str
    entities: tuple[BenchEntity, ...]
    annotation: dict[str, Any] | None = field(default=None, compare=False)  # OverLayBench: the parsed annotation

    @property
    def level(self) -> int:
        """COCO-MIG's level: the number of instances."""
        return len(self.entities)


def _as_list(value: Any, field: str, where: str) -> list:
    """A list field stored as a list, a JSON text or the text of a Python literal."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: '{field}' is neither a list nor the text of one") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: '{field}' must be a list, got {type(value).__name__}")
    return list(value)


def _side(row: dict[str, Any], field: str, where: str) -> float:
    """A row's ``width`` or ``height``: a finite positive number (of pixels)."""
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{where}: '{field}' must be a positive number of pixels, got {value!r}")
    return float(value)


def layoutsam_layout(index: int, row: dict[str, Any]) -> BenchLayout:
    """One LayoutSAM-Eval row as a layout; errors name the row and the field."""
    where = f"LayoutSAM-Eval row {index}"
    missing = [f for f in LAYOUTSAM_FIELDS if row.get(f) is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (LayoutSAM-eval's parquet has "
                         f"{', '.join(LAYOUTSAM_FIELDS)})")
    boxes = _as_list(row["bbox_list"], "bbox_list", where)
    names = _as_list(row["region_captions"], "region_captions", where)
    details = _as_list(row["detail_region_captions"], "detail_region_captions", where)
    if not len(boxes) == len(names) == len(details):
        raise ValueError(f"{where}: {len(boxes)} boxes, {len(names)} region_captions and {len(details)} "
                         "detail_region_captions; they must match one to one")
    width, height = _side(row, "width", where), _side(row, "height", where)
    entities = tuple(
        BenchEntity(prompt=str(detail), box=check_normalised(
            [round(v, LAYOUTSAM_DECIMALS) for v in normalise(box_numbers(box, f"{where}, box {i}"), width, height)],
            f"{where}, box {i}"),
                    name=str(name), detail=str(detail))
        for i, (box, name, detail) in enumerate(zip(boxes, names, details, strict=True)))
    key = str(row.get("file_name") or f"{index:06d}")
    return BenchLayout(index=index, key=key, prompt=str(row["global_caption"]), entities=entities)


def _parquet_rows(files: list[Path], wanted: tuple[str, ...] = (*LAYOUTSAM_FIELDS, "file_name"),
                  ) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow: pip install 'eligen[bench]'") from None
    rows: list[dict[str, Any]] = []
    for path in files:
        schema = pq.read_schema(path)
        columns = [c for c in wanted if c in schema.names]  # never the image column
        rows.extend(pq.read_table(path, columns=columns).to_pylist())
    return rows


def read_layoutsam(path: str | Path) -> list[BenchLayout]:
    """LayoutSAM-Eval layouts from a parquet file, a folder of them (a local copy of the dataset: every
    ``*.parquet`` below it whose name has ``test``, else all of them, in name order) or a ``.jsonl`` of rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LayoutSAM-Eval data not found: {path}")
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        files = [f for f in files if "test" in f.name] or files
        if not files:
            raise ValueError(f"{path}: no .parquet file inside; give the folder of the LayoutSAM-eval dataset")
        rows = _parquet_rows(files)
    elif path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in read_utf8(path, "LayoutSAM-Eval rows").splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: a line is not valid JSON ({exc})") from None
        if not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{path}: every line must be a JSON object with LayoutSAM-eval's fields")
    else:
        rows = _parquet_rows([path])
    return [layoutsam_layout(i, row) for i, row in enumerate(rows)]


def mig_entity(phrase: str, box: Any, where: str) -> BenchEntity:
    """An instance phrase ("a black airplane" or "black airplane") and its normalised box."""
    if not isinstance(phrase, str):
        raise ValueError(f"{where}: an instance is a phrase such as 'a black airplane', got {phrase!r}")
    words = phrase.strip().split()
    if words and words[0].lower() in ARTICLES:
        words = words[1:]
    if len(words) < 2 or words[0].lower() not in MIG_COLOURS:
        raise ValueError(f"{where}: the instance {phrase!r} does not start with one of COCO-MIG's colours "
                         f"({', '.join(MIG_COLOURS)})")
    return BenchEntity(prompt=phrase.strip(), box=check_normalised(box, where), name=" ".join(words[1:]),
                       colour=words[0].lower())


def _mig_boxes(boxes: Any, where: str) -> list:
    """An instance's boxes in MIG-Bench's YAML: a list of boxes."""
    if not isinstance(boxes, list) or not all(isinstance(b, (list, tuple)) for b in boxes):
        raise ValueError(f"{where}: an instance has a list of boxes [[x0, y0, x1, y1], ...], got {boxes!r}")
    return boxes


def _mig_from_yaml(path: Path) -> list[tuple[str, str, list[BenchEntity]]]:
    try:
        import yaml
    except ImportError:
        raise ValueError("reading MIG-Bench's YAML needs pyyaml: pip install 'eligen[bench]'") from None
    try:
        data = yaml.safe_load(read_utf8(path, "MIG-Bench annotation"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of prompts to instances (MIG-Bench's mig_bench_anno.yaml)")
    order = list(data)
    prompts_file = path.with_name(MIG_PROMPTS)
    if prompts_file.is_file():
        order = [line.strip() for line in read_utf8(prompts_file, "MIG-Bench prompts").splitlines() if line.strip()]
        unknown = [p for p in order if p not in data]
        if unknown:
            raise ValueError(f"{prompts_file}: {len(unknown)} prompt(s) not in {path.name}, e.g. {unknown[0]!r}")
    items = []
    for number, prompt in enumerate(order):
        record, where = data[prompt], f"{path.name}, prompt {number} ({prompt[:40]!r})"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected phrases with boxes and a coco_id")
        entities = [mig_entity(phrase, box, f"{where}, {phrase!r}, box {i}")
                    for phrase, boxes in record.items() if phrase != "coco_id"
                    for i, box in enumerate(_mig_boxes(boxes, f"{where}, {phrase!r}"))]
        items.append((f"{prompt}_{record.get('coco_id', number)}", prompt, entities))
    return items


def _mig_from_json(path: Path) -> list[tuple[str, str, list[BenchEntity]]]:
    try:
        data = json.loads(read_utf8(path, "MIG-Bench layouts"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {{id: {{\"caption\", \"segment\": [{{\"label\", \"bbox\"}}]}}}}")
    items = []
    for key, record in data.items():
        where = f"{path.name}, {key!r}"
        try:
            caption, segments = record["caption"], record["segment"]
        except (KeyError, TypeError):
            raise ValueError(f"{where}: needs \"caption\" and \"segment\"") from None
        if not isinstance(segments, list) or not all(isinstance(s, dict) and {"label", "bbox"} <= set(s)
                                                     for s in segments):
            raise ValueError(f"{where}: \"segment\" must be a list of {{\"label\", \"bbox\"}} objects")
        entities = [mig_entity(s["label"], s["bbox"], f"{where}, instance {i}") for i, s in enumerate(segments)]
        items.append((str(key), str(caption), entities))
    return items


def read_cocomig(path: str | Path) -> list[BenchLayout]:
    """COCO-MIG layouts from ``mig_bench_anno.yaml`` (or the folder holding it, with ``mig_bench.txt`` for the
    order) or from the evaluation's JSON file."""
    path = Path(path)
    if path.is_dir():
        path = path / MIG_ANNOTATION
    if not path.exists():
        raise FileNotFoundError(f"COCO-MIG data not found: {path} (MIG-Bench's {MIG_ANNOTATION})")
    items = _mig_from_json(path) if path.suffix == ".json" else _mig_from_yaml(path)
    layouts = []
    for index, (key, prompt, entities) in enumerate(items):
        if not entities:
            raise ValueError(f"{path}: prompt {index} ({prompt[:40]!r}) has no instances")
        layouts.append(BenchLayout(index=index, key=key, prompt=prompt, entities=tuple(entities)))
    return layouts


def read_indices(path: str | Path) -> list[int]:
    """A subset of layouts by their index in the benchmark's file: a JSON list of integers, a JSON list of objects
    with ``"index"`` (the form ContextGen's LayoutSAM-Eval pack lists its subset in) or one integer per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--indices file not found: {path}")
    text = read_utf8(path, "layout indices")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of layout indices (JSON, or one integer per line)")
    out = []
    for number, item in enumerate(data):
        value = item.get("index") if isinstance(item, dict) else item
        try:
            index = int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: entry {number} ({item!r}) is not a layout index") from None
        if index < 0 or (isinstance(value, float) and value != index):
            raise ValueError(f"{path}: entry {number} ({item!r}) is not a layout index")
        out.append(index)
    if not out:
        raise ValueError(f"{path}: no layout index in it")
    return sorted(set(out))


def _annotation(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: 'annotation' is not the text of a Python dict") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: 'annotation' must be a dict, got {type(value).__name__}")
    for name, kind in (("caption", str), ("annotations", dict), ("relations", dict), ("valid_overlap", list)):
        if not isinstance(value.get(name), kind):
            raise ValueError(f"{where}: the annotation's {name!r} must be a {kind.__name__} (OverLayBench's format)")
    return value


def overlaybench_layout(index: int, row: dict[str, Any], where: str) -> BenchLayout:
    """One OverLayBench row (``image_id``, ``annotation``) as a layout; errors name the row and the field."""
    if row.get("image_id") is None or row.get("annotation") is None:
        raise ValueError(f"{where}: missing field(s) image_id / annotation (OverLayBench's evaluation rows)")
    annotation = _annotation(row["annotation"], where)
    entities = []
    for name, instance in annotation["annotations"].items():
        if not isinstance(instance, dict) or "bbox" not in instance or "category" not in instance:
            raise ValueError(f"{where}: instance {name!r} needs 'category' and 'bbox'")
        prompt = next((str(instance[k]) for k in OVERLAYBENCH_PROMPT_KEYS if instance.get(k)),
                      str(instance["category"]))
        box = [float(v) / OVERLAYBENCH_CANVAS for v in instance["bbox"]]
        entities.append(BenchEntity(prompt=prompt, box=check_normalised(box, f"{where}, instance {name!r}"),
                                    name=str(name), category=str(instance["category"])))
    if not entities:
        raise ValueError(f"{where}: no instances")
    return BenchLayout(index=index, key=str(row["image_id"]), prompt=annotation["caption"], entities=tuple(entities),
                       annotation=annotation)


def read_overlaybench(path: str | Path, split: str) -> list[BenchLayout]:
    """One split of OverLayBench from a local copy of its evaluation dataset (the folder: every ``*.parquet`` below
    it whose name starts with the split, in name order), one parquet file or a ``.jsonl`` of rows."""
    if split not in OVERLAYBENCH_SPLITS:
        raise ValueError(f"unknown OverLayBench split {split!r}; choose one of {', '.join(OVERLAYBENCH_SPLITS)}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"OverLayBench data not found: {path}")
    if path.is_dir():
        files = [f for f in sorted(path.rglob("*.parquet")) if f.name.startswith(split)]
        if not files:
            raise ValueError(f"{path}: no {split}-*.parquet inside; give the folder of OverLayBench's evaluation set")
        rows = _parquet_rows(files, ("image_id", "annotation"))
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in read_utf8(path, "OverLayBench rows").splitlines() if line.strip()]
        rows = [r for r in rows if r.get("split", split) == split]
    else:
        rows = _parquet_rows([path], ("image_id", "annotation"))
    return [overlaybench_layout(i, row, f"OverLayBench {split} row {i}") for i, row in enumerate(rows)]

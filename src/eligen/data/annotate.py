"""Annotate a folder of images with a grounding vision-language model into an EliGen training set.

Layout of a dataset folder::

    folder/images/*.png|jpg|jpeg|webp     the images (sorted by file name)
    folder/annotations/{stem}.json        one trainer record per annotated image, plus the raw answer
    folder/annotations/{stem}.failed.json why an image could not be annotated (after all retries)
    folder/annotations.jsonl              every annotation, rebuilt after each run (the trainer's data file)
    folder/annotations_sheet.png          a contact sheet of the first annotated images with their boxes

The work is resumable and shardable: an image with a ``{stem}.json`` is done and never asked again, so a killed
run simply restarts, and ``shard="i/n"`` processes annotate disjoint parts of the same folder. The JSONL file is
always rebuilt from all per-image files, sorted by stem, so any order of shards and reruns gives the same file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ..config import option
from ..entities import box_to_mask
from ..files import atomic_path, open_image, write_text_atomic
from ..overlay import image_grid, render_overlay
from ..scale.options import EngineOptions
from . import vlm
from .parse import (
    ANNOTATE_INSTRUCTIONS,
    ANNOTATE_INSTRUCTIONS_QWEN2,
    CONVENTIONS,
    Annotation,
    ParseError,
    parse_annotation,
)
from .shards import parse_shard
from .vlm import VLMBackend, VLMError, check_base_url

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VLM_KINDS = ("openai", "transformers")
ANSWER_EXCERPT_CHARS = 500
SHEET_TILE_SIDE = 512
RETRY_BACKOFF_S = 0.5  # wait before retrying after a transport error (times the attempt number)
# The image a Qwen-VL processor would see: sides are multiples of 28 and the area lies in [min, max] pixels.
# We send exactly that image, so Qwen2.5-VL's absolute pixel boxes refer to a known size (``model_size``).
PATCH_FACTOR = 28
MIN_PIXELS = 56 * 56
MAX_PIXELS = 1280 * 28 * 28

ANNOTATIONS_DIR = "annotations"
JSONL_NAME = "annotations.jsonl"
SHEET_NAME = "annotations_sheet.png"


@dataclass
class AnnotateConfig(EngineOptions):
    """Options of ``eligen annotate``: which folder, which model, how to retry, which shard, which engine."""

    folder: Path = option(None, "dataset folder; images are read from FOLDER/images", positional=True, required=True)
    vlm: str = option("openai", "vision-language model backend", choices=VLM_KINDS)
    model: str | None = option(None, "model name on the server (openai), or a local path / hub id (transformers)")
    base_url: str | None = option(None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang)")
    vlm_url: list[str] = option([], "an endpoint of a pool of OpenAI-compatible servers (repeat; with --base-url "
                                "too if given): requests go round-robin, a failing server's request goes to the "
                                "next", repeat=True, metavar="URL")
    api_key_env: str = option("OPENAI_API_KEY", "name of the environment variable holding the API key")
    convention: str = option("auto", "how the model writes boxes: qwen2 (0-1000 grid tags), qwen25 (pixel JSON)",
                             choices=CONVENTIONS)
    max_entities: int = option(8, "most entities kept per image")
    retries: int = dataclasses.field(default=2, kw_only=True, metadata={  # keyword-only, as EngineOptions' is
        "help": "extra attempts after a malformed answer or a request error (with --engine ray also of an image whose "
                "work raises, and restarts of an actor that dies)", "metavar": "K"})
    timeout: float = option(60.0, "seconds one request may take in all: connecting, the headers and the whole "
                            "answer (openai)")
    concurrency: int = option(4, "parallel requests (openai; transformers always uses 1)")
    shard: str = option("0/1", "annotate only images whose index is I mod N", metavar="I/N")
    retry_failed: bool = option(False, "ask again for images that failed in an earlier run")
    sheet: int = option(16, "images on the contact sheet (0: no sheet)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        EngineOptions.__post_init__(self)
        if self.folder is None or str(self.folder) == "":
            raise ValueError("the dataset folder is required")
        self.folder = Path(self.folder)
        if self.vlm not in VLM_KINDS:
            raise ValueError(f"vlm must be one of {', '.join(VLM_KINDS)}, got {self.vlm!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {self.convention!r}")
        _check_at_least("max_entities", self.max_entities, 1)
        _check_at_least("retries", self.retries, 0)
        _check_at_least("concurrency", self.concurrency, 1)
        _check_at_least("sheet", self.sheet, 0)
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not self.api_key_env:
            raise ValueError("api_key_env must name an environment variable")
        parse_shard(self.shard)
        for url in self.urls:
            check_base_url(url)

    @property
    def urls(self) -> list[str]:
        """Every OpenAI-compatible endpoint given: ``--base-url`` then each ``--vlm-url``."""
        return ([self.base_url] if self.base_url else []) + list(self.vlm_url)

    @property
    def shard_index(self) -> tuple[int, int]:
        """``(i, n)`` of :attr:`shard`."""
        return parse_shard(self.shard)


def _check_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class AnnotateResult:
    """What one :func:`annotate` run did: newly annotated, newly failed, and skipped images of its shard."""

    done: int
    failed: int
    skipped: int
    jsonl: Path
    sheet: Path | None
    left_out: int = 0  # annotation files not usable (not JSON, not an annotation, image gone), named in warnings
    errors: list[tuple[str, str]] = field(default_factory=list)  # (image, reason) whose work raised (--engine ray)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """The images of ``folder/images``, sorted by file name; ValueError if two share a stem."""
    images_dir = Path(folder) / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"no images folder: {images_dir}")
    images = sorted((p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                    key=lambda p: p.name)
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen:
            raise ValueError(f"two images share the stem {path.stem!r}: {seen[path.stem].name} and {path.name}")
        seen[path.stem] = path
    return images


def shard_images(images: list[Path], shard: str) -> list[Path]:
    """The images whose index in ``images`` is congruent to ``i`` mod ``n``."""
    index, count = parse_shard(shard)
    return images[index::count]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def _excerpt(text: str | None) -> str | None:
    if text is None or len(text) <= ANSWER_EXCERPT_CHARS:
        return text
    return text[:ANSWER_EXCERPT_CHARS] + "..."


# ----------------------------------------------------------------------------------------------------------
# Asking the model
# ----------------------------------------------------------------------------------------------------------


def model_view_size(width: int, height: int, factor: int = PATCH_FACTOR, min_pixels: int = MIN_PIXELS,
                    max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of the image a Qwen-VL processor makes of ``width x height`` (its ``smart_resize``)."""
    w_bar = max(factor, round(width / factor) * factor)
    h_bar = max(factor, round(height / factor) * factor)
    if w_bar * h_bar > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
    elif w_bar * h_bar < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w_bar = math.ceil(width * beta / factor) * factor
        h_bar = math.ceil(height * beta / factor) * factor
    return w_bar, h_bar


@dataclass
class _Outcome:
    """The result of annotating one image: an annotation, or the reason it failed."""

    path: Path
    attempts: int
    annotation: Annotation | None = None
    answer: str | None = None
    reason: str | None = None
    size: tuple[int, int] = (0, 0)


def _instructions(convention: str, max_entities: int) -> str:
    template = ANNOTATE_INSTRUCTIONS_QWEN2 if convention == "qwen2" else ANNOTATE_INSTRUCTIONS
    return template.format(max_entities=max_entities)


def _annotate_one(backend: VLMBackend, path: Path, convention: str, max_entities: int, retries: int) -> _Outcome:
    """Ask ``backend`` about one image, up to ``1 + retries`` times, until its answer parses."""
    try:
        image = open_image(path).convert("RGB")
    except (OSError, ValueError) as exc:
        return _Outcome(path, 0, reason=f"cannot read the image: {exc}")
    width, height = image.size
    model_size = model_view_size(width, height)
    view = image if model_size == image.size else image.resize(model_size, Image.Resampling.BICUBIC)
    prompt = _instructions(convention, max_entities)
    answer, reason = None, None
    for attempt in range(1, retries + 2):
        try:
            answer = backend.ask(prompt, view)
        except VLMError as exc:
            reason = f"request failed: {exc}"
            if attempt <= retries and RETRY_BACKOFF_S > 0:
                time.sleep(RETRY_BACKOFF_S * attempt)
            continue
        try:
            annotation = parse_annotation(answer, width, height, convention, max_entities=max_entities,
                                          model_size=model_size)
        except ParseError as exc:
            reason = f"unusable answer: {exc}"
            continue
        return _Outcome(path, attempt, annotation=annotation, answer=answer, size=(width, height))
    return _Outcome(path, retries + 1, answer=answer, reason=reason, size=(width, height))


def _save_outcome(folder: Path, outcome: _Outcome) -> bool:
    """Write ``{stem}.json`` (removing an old ``.failed.json``) or ``{stem}.failed.json``; True on success."""
    out_dir = folder / ANNOTATIONS_DIR
    stem = outcome.path.stem
    image = outcome.path.relative_to(folder).as_posix()
    if outcome.annotation is not None:
        record = outcome.annotation.to_record(image)
        _write_json(out_dir / f"{stem}.json", {**record, "width": outcome.size[0], "height": outcome.size[1],
                                                "attempts": outcome.attempts, "raw": outcome.answer})
        (out_dir / f"{stem}.failed.json").unlink(missing_ok=True)
        return True
    _write_json(out_dir / f"{stem}.failed.json", {"image": image, "reason": outcome.reason,
                                                   "answer": _excerpt(outcome.answer), "attempts": outcome.attempts})
    logger.warning("could not annotate %s after %d attempt(s): %s", image, outcome.attempts, outcome.reason)
    return False


def _annotate_and_save(backend: VLMBackend, config: AnnotateConfig, path: Path, convention: str) -> bool:
    """Annotate one image and write its file at once (so a killed run loses no finished answer); True if done."""
    outcome = _annotate_one(backend, path, convention, config.max_entities, config.retries)
    return _save_outcome(config.folder, outcome)


def make_backend(config: AnnotateConfig) -> VLMBackend:
    """The backend ``config`` names; ValueError if its model or endpoint is missing."""
    return vlm.make_backend(config.vlm, config.model, config.urls or None, config.api_key_env, config.timeout,
                            config.convention)


# ----------------------------------------------------------------------------------------------------------
# The JSONL file and the contact sheet
# ----------------------------------------------------------------------------------------------------------


def _annotation_files(folder: Path) -> list[Path]:
    """Every ``annotations/{stem}.json`` (not ``.failed.json``), sorted by stem."""
    out_dir = folder / ANNOTATIONS_DIR
    if not out_dir.is_dir():
        return []
    files = [p for p in out_dir.glob("*.json") if not p.name.endswith(".failed.json") and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.stem)


def read_annotation(path: Path, folder: Path) -> dict[str, Any] | str:
    """The trainer record ``{"image", "prompt", "entities"}`` of one ``annotations/{stem}.json``, or why it cannot
    be used (not JSON, not an annotation, its image gone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"not readable as JSON ({exc})"
    if not (isinstance(data, dict) and isinstance(data.get("image"), str) and isinstance(data.get("prompt"), str)
            and isinstance(data.get("entities"), list)):
        return "not an annotation (a JSON object with \"image\", \"prompt\" and \"entities\")"
    if not (Path(folder) / data["image"]).is_file():
        return f"its image {data['image']} is gone"
    return {"image": data["image"], "prompt": data["prompt"], "entities": data["entities"]}


def load_annotation_records(folder: Path) -> tuple[list[dict[str, Any]], int]:
    """The trainer records of all usable annotation files, sorted by stem, and how many were left out (each named
    in a warning)."""
    records, left_out = [], 0
    for path in _annotation_files(Path(folder)):
        record = read_annotation(path, Path(folder))
        if isinstance(record, str):
            logger.warning("left out of %s: %s: %s", JSONL_NAME, path, record)
            left_out += 1
        else:
            records.append(record)
    return records, left_out


def write_jsonl(folder: Path, records: Iterable[dict[str, Any]]) -> Path:
    """``folder/annotations.jsonl``, one record a line (image paths relative to ``folder``), written atomically."""
    path = Path(folder) / JSONL_NAME
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def contact_sheet(folder: Path, records: list[dict[str, Any]], count: int) -> Path | None:
    """``folder/annotations_sheet.png``: the first ``count`` records drawn with their boxes; None if none."""
    tiles: list[Image.Image] = []
    for record in records:
        if len(tiles) == count:
            break
        try:
            image = open_image(Path(folder) / record["image"]).convert("RGB")
        except (OSError, ValueError) as exc:  # truncated or replaced since it was annotated: not drawn
            logger.warning("not on the contact sheet: %s (%s)", record["image"], exc)
            continue
        masks = [box_to_mask(e["box"], image.width, image.height) for e in record["entities"]]
        tile = render_overlay(image, masks, [e["prompt"] for e in record["entities"]])
        tile.thumbnail((SHEET_TILE_SIDE, SHEET_TILE_SIDE))
        tiles.append(tile)
    if not tiles:
        return None
    path = Path(folder) / SHEET_NAME
    with atomic_path(path) as tmp:
        image_grid(tiles).save(tmp, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def pending_images(config: AnnotateConfig) -> tuple[list[Path], int]:
    """The images of this shard still to annotate, and how many of the shard are skipped (done or failed)."""
    out_dir = config.folder / ANNOTATIONS_DIR
    todo, skipped = [], 0
    for path in shard_images(list_images(config.folder), config.shard):
        done = (out_dir / f"{path.stem}.json").exists()
        if done and isinstance(read_annotation(out_dir / f"{path.stem}.json", config.folder), str):
            done = False  # a damaged annotation is asked again (and overwritten)
        failed = (out_dir / f"{path.stem}.failed.json").exists()
        if done or (failed and not config.retry_failed):
            skipped += 1
        else:
            todo.append(path)
    return todo, skipped


def _run(backend: VLMBackend, config: AnnotateConfig, todo: list[Path], convention: str) -> tuple[int, int]:
    """Annotate ``todo`` in parallel, saving each result as it completes; ``(done, failed)``."""
    workers = 1 if config.vlm == "transformers" else config.concurrency
    done = failed = 0
    bar = tqdm(total=len(todo), desc="annotate", unit="img", disable=not config.progress)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="annotate")
    try:
        futures: list[Future[bool]] = [executor.submit(_annotate_and_save, backend, config, path, convention)
                                       for path in todo]
        for future in as_completed(futures):
            if future.result():
                done += 1
            else:
                failed += 1
            bar.update(1)
            bar.set_postfix(done=done, failed=failed)
    finally:  # on an error or Ctrl-C, drop what has not started; finished images are already on disk
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return done, failed


def _convention(backend: VLMBackend, config: AnnotateConfig) -> str:
    """``config.convention``, or the backend's own when that is ``auto``."""
    convention = config.convention
    if convention == "auto":
        convention = getattr(backend, "convention", "auto") or "auto"
    if convention not in CONVENTIONS:
        raise ValueError(f"backend convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    return convention


def _replica(config: AnnotateConfig, backend: VLMBackend | None):
    """A Ray actor's worker: the backend made once (a local VLM loaded once), then :func:`_annotate_and_save` on
    each image of a group, ``--concurrency`` at a time, as the local loop calls it."""
    backend = backend if backend is not None else make_backend(config)
    convention = _convention(backend, config)
    pool = ThreadPoolExecutor(max_workers=1 if config.vlm == "transformers" else config.concurrency,
                              thread_name_prefix="annotate")
    return lambda items: list(pool.map(lambda item: _annotate_and_save(backend, config, Path(item["path"]),
                                                                       convention), items))


def _run_ray(config: AnnotateConfig, todo: list[Path], backend: VLMBackend | None) -> tuple[int, int, list]:
    """``todo`` on Ray actors: ``(done, failed, [(image, reason)] of images whose work raised)``."""
    from functools import partial

    from ..scale.ray_engine import run_items

    items = [{"key": path.name, "path": str(path)} for path in todo]
    run = run_items(items, partial(_replica, config, backend), config,
                    device=None if config.vlm == "transformers" else "cpu", desc="annotate",
                    progress=config.progress, group=1 if config.vlm == "transformers" else config.concurrency)
    done = sum(1 for ok in run.results.values() if ok)
    return done, len(run.results) - done + len(run.failed), run.failed


def annotate(config: AnnotateConfig, backend: VLMBackend | None = None) -> AnnotateResult:
    """Annotate the pending images of ``config.shard``, then rebuild ``annotations.jsonl`` and the contact sheet.

    ``backend`` defaults to :func:`make_backend`. The convention is ``config.convention`` unless that is ``auto``,
    in which case the backend's own ``convention`` is used. ``--engine ray`` annotates on Ray actors, each with its
    own backend (``backend``, when given, is copied to each).
    """
    todo, skipped = pending_images(config)
    done = failed = 0
    errors: list[tuple[str, str]] = []
    if todo and config.engine == "ray":
        done, failed, errors = _run_ray(config, todo, backend)
    elif todo:
        backend = backend if backend is not None else make_backend(config)
        done, failed = _run(backend, config, todo, _convention(backend, config))
    records, left_out = load_annotation_records(config.folder)
    jsonl = write_jsonl(config.folder, records)
    sheet = contact_sheet(config.folder, records, config.sheet) if config.sheet else None
    logger.info("annotated %d, failed %d, skipped %d; %d records in %s", done, failed, skipped, len(records), jsonl)
    return AnnotateResult(done=done, failed=failed, skipped=skipped, jsonl=jsonl, sheet=sheet, left_out=left_out,
                          errors=errors)

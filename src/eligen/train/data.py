"""Training data for EliGen LoRAs: record files, up-front validation, aspect-ratio buckets and batching.

Two record formats are read (docs/design.md section 6), detected from the content:

- ours, JSONL: one object per line ``{"image": "rel/path.png", "prompt": "...", "entities": [{"prompt": "...",
  "box": [x0, y0, x1, y1]} | {"prompt": "...", "mask": "rel/mask.png"}]}``;
- the reference ``metadata.json``: a JSON list of ``{"image", "prompt", "eligen_entity_prompts": [...],
  "eligen_entity_masks": [mask png paths]}``.

Either may carry ``"input_image": "rel/before.png"``: an edit record (docs/design.md section 21), ``image`` the
edited image (the target), ``input_image`` the image before the edit, of the same size, ``prompt`` the instruction.
An edit model trains on edit records only, any other model on none (:class:`EntityDataset` ``edit``).

Paths are relative to the data file. Boxes are pixel corners of the original image, rasterised with the
pixel-centre rule of :func:`eligen.entities.box_to_mask`.

Geometry: each image gets a bucket ``(height, width)``; it is scaled (aspect kept) so that it *covers* the bucket,
then centre-cropped to it (:class:`CoverCrop`). Masks go through the same transform with the exact pixel-centre
nearest-neighbour rule and boxes are transformed analytically and rasterised at the bucket size, so an integer
box and the PNG mask of the same rectangle give identical entity masks, aligned pixel for pixel with the image.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..entities import LayoutError, binarize_mask, box_problem, box_to_mask, load_mask_image
from ..files import MAX_IMAGE_PIXELS, read_utf8

logger = logging.getLogger(__name__)

Bucket = tuple[int, int]  # (height, width) in pixels

# Reasons a record is skipped (the keys of DatasetStats.reasons).
MALFORMED_JSON = "malformed JSON line"
NOT_AN_OBJECT = "record is not a JSON object"
MISSING_IMAGE_FIELD = "missing or invalid 'image' field"
INVALID_INPUT_IMAGE_FIELD = "invalid 'input_image' field"
INPUT_SIZE_MISMATCH = "input image of another size than the image"
MISSING_PROMPT_FIELD = "missing or invalid 'prompt' field"
MALFORMED_ENTITY = "malformed entity"
LENGTH_MISMATCH = "entity prompts/masks length mismatch"
MALFORMED_BOX = "malformed box"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
MISSING_MASK = "missing mask"
UNREADABLE_MASK = "unreadable mask"
WRONG_MASK_SIZE = "mask of the wrong size"
BOX_OUTSIDE = "box outside the image"
DEGENERATE_BOX = "degenerate box"
EMPTY_ENTITY_PROMPT = "empty entity prompt"

DEFAULT_RATIOS = (1 / 2, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 2)


# ----------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One parsed, not yet loaded, training example.

    ``entities`` holds ``(entity prompt, {"box": [x0, y0, x1, y1]})`` or ``(entity prompt, {"mask": Path})`` in the
    original image's pixel coordinates; ``input_image`` is the image before the edit of an edit record, else None.
    A structurally malformed record keeps ``error`` (one of the reason strings above), ``detail`` (what exactly) and
    ``source`` (``"line 3"`` / ``"record 3"``) so that :class:`EntityDataset` can count it instead of crashing.
    """

    image: Path
    prompt: str
    entities: list[tuple[str, dict]] = field(default_factory=list)
    error: str | None = None
    detail: str = ""
    source: str = ""
    input_image: Path | None = None


@dataclass
class DatasetStats:
    """How many records a data file held, how many were skipped, and why (reason -> count, most frequent first)."""

    total: int
    bad: int
    reasons: dict[str, int]


class _RecordError(Exception):
    """A record is unusable: ``reason`` is the category that is counted, ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _resolve(value: str, base: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def _parse_box(value: Any) -> list[float]:
    """``[x0, y0, x1, y1]`` as four finite floats, else a malformed-box error (the layout rule, :func:`box_problem`;
    degenerate and outside boxes are counted when the image size is known)."""
    problem = box_problem(value)
    if problem is not None and problem[0] == "malformed":
        raise _RecordError(MALFORMED_BOX, problem[1])
    return [float(v) for v in value]


def _parse_mask_path(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise _RecordError(MALFORMED_ENTITY, f"a mask is a PNG path relative to the data file, got {value!r}")
    return _resolve(value, base)


def _parse_entity(data: Any, index: int, base: Path) -> tuple[str, dict]:
    """One entity of our format: a prompt and exactly one of ``box`` / ``mask``."""
    if not isinstance(data, dict):
        raise _RecordError(MALFORMED_ENTITY, f"entity {index} is not an object: {data!r}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise _RecordError(MALFORMED_ENTITY, f"entity {index} has no string 'prompt'")
    present = [key for key in ("box", "mask") if data.get(key) is not None]
    if len(present) != 1:
        raise _RecordError(MALFORMED_ENTITY, f"entity {index} needs exactly one of 'box' or 'mask', "
                                             f"found {present or 'none'}")
    if present[0] == "box":
        return prompt, {"box": _parse_box(data["box"])}
    return prompt, {"mask": _parse_mask_path(data["mask"], base)}


def _parse_common(data: Any, base: Path) -> tuple[Path, str]:
    if not isinstance(data, dict):
        raise _RecordError(NOT_AN_OBJECT, f"got {type(data).__name__}")
    image, prompt = data.get("image"), data.get("prompt")
    if not isinstance(image, str) or not image:
        raise _RecordError(MISSING_IMAGE_FIELD, f"'image' must be a path string, got {image!r}")
    if not isinstance(prompt, str):
        raise _RecordError(MISSING_PROMPT_FIELD, f"'prompt' must be a string, got {prompt!r}")
    return _resolve(image, base), prompt


def _parse_ours(data: dict, image: Path, prompt: str, base: Path) -> Record:
    entities = data.get("entities") or []
    if not isinstance(entities, list):
        raise _RecordError(MALFORMED_ENTITY, f"'entities' must be a list, got {type(entities).__name__}")
    return Record(image, prompt, [_parse_entity(e, i, base) for i, e in enumerate(entities)])


def _parse_reference(data: dict, image: Path, prompt: str, base: Path) -> Record:
    prompts = data.get("eligen_entity_prompts") or []
    masks = data.get("eligen_entity_masks") or []
    if not isinstance(prompts, list) or not isinstance(masks, list):
        raise _RecordError(MALFORMED_ENTITY, "'eligen_entity_prompts' and 'eligen_entity_masks' must be lists")
    if len(prompts) != len(masks):
        raise _RecordError(LENGTH_MISMATCH, f"{len(prompts)} entity prompts but {len(masks)} masks")
    entities = []
    for i, (entity_prompt, mask) in enumerate(zip(prompts, masks, strict=True)):
        if not isinstance(entity_prompt, str):
            raise _RecordError(MALFORMED_ENTITY, f"entity prompt {i} is not a string: {entity_prompt!r}")
        entities.append((entity_prompt, {"mask": _parse_mask_path(mask, base)}))
    return Record(image, prompt, entities)


def _parse_input_image(value: Any, base: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _RecordError(INVALID_INPUT_IMAGE_FIELD, f"'input_image' must be a path string, got {value!r}")
    return _resolve(value, base)


def _parse_record(data: Any, base: Path, source: str) -> Record:
    """Either format, chosen per record: an ``entities`` key means ours, otherwise the reference keys."""
    try:
        image, prompt = _parse_common(data, base)
        if "entities" in data:
            record = _parse_ours(data, image, prompt, base)
        else:
            record = _parse_reference(data, image, prompt, base)
        record.input_image = _parse_input_image(data.get("input_image"), base)
    except _RecordError as exc:
        raw_image = data.get("image") if isinstance(data, dict) else None
        path = _resolve(raw_image, base) if isinstance(raw_image, str) and raw_image else Path()
        return Record(path, "", [], error=exc.reason, detail=exc.detail, source=source)
    record.source = source
    return record


def _parse_lines(text: str, base: Path) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(Record(Path(), "", [], error=MALFORMED_JSON, detail=str(exc), source=source))
            continue
        records.append(_parse_record(data, base, source))
    return records


def load_records(path: str | Path) -> list[Record]:
    """Parse a data file (our JSONL or the reference ``metadata.json``) into records; nothing is opened yet.

    A ``.jsonl`` file is read line by line (blank lines skipped). Any other file is parsed as one JSON
    document when it can be: a list is the reference format (records with an ``entities`` key are read as ours),
    a single object is one record; otherwise it is read as JSONL. Structurally malformed lines or records come
    back as records with ``error`` set, so one bad line never stops the others.
    """
    path = Path(path)
    try:
        text = read_utf8(path, "training data file")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"training data file not found: {path}") from exc
    except OSError as exc:
        raise ValueError(f"cannot read training data file {path}: {exc}") from exc
    base = path.parent
    if path.suffix.lower() == ".jsonl":
        return _parse_lines(text, base)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            raise ValueError(f"{path} is not valid JSON ({exc}); a metadata.json file is one JSON list") from exc
        return _parse_lines(text, base)
    if isinstance(data, list):
        return [_parse_record(item, base, f"record {i + 1}") for i, item in enumerate(data)]
    return [_parse_record(data, base, "record 1")]


# ----------------------------------------------------------------------------------------------------------
# Buckets and the cover-and-crop transform
# ----------------------------------------------------------------------------------------------------------


def _round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def bucket_sizes(resolution: int, multiple: int = 64, ratios: Sequence[float] = DEFAULT_RATIOS) -> list[Bucket]:
    """``(height, width)`` buckets of area close to ``resolution**2``, one per aspect ratio ``width / height``.

    Each side is ``resolution * sqrt(ratio)`` (width) or ``resolution / sqrt(ratio)`` (height) rounded to the
    nearest multiple of ``multiple`` (at least one multiple). Duplicates are removed; the list is sorted.
    """
    if resolution <= 0 or multiple <= 0:
        raise ValueError(f"resolution and multiple must be positive, got {resolution} and {multiple}")
    if not ratios or any(not (r > 0 and math.isfinite(r)) for r in ratios):
        raise ValueError(f"aspect ratios must be positive numbers, got {ratios!r}")
    sizes = {(_round_to_multiple(resolution / math.sqrt(r), multiple),
              _round_to_multiple(resolution * math.sqrt(r), multiple)) for r in ratios}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to ``width / height`` (in log ratio; ties: the first)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - target))


@dataclass(frozen=True)
class CoverCrop:
    """Scale a ``width x height`` image to ``scaled_width x scaled_height`` (covering the bucket, aspect kept up
    to rounding), then crop the bucket ``(height, width)`` at ``(left, top)``.

    Output pixel ``(i, j)`` (row, column) has its centre at scaled coordinates ``(top + i + 0.5, left + j + 0.5)``,
    i.e. at original coordinates ``((top + i + 0.5) * height / scaled_height, (left + j + 0.5) * width /
    scaled_width)``; images, masks and boxes all follow this one map.
    """

    width: int
    height: int
    scaled_width: int
    scaled_height: int
    left: int
    top: int
    bucket: Bucket

    @classmethod
    def fit(cls, width: int, height: int, bucket: Bucket) -> CoverCrop:
        """The smallest aspect-preserving scale that covers ``bucket``, centred."""
        out_h, out_w = bucket
        scale = max(out_h / height, out_w / width)
        scaled_w = max(out_w, math.floor(width * scale + 0.5))
        scaled_h = max(out_h, math.floor(height * scale + 0.5))
        return cls(width, height, scaled_w, scaled_h, (scaled_w - out_w) // 2, (scaled_h - out_h) // 2, bucket)

    def image(self, image: Image.Image) -> Image.Image:
        """RGB image of size ``bucket`` (bicubic, antialiased when shrinking)."""
        if image.size != (self.width, self.height):
            raise ValueError(f"image is {image.size[0]}x{image.size[1]}, expected {self.width}x{self.height}")
        out_h, out_w = self.bucket
        scaled = image.convert("RGB").resize((self.scaled_width, self.scaled_height), Image.Resampling.BICUBIC)
        return scaled.crop((self.left, self.top, self.left + out_w, self.top + out_h))

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """``(height, width)`` bool -> ``(*bucket)`` bool, nearest neighbour with the exact pixel-centre rule:
        output row ``i`` reads source row ``floor((top + i + 0.5) * height / scaled_height)`` (integer arithmetic;
        PIL's NEAREST can differ on exact ties).
        """
        if mask.shape != (self.height, self.width):
            raise ValueError(f"mask has shape {mask.shape}, expected {(self.height, self.width)}")
        out_h, out_w = self.bucket
        rows = ((2 * (np.arange(out_h) + self.top) + 1) * self.height) // (2 * self.scaled_height)
        cols = ((2 * (np.arange(out_w) + self.left) + 1) * self.width) // (2 * self.scaled_width)
        return np.ascontiguousarray(mask[rows[:, None], cols[None, :]])

    def box(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """Box corners ``(x0, y0, x1, y1)`` in original pixels -> corners in output pixels (may leave the image)."""
        sx, sy = self.scaled_width / self.width, self.scaled_height / self.height
        x0, y0, x1, y1 = (float(v) for v in box)
        return (x0 * sx - self.left, y0 * sy - self.top, x1 * sx - self.left, y1 * sy - self.top)

    def box_mask(self, box: Sequence[float]) -> np.ndarray:
        """The transformed box rasterised at the bucket size with :func:`box_to_mask`: ``(*bucket)`` bool."""
        out_h, out_w = self.bucket
        return box_to_mask(self.box(box), out_w, out_h)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image that decodes to its end: a file truncated after a valid header (which would
    stop training in the loader) is a bad record. JPEGs decode at 1/8 scale (the whole stream, a fraction of the
    time)."""
    try:
        with Image.open(path) as image:
            size = image.size
            if size[0] * size[1] > MAX_IMAGE_PIXELS:
                raise ValueError(f"{size[0]}x{size[1]} is above the {MAX_IMAGE_PIXELS // 2**20} MP eligen decodes")
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
            return size
    except FileNotFoundError as exc:
        raise _RecordError(MISSING_IMAGE, f"image file not found: {path}") from exc
    except Exception as exc:
        raise _RecordError(UNREADABLE_IMAGE, f"{path} could not be read as an image ({exc})") from exc


def _check_box(box: Sequence[float], width: int, height: int) -> None:
    problem = box_problem(box, width, height)
    if problem is not None:
        raise _RecordError({"malformed": MALFORMED_BOX, "degenerate": DEGENERATE_BOX,
                            "outside": BOX_OUTSIDE}[problem[0]], problem[1])


def _check_mask(path: Path, width: int, height: int) -> None:
    if not path.exists():
        raise _RecordError(MISSING_MASK, f"mask file not found: {path}")
    try:
        image = load_mask_image(path)
        binarize_mask(image)
    except LayoutError as exc:
        raise _RecordError(UNREADABLE_MASK, str(exc)) from exc
    if image.size != (width, height):
        raise _RecordError(WRONG_MASK_SIZE, f"mask {path} is {image.size[0]}x{image.size[1]}, "
                                            f"the image is {width}x{height}")


def _validate_record(record: Record) -> tuple[int, int]:
    """Check that a record can be loaded; returns the image's ``(width, height)``, raises ``_RecordError``."""
    if record.error is not None:
        raise _RecordError(record.error, record.detail)
    width, height = _image_size(record.image)
    if record.input_image is not None and _image_size(record.input_image) != (width, height):
        input_width, input_height = _image_size(record.input_image)
        raise _RecordError(INPUT_SIZE_MISMATCH, f"input image {record.input_image} is {input_width}x{input_height}, "
                                                f"the image is {width}x{height}")
    for i, (prompt, spatial) in enumerate(record.entities):
        if not prompt.strip():
            raise _RecordError(EMPTY_ENTITY_PROMPT, f"entity {i} has an empty prompt")
        if "box" in spatial:
            _check_box(spatial["box"], width, height)
        else:
            _check_mask(spatial["mask"], width, height)
    return width, height


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------


def _top_reasons(reasons: dict[str, int], limit: int = 5) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in list(reasons.items())[:limit])


class EntityDataset(torch.utils.data.Dataset):
    """Validated, bucketed EliGen training examples.

    Every record is checked up front (image header, mask files and sizes, boxes, entity prompts); bad records are
    skipped and counted in :attr:`stats`. Item ``i`` is ``{"image": (3, H, W) float in [-1, 1], "prompt": str,
    "entity_prompts": list[str] (N), "entity_masks": (N, H, W) bool}`` with ``(H, W) = bucket_of(i)``, and for an
    edit record ``"input_image": (3, H, W) uint8``, the input under the same transform as the image.

    ``edit``: the data is for an edit model, so every record must be an edit record (``input_image``); otherwise
    none may be. A record that breaks this is an error naming it (the data and the model do not fit), not a skip.
    """

    def __init__(self, path: str | Path, resolution: int, multiple: int = 64, buckets: bool = True,
                 max_bad_fraction: float = 0.1, max_entities: int | None = None, edit: bool = False):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        if max_entities is not None and max_entities < 0:
            raise ValueError(f"max_entities must be >= 0 or None, got {max_entities}")
        if not buckets and (resolution <= 0 or resolution % multiple):
            raise ValueError(f"resolution {resolution} must be a positive multiple of {multiple}")
        self.path = Path(path)
        self.resolution, self.multiple = resolution, multiple
        self.available_buckets = bucket_sizes(resolution, multiple) if buckets else [(resolution, resolution)]
        self.records: list[Record] = []
        self.sizes: list[tuple[int, int]] = []  # (width, height) of each original image
        self.buckets: list[Bucket] = []
        self.bad_records: list[Record] = []  # with error, detail and source filled in
        self.edit = edit
        self._load(max_entities)
        self._check(max_bad_fraction)

    def _load(self, max_entities: int | None) -> None:
        records = load_records(self.path)
        reasons: Counter[str] = Counter()
        for record in records:
            if max_entities is not None:
                record = replace(record, entities=record.entities[:max_entities])
            self._check_kind(record)
            try:
                width, height = _validate_record(record)
            except _RecordError as exc:
                reasons[exc.reason] += 1
                self.bad_records.append(replace(record, error=exc.reason, detail=exc.detail))
                continue
            self.records.append(record)
            self.sizes.append((width, height))
            self.buckets.append(nearest_bucket(width, height, self.available_buckets))
        self.stats = DatasetStats(total=len(records), bad=sum(reasons.values()), reasons=dict(reasons.most_common()))

    def _check_kind(self, record: Record) -> None:
        """An edit model's data holds edit records only, any other model's none."""
        if record.error is not None or (record.input_image is not None) == self.edit:
            return
        if self.edit:
            raise ValueError(f"{self.path} {record.source}: no 'input_image'; an edit model learns from edit records: "
                             "give each record the image before the edit as 'input_image' beside 'image' (the edited "
                             "one), or train a model that is not an edit model")
        raise ValueError(f"{self.path} {record.source}: an edit record ('input_image'), but this model is not an edit "
                         "model; drop 'input_image', or train an edit model (eligen edit lists them)")

    def _check(self, max_bad_fraction: float) -> None:
        stats = self.stats
        examples = "; ".join(f"{r.source}: {r.error} ({r.detail})" for r in self.bad_records[:3])
        if stats.total == 0:
            raise ValueError(f"{self.path}: the training data file holds no records")
        if not self.records:
            raise ValueError(f"{self.path}: no usable training records: all {stats.total} are bad "
                             f"({_top_reasons(stats.reasons)}). First problems: {examples}")
        share = stats.bad / stats.total
        if share > max_bad_fraction:
            raise ValueError(f"{self.path}: {stats.bad} of {stats.total} records are bad ({share:.1%}, more than "
                             f"max_bad_fraction={max_bad_fraction:.1%}); top reasons: {_top_reasons(stats.reasons)}. "
                             f"First problems: {examples}")
        if stats.bad:
            logger.warning("%s: skipped %d of %d records (%s). First problems: %s", self.path, stats.bad,
                           stats.total, _top_reasons(stats.reasons), examples)

    def __len__(self) -> int:
        return len(self.records)

    def bucket_of(self, index: int) -> Bucket:
        """``(height, width)`` of item ``index`` after the transform."""
        return self.buckets[index]

    def transform_of(self, index: int) -> CoverCrop:
        """The cover-and-crop transform of item ``index``."""
        width, height = self.sizes[index]
        return CoverCrop.fit(width, height, self.buckets[index])

    def _entity_mask(self, spatial: dict, transform: CoverCrop) -> np.ndarray:
        if "box" in spatial:
            return transform.box_mask(spatial["box"])
        return transform.mask(binarize_mask(load_mask_image(spatial["mask"])))

    def __getitem__(self, index: int) -> dict:
        record, transform = self.records[index], self.transform_of(index)
        out_h, out_w = transform.bucket
        with Image.open(record.image) as image:
            pixels = np.asarray(transform.image(image), dtype=np.float32)  # (H, W, 3)
        image_tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous() / 127.5 - 1.0
        masks = [self._entity_mask(spatial, transform) for _, spatial in record.entities]
        entity_masks = (torch.from_numpy(np.stack(masks)) if masks
                        else torch.zeros((0, out_h, out_w), dtype=torch.bool))
        item = {"image": image_tensor, "prompt": record.prompt,
                "entity_prompts": [prompt for prompt, _ in record.entities], "entity_masks": entity_masks}
        if record.input_image is not None:
            with Image.open(record.input_image) as image:
                item["input_image"] = torch.from_numpy(np.array(transform.image(image))).permute(2, 0, 1).contiguous()
        return item


# ----------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices that share one bucket, shuffled deterministically per ``(seed, epoch)``.

    Epoch ``e``: a ``torch.Generator`` seeded with ``seed + e`` shuffles each bucket's indices (buckets in sorted
    order), cuts them into batches (the last short batch of a bucket is dropped when ``drop_last``) and shuffles
    the order of all batches. Process ``rank`` of ``world_size`` takes every ``world_size``-th batch of that
    global order starting at ``rank``; with ``drop_last`` the global list is first cut to a multiple of
    ``world_size`` so every process runs the same number of steps.

    Resume: :meth:`state_dict` is ``{"epoch", "position"}`` where ``position`` counts the batches this process
    has yielded in the epoch; after :meth:`load_state_dict` the next batch is the one that would have come next.
    Once an epoch is exhausted, the next iteration starts the following epoch (as does :meth:`set_epoch` with a
    new epoch). Note: a ``DataLoader`` with workers prefetches, so ``position`` may run ahead of the batches the
    training loop has consumed; a trainer that needs exactness stores its own consumed count as ``position``.
    """

    def __init__(self, dataset: EntityDataset, batch_size: int, seed: int = 0, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        groups: dict[tuple[int, ...], list[int]] = {}  # keyed by bucket
        for index in range(len(dataset)):
            groups.setdefault(tuple(dataset.bucket_of(index)), []).append(index)
        self._groups = [groups[bucket] for bucket in sorted(groups)]
        self.epoch, self.position = 0, 0
        self.shard(rank, world_size)

    def shard(self, rank: int, world_size: int) -> None:
        """Take every ``world_size``-th batch of the global order, starting at ``rank``."""
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        if len(self) == 0:
            sizes = sorted((len(g) for g in self._groups), reverse=True)
            raise ValueError(f"no batches for process {rank} of {world_size}: batch_size={self.batch_size}, "
                             f"drop_last={self.drop_last}, largest buckets hold {sizes[:5]} items; lower the batch "
                             "size or use fewer buckets")

    def _global_count(self) -> int:
        size = self.batch_size
        count = sum(len(g) // size if self.drop_last else -(-len(g) // size) for g in self._groups)
        return count - count % self.world_size if self.drop_last else count

    def __len__(self) -> int:
        """Batches this process yields in one full epoch."""
        return len(range(self.rank, self._global_count(), self.world_size))

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of ``epoch``, in order (pure: depends only on seed, epoch and sharding)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches: list[list[int]] = []
        for group in self._groups:
            shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        order = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in order][: self._global_count()]
        return batches[self.rank::self.world_size]

    def set_epoch(self, epoch: int) -> None:
        """Switch to ``epoch`` from its first batch; the current epoch keeps its position (resume-safe)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[list[int]]:
        if self.position >= len(self):  # the previous pass finished this epoch: go on with the next one
            self.epoch, self.position = self.epoch + 1, 0
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"sampler position {position} outside 0..{len(self)}; was the dataset, batch size or "
                             "number of processes changed?")
        self.epoch, self.position = int(state["epoch"]), position


def collate(samples: list[dict]) -> dict:
    """Stack samples of one bucket: ``{"images": (B, 3, H, W), "prompts": [B], "entity_prompts": B lists padded
    with "" to N_max, "entity_masks": (B, N_max, H, W) bool (padding all False, inert), "entity_counts": [B]}``,
    and for edit records ``"input_images": (B, 3, H, W) uint8``.
    """
    if not samples:
        raise ValueError("collate got an empty batch")
    sizes = sorted({tuple(s["image"].shape[-2:]) for s in samples})
    if len(sizes) != 1:
        raise ValueError(f"a batch mixes image sizes {sizes}; batch with BucketBatchSampler so that every batch "
                         "holds one bucket")
    height, width = sizes[0]
    counts = [len(s["entity_prompts"]) for s in samples]
    n_max = max(counts)
    masks = torch.zeros((len(samples), n_max, height, width), dtype=torch.bool)
    for i, sample in enumerate(samples):
        if tuple(sample["entity_masks"].shape) != (counts[i], height, width):
            raise ValueError(f"sample {i}: entity_masks has shape {tuple(sample['entity_masks'].shape)}, expected "
                             f"{(counts[i], height, width)}")
        masks[i, : counts[i]] = sample["entity_masks"]
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "prompts": [s["prompt"] for s in samples],
        "entity_prompts": [list(s["entity_prompts"]) + [""] * (n_max - len(s["entity_prompts"])) for s in samples],
        "entity_masks": masks,
        "entity_counts": counts,
        **({"input_images": torch.stack([s["input_image"] for s in samples])} if "input_image" in samples[0] else {}),
    }

"""What a benchmark run leaves behind: a JSON record (atomic), a markdown table, a contact sheet."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..entities import box_to_mask
from ..files import atomic_path, write_text_atomic
from ..overlay import image_grid, render_overlay

SHEET_TILE_SIDE = 512


def _finite(value: Any) -> Any:
    """NaN/inf -> None, so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, record: dict[str, Any], indent: int | None = 1) -> None:
    """``record`` as JSON at ``path``, written atomically (NaN written as null)."""
    write_text_atomic(path, json.dumps(_finite(record), indent=indent, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object written by :func:`write_json`, or None when missing or unreadable (it is then redone)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_sheet(tiles: Sequence[Image.Image], path: Path, columns: int | None = None) -> Path | None:
    """The tiles on one sheet at ``path`` (atomic PNG); None when there are none."""
    if not tiles:
        return None
    with atomic_path(path) as tmp:
        image_grid(tiles, columns=columns).save(tmp, format="PNG")
    return path


def box_tile(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str]) -> Image.Image:
    """``image`` with each pixel box tinted, outlined and labelled (e.g. with its verdict), at most 512 px."""
    masks = [box_to_mask(b, image.width, image.height) for b in boxes]
    tile = render_overlay(image, masks, list(labels))
    tile.thumbnail((SHEET_TILE_SIDE, SHEET_TILE_SIDE))
    return tile

"""Splitting work across processes: ``--shard I/N`` or accelerate/torchrun's ``RANK`` / ``WORLD_SIZE``."""

from __future__ import annotations

import os
import re


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ValueError(f"--shard {text!r}: the number of shards must be >= 1")
    if index >= count:
        raise ValueError(f"--shard {text!r}: the shard index must be below the number of shards ({count})")
    return index, count


def shard_from_env() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` as set by accelerate/torchrun when WORLD_SIZE > 1, else ``(0, 1)``."""
    world = os.environ.get("WORLD_SIZE", "").strip() or "1"
    if not world.isdigit():
        raise ValueError(f"WORLD_SIZE={world!r} is not a number")
    if int(world) <= 1:
        return 0, 1
    return parse_shard(f"{os.environ.get('RANK', '').strip() or '0'}/{world}")

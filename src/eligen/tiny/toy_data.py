"""A toy entity dataset (coloured rectangles on plain backgrounds) for tests, demos and throughput benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30)}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (245, 245, 245), "black": (20, 20, 20)}


def write_box_dataset(folder: str | Path, count: int, width: int = 64, height: int = 64, seed: int = 0,
                      max_objects: int = 3) -> Path:
    """Write ``count`` images with 1..max_objects rectangles and our JSONL (``data.jsonl``); returns its path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[:] = BACKGROUNDS[background]
        entities: list[dict[str, Any]] = []
        for _ in range(rng.integers(1, max_objects + 1)):
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            w, h = rng.integers(width // 4, width // 2 + 1), rng.integers(height // 4, height // 2 + 1)
            x, y = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            pixels[y:y + h, x:x + w] = COLOURS[colour]
            entities.append({"prompt": f"a {colour} square", "box": [int(x), int(y), int(x + w), int(y + h)]})
        name = f"images/{i:05d}.png"
        Image.fromarray(pixels).save(folder / name)
        things = " and ".join(e["prompt"] for e in entities)
        lines.append({"image": name, "prompt": f"{things} on a {background} background", "entities": entities})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path

"""Pictures people look at: entity masks outlined and labelled over the generated image (the pixels inside keep
their colours, so the colour the model drew can be judged)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .entities import resize_nearest

PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]
MIN_OVERLAY_SIDE = 512
OUTLINE = 2  # outline width in overlay pixels, inside the mask's edge


def entity_colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def _edges(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` 4-neighbour steps of its outside (or of the image border)."""
    inner = mask
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & inner
    return mask & ~inner


def render_overlay(image: Image.Image, masks: Sequence[np.ndarray], labels: Sequence[str]) -> Image.Image:
    """Outline each mask over ``image`` in its own colour and label it with its prompt; inside the outline the
    image is untouched (a tint would change the colours the model drew: blue would look teal).

    Small images are enlarged (NEAREST) so that the labels stay readable.
    """
    scale = max(1, MIN_OVERLAY_SIDE // max(image.size))
    width, height = image.width * scale, image.height * scale
    base = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.NEAREST)).astype(np.float32)
    resized = [resize_nearest(m, height, width) for m in masks]
    for i, mask in enumerate(resized):
        base[_edges(mask, OUTLINE)] = np.array(entity_colour(i), dtype=np.float32)
    canvas = Image.fromarray(base.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, height // 24))  # readable where the page shows it
    x: float  # textbbox's right edge may be fractional
    for i, (mask, label) in enumerate(zip(resized, labels, strict=True)):
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            continue
        text = f"{i}: {label}" if len(label) <= 48 else f"{i}: {label[:45]}..."
        x, y = int(cols.min()) + 2, int(rows.min()) + 2
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        x -= max(0, right - width + 2)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=entity_colour(i))
        draw.text((x, y), text, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return canvas


def image_grid(images: Sequence[Image.Image], columns: int | None = None, gap: int = 4) -> Image.Image:
    """Tiles on a white sheet, row by row (``columns`` defaults to about a square sheet)."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or max(1, round(len(images) ** 0.5))
    rows = -(-len(images) // columns)
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap), "white")
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        sheet.paste(image.convert("RGB"), (gap + col * (cell_w + gap), gap + row * (cell_h + gap)))
    return sheet

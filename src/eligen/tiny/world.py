"""The shapes world: a deterministic synthetic dataset of coloured shapes on backgrounds (docs/design.md section 8).

Every image is exactly annotated: each pixel is either one object's flat palette colour or (softly textured)
background, so an object's mask is recovered exactly by its colour and no two objects in one image share a colour.

- :func:`sample` draws a :class:`WorldSample` (image, position-free global caption, objects with exact visible
  masks and tight boxes) from a seed; :meth:`WorldSample.layout` / :meth:`WorldSample.mask_layout` turn it into
  an :class:`eligen.Layout` with box or exact-mask entities.
- :func:`sample_layout` draws a held-out benchmark :class:`eligen.Layout` (no image) whose entity masks are
  boxes, ellipses or irregular blobs, pairwise disjoint and in distinct colours, for ShapesBench
  (:mod:`eligen.tiny.metrics`).

Coordinates follow :mod:`eligen.entities`: a box ``(x0, y0, x1, y1)`` covers the pixels whose centres lie in
``[x0, x1) x [y0, y1)``; masks are ``(H, W)`` bool. Shapes are rasterised at 4x and pooled by majority to a
binary raster (no antialiasing), so every pixel holds exactly one colour. Everything is numpy and PIL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..entities import Entity, Layout, box_to_mask, polygon_to_mask

RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond")

# Object colours: pairwise RGB distance >= 103, and >= 107 from every background colour.
COLOURS: dict[str, RGB] = {
    "red": (210, 30, 40),
    "green": (40, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 235, 60),
    "purple": (120, 30, 170),
    "orange": (250, 145, 10),
    "cyan": (40, 210, 220),
    "magenta": (240, 70, 210),
}

# Background base colours. The texture moves each channel by at most BACKGROUND_TEXTURE_MAX (RGB distance
# <= 10 * sqrt(3) ~ 17), so a textured background pixel stays >= 90 from every object colour.
BACKGROUNDS: dict[str, RGB] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "beige": (200, 185, 150),
}
BACKGROUND_TEXTURE_MAX = 10

LAYOUT_KINDS: tuple[str, ...] = ("box", "ellipse", "irregular")
# Shape word used in a benchmark entity's prompt, by mask kind (irregular blobs take any world shape).
LAYOUT_SHAPE_WORDS: dict[str, tuple[str, ...]] = {"box": ("square",), "ellipse": ("circle",), "irregular": SHAPES}

SUPERSAMPLE = 4
MIN_SIZE = 16
OBJECT_SIDE = (0.2, 0.5)  # object side as a fraction of the image side
MIN_VISIBLE = 0.4  # each object keeps at least this fraction of its unoccluded area
PLACEMENT_TRIES = 200


# ----------------------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------------------


@dataclass
class WorldObject:
    """One drawn object: shape ``kind``, palette ``colour`` name, tight ``box`` ``(x0, y0, x1, y1)`` of its
    visible pixels (x1/y1 exclusive) and ``mask``, ``(H, W)`` bool, exactly the pixels showing its colour."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]
    mask: np.ndarray

    @property
    def prompt(self) -> str:
        return entity_prompt(self.colour, self.kind)


@dataclass
class WorldSample:
    """A rendered scene: RGB ``image`` (size x size), position-free ``caption``, ``objects`` in drawing order
    (later ones occlude earlier ones) and the ``background`` name."""

    image: Image.Image
    caption: str
    objects: list[WorldObject]
    background: str

    def layout(self) -> Layout:
        """Global prompt = caption; one box entity ``"a {colour} {shape}"`` per object (drawing order)."""
        width, height = self.image.size
        entities = [Entity(o.prompt, box=tuple(int(v) for v in o.box)) for o in self.objects]
        return Layout(self.caption, width, height, entities)

    def mask_layout(self) -> Layout:
        """Like :meth:`layout`, but each entity carries its exact visible mask, ``(H, W)`` bool."""
        width, height = self.image.size
        entities = [Entity(o.prompt, mask=o.mask.copy()) for o in self.objects]
        return Layout(self.caption, width, height, entities)


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------


def entity_prompt(colour: str, kind: str) -> str:
    """The local prompt of an object: ``"a {colour} {kind}"`` (always "a", so the words sit at fixed places)."""
    return f"a {colour} {kind}"


def caption(objects: Sequence[tuple[str, str]], background: str) -> str:
    """Global caption from ``(colour, kind)`` pairs in drawing order, with no position words.

    ``[("red", "circle"), ("blue", "square")], "gray"`` -> ``"a red circle and a blue square on a gray background"``.
    """
    things = " and ".join(entity_prompt(colour, kind) for colour, kind in objects)
    return f"{things} on a {background} background"


# ----------------------------------------------------------------------------------------------------------
# Rasterisation
# ----------------------------------------------------------------------------------------------------------


def ellipse_to_mask(cx: float, cy: float, rx: float, ry: float, width: int, height: int) -> np.ndarray:
    """Pixels whose centre lies in the axis-aligned ellipse (closed): ``(height, width)`` bool."""
    xs = (np.arange(width) + 0.5 - cx) / rx
    ys = (np.arange(height) + 0.5 - cy) / ry
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= 1.0


def pool_majority(mask: np.ndarray, factor: int) -> np.ndarray:
    """``(H*f, W*f)`` bool -> ``(H, W)`` bool: a pixel is on when at least half its sub-pixels are."""
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    counts = mask.reshape(h, factor, w, factor).sum(axis=(1, 3))
    return 2 * counts >= factor * factor


def _regular_polygon(points: int, radii: Sequence[float], start: float = -math.pi / 2) -> list[tuple[float, float]]:
    """Vertices around (0.5, 0.5) in unit coordinates, radii cycling (a star alternates outer/inner)."""
    angles = start + 2 * math.pi * np.arange(points) / points
    return [(0.5 + radii[i % len(radii)] * math.cos(a), 0.5 + radii[i % len(radii)] * math.sin(a))
            for i, a in enumerate(angles)]


def _heart() -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x = (x - x.min()) / (x.max() - x.min())
    y = (y - y.min()) / (y.max() - y.min())
    return list(zip(x.tolist(), y.tolist(), strict=True))


_ARM = (1 / 3, 2 / 3)
# Unit-square outlines of the polygonal shapes: (u, v) in [0, 1]^2, v pointing down.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "star": _regular_polygon(10, (0.5, 0.21)),
    "heart": _heart(),
    "cross": [(_ARM[0], 0), (_ARM[1], 0), (_ARM[1], _ARM[0]), (1, _ARM[0]), (1, _ARM[1]), (_ARM[1], _ARM[1]),
              (_ARM[1], 1), (_ARM[0], 1), (_ARM[0], _ARM[1]), (0, _ARM[1]), (0, _ARM[0]), (_ARM[0], _ARM[0])],
}
RING_INNER = 0.55  # inner radius / outer radius


def shape_mask(kind: str, x0: float, y0: float, side: float, size: int, factor: int = SUPERSAMPLE) -> np.ndarray:
    """Raster of shape ``kind`` filling the square ``[x0, x0+side) x [y0, y0+side)``: ``(size, size)`` bool.

    Drawn at ``factor`` times the resolution (polygons with :func:`eligen.entities.polygon_to_mask`) and pooled
    by majority, so it is binary: no antialiasing.
    """
    big, s = size * factor, side * factor
    bx, by = x0 * factor, y0 * factor
    if kind in ("circle", "ring"):
        r = s / 2
        mask = ellipse_to_mask(bx + r, by + r, r, r, big, big)
        if kind == "ring":
            mask &= ~ellipse_to_mask(bx + r, by + r, r * RING_INNER, r * RING_INNER, big, big)
    elif kind in _POLYGONS:
        mask = polygon_to_mask([(bx + u * s, by + v * s) for u, v in _POLYGONS[kind]], big, big)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    return pool_majority(mask, factor)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight bounding box ``(x0, y0, x1, y1)`` (x1/y1 exclusive) of a non-empty ``(H, W)`` bool mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("an empty mask has no bounding box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def background_image(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A softly textured background, ``(size, size, 3)`` uint8: the base colour plus a random linear gradient
    and per-pixel noise, each channel within ``BACKGROUND_TEXTURE_MAX`` of the base."""
    base = np.asarray(BACKGROUNDS[name], dtype=np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    gradient_amp = rng.uniform(0, 6)
    noise_amp = int(rng.integers(0, 4))
    coords = (np.arange(size) + 0.5) / size - 0.5  # (size,)
    ramp = 2 * (math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None])  # (size, size) in ~[-1.4, 1.4]
    noise = rng.integers(-noise_amp, noise_amp + 1, size=(size, size, 3))
    offset = np.clip(np.rint(gradient_amp * ramp)[..., None] + noise, -BACKGROUND_TEXTURE_MAX, BACKGROUND_TEXTURE_MAX)
    return np.clip(base + offset, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------


def _check_counts(size: int, min_objects: int, max_objects: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if not 1 <= min_objects <= max_objects <= len(COLOURS):
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(COLOURS)}, got {min_objects}, {max_objects}")


def _side_range(size: int, low: float = OBJECT_SIDE[0], high: float = OBJECT_SIDE[1]) -> tuple[int, int]:
    return max(3, math.ceil(low * size)), max(3, math.floor(high * size))


def _place(rng: np.random.Generator, make: Callable[[np.random.Generator], np.ndarray],
           accept: Callable[[np.ndarray], bool]) -> np.ndarray | None:
    """Draw rasters with ``make`` until ``accept`` holds (at most PLACEMENT_TRIES); None when none fits."""
    for _ in range(PLACEMENT_TRIES):
        raster = make(rng)
        if raster.any() and accept(raster):
            return raster
    return None


def sample(seed: int, size: int = 64, min_objects: int = 1, max_objects: int = 4) -> WorldSample:
    """Draw one scene, deterministically from ``seed``.

    The object count is uniform in ``[min_objects, max_objects]``; kinds are uniform over :data:`SHAPES`,
    colours distinct, sides uniform in 20%-50% of ``size`` at integer positions inside the image. A placement
    is redrawn while it would leave any earlier object with less than 40% of its own raster visible; an object
    that finds no placement is dropped (never below ``min_objects``; then ValueError).
    Returns a ``size x size`` RGB image whose object masks are exact (see :class:`WorldObject`).
    """
    _check_counts(size, min_objects, max_objects)
    rng = np.random.default_rng(seed)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    count = int(rng.integers(min_objects, max_objects + 1))
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:count]]
    lo, hi = _side_range(size)

    drawn: list[tuple[str, str, np.ndarray]] = []  # (kind, colour, own raster)
    visible: list[np.ndarray] = []
    for colour in colours:
        kind = SHAPES[int(rng.integers(len(SHAPES)))]

        def make(r: np.random.Generator, kind: str = kind) -> np.ndarray:
            side = int(r.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in r.integers(0, size - side + 1, size=2))
            return shape_mask(kind, x0, y0, side, size)

        def accept(raster: np.ndarray, visible: list[np.ndarray] = visible,
                   drawn: list[tuple[str, str, np.ndarray]] = drawn) -> bool:
            return all(int((v & ~raster).sum()) >= MIN_VISIBLE * int(own.sum())
                       for v, (_, _, own) in zip(visible, drawn, strict=True))

        raster = _place(rng, make, accept)
        if raster is None:
            continue
        visible = [v & ~raster for v in visible] + [raster.copy()]
        drawn.append((kind, colour, raster))
    if len(drawn) < min_objects:
        raise ValueError(f"seed {seed}: could not place {min_objects} objects at size {size}")

    pixels = background_image(background, size, rng)
    for (_, colour, _), mask in zip(drawn, visible, strict=True):
        pixels[mask] = COLOURS[colour]
    objects = [WorldObject(kind, colour, tight_box(mask), mask)
               for (kind, colour, _), mask in zip(drawn, visible, strict=True)]
    text = caption([(o.colour, o.kind) for o in objects], background)
    return WorldSample(Image.fromarray(pixels, mode="RGB"), text, objects, background)


# ----------------------------------------------------------------------------------------------------------
# Held-out benchmark layouts
# ----------------------------------------------------------------------------------------------------------


def is_rectangle(mask: np.ndarray) -> bool:
    """True when the on pixels of a non-empty ``(H, W)`` bool mask fill their bounding box exactly."""
    x0, y0, x1, y1 = tight_box(mask)
    return bool(mask[y0:y1, x0:x1].all())


def has_gap(mask: np.ndarray) -> bool:
    """True when some row or column of the mask holds two separate runs: then the shape is not convex."""
    for lines in (mask, mask.T):
        counts = lines.sum(axis=1)
        rows = np.flatnonzero(counts)
        first = lines[rows].argmax(axis=1)
        last = lines.shape[1] - 1 - lines[rows, ::-1].argmax(axis=1)
        if np.any(last - first + 1 != counts[rows]):
            return True
    return False


def _box_raster(rng: np.random.Generator, size: int, lo: int, hi: int) -> np.ndarray:
    w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    return box_to_mask((x0, y0, x0 + w, y0 + h), size, size)


def _ellipse_raster(rng: np.random.Generator, size: int, lo: int, hi: int) -> np.ndarray:
    w, h = (float(v) for v in rng.uniform(lo, hi, size=2))
    cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
    return ellipse_to_mask(cx, cy, w / 2, h / 2, size, size)


def _irregular_raster(rng: np.random.Generator, size: int, lo: int, hi: int) -> np.ndarray:
    """A lobed blob: polygon with radius ``1 + a cos(k t + p) + b cos((k+1) t + q)``, fitted into a square."""
    k = int(rng.integers(2, 5))
    a, b = rng.uniform(0.35, 0.55), rng.uniform(0.0, 0.2)
    p, q = rng.uniform(0, 2 * math.pi, size=2)
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    r = 1 + a * np.cos(k * t + p) + b * np.cos((k + 1) * t + q)
    x, y = r * np.cos(t), r * np.sin(t)
    side = rng.uniform(lo, hi)
    scale = side / max(x.max() - x.min(), y.max() - y.min())
    x, y = (x - x.min()) * scale, (y - y.min()) * scale
    ox = rng.uniform(0, size - x.max())
    oy = rng.uniform(0, size - y.max())
    return polygon_to_mask(list(zip((x + ox).tolist(), (y + oy).tolist(), strict=True)), size, size)


_LAYOUT_RASTERS = {"box": _box_raster, "ellipse": _ellipse_raster, "irregular": _irregular_raster}
_LAYOUT_CHECKS: dict[str, Callable[[np.ndarray], bool]] = {
    "box": is_rectangle,
    "ellipse": lambda m: not is_rectangle(m) and not has_gap(m),
    "irregular": has_gap,
}


def sample_layout(seed: int, size: int = 64, kinds: Sequence[str] = LAYOUT_KINDS, min_objects: int = 1,
                  max_objects: int = 4) -> Layout:
    """A held-out benchmark layout, deterministic from ``seed``; nothing is rendered.

    Each entity gets a mask kind drawn uniformly from ``kinds``: ``"box"`` (an axis-aligned rectangle),
    ``"ellipse"`` (axis-aligned, convex, never a rectangle) or ``"irregular"`` (a lobed blob with a row or
    column holding two separate runs, so neither convex nor a rectangle), sides in 20%-45% of ``size``.
    Colours are distinct and masks pairwise disjoint, so an ideal image scores IoU 1 for every entity. Entity
    prompts are ``"a {colour} {shape}"`` with the shape word from :data:`LAYOUT_SHAPE_WORDS`; the global
    prompt is the position-free :func:`caption`. Masks are ``(size, size)`` bool; ``seed`` is left unset.
    """
    _check_counts(size, min_objects, max_objects)
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in LAYOUT_KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {LAYOUT_KINDS}, got {kinds}")
    rng = np.random.default_rng(seed)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    count = int(rng.integers(min_objects, max_objects + 1))
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:count]]
    lo, hi = _side_range(size, OBJECT_SIDE[0], 0.45)
    taken = np.zeros((size, size), dtype=bool)
    entities, described = [], []
    for colour in colours:
        kind = kinds[int(rng.integers(len(kinds)))]
        words = LAYOUT_SHAPE_WORDS[kind]
        shape = words[int(rng.integers(len(words)))]
        check = _LAYOUT_CHECKS[kind]

        def make(r: np.random.Generator, kind: str = kind) -> np.ndarray:
            return _LAYOUT_RASTERS[kind](r, size, lo, hi)

        def accept(m: np.ndarray, check: Callable[[np.ndarray], bool] = check, taken: np.ndarray = taken) -> bool:
            return check(m) and not (m & taken).any()

        mask = _place(rng, make, accept)
        if mask is None:
            continue
        taken |= mask
        entities.append(Entity(entity_prompt(colour, shape), mask=mask))
        described.append((colour, shape))
    if len(entities) < min_objects:
        raise ValueError(f"seed {seed}: could not place {min_objects} disjoint masks at size {size}")
    return Layout(caption(described, background), size, size, entities)

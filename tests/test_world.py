"""The shapes world (eligen.tiny.world) and ShapesBench scoring (eligen.tiny.metrics)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eligen.entities import Layout, box_to_mask, layout_from_dict, layout_to_dict
from eligen.tiny import metrics, world

POSITION_WORDS = re.compile(r"\b(left|right|top|bottom|above|below|near|under|over|beside|behind|centre|center)\b")
PROMPT = re.compile(r"^a ([a-z]+) ([a-z]+)$")


# ----------------------------------------------------------------------------------------------------------
# Independent helpers (deliberately not the module's own)
# ----------------------------------------------------------------------------------------------------------


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def runs_per_line(mask: np.ndarray) -> int:
    """Largest number of separate on-runs in any row or column."""
    most = 0
    for lines in (mask, mask.T):
        for line in lines.astype(np.int8):
            starts = int((np.diff(np.concatenate([[0], line])) == 1).sum())
            most = max(most, starts)
    return most


def hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the on pixels' corners (monotone chain + shoelace)."""
    ys, xs = np.nonzero(mask)
    corners = {(x + dx, y + dy) for x, y in zip(xs.tolist(), ys.tolist(), strict=True) for dx in (0, 1)
               for dy in (0, 1)}
    points = sorted(corners)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1], strict=True)))


def colour_pixels(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(image == np.asarray(colour, dtype=np.uint8), axis=-1)


def render(masks, colours, background="gray", size=64) -> np.ndarray:
    """A perfect prediction: each mask painted in its colour on a plain background, (size, size, 3) uint8."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = world.BACKGROUNDS[background]
    for mask, colour in zip(masks, colours, strict=True):
        image[mask] = world.COLOURS[colour]
    return image


def entity_colours(layout: Layout) -> list[str]:
    return [PROMPT.match(e.prompt).group(1) for e in layout.entities]


def check_annotations(sample: world.WorldSample) -> None:
    image = np.asarray(sample.image)
    size = sample.image.size[0]
    assert sample.image.mode == "RGB" and image.shape == (size, size, 3)
    assert len({o.colour for o in sample.objects}) == len(sample.objects)
    union = np.zeros((size, size), dtype=bool)
    for obj in sample.objects:
        assert obj.mask.dtype == bool and obj.mask.shape == (size, size)
        np.testing.assert_array_equal(obj.mask, colour_pixels(image, world.COLOURS[obj.colour]))
        assert obj.mask.any()
        assert obj.box == bbox(obj.mask)
        assert not (union & obj.mask).any(), "masks overlap"
        union |= obj.mask
    background = image[~union].astype(int)
    for colour in world.COLOURS.values():
        assert not colour_pixels(image[~union][None], colour).any()
    assert np.abs(background - np.asarray(world.BACKGROUNDS[sample.background])).max() <= \
        world.BACKGROUND_TEXTURE_MAX


# ----------------------------------------------------------------------------------------------------------
# World
# ----------------------------------------------------------------------------------------------------------


def test_palette_is_well_separated():
    assert len(world.SHAPES) >= 4 and len(world.COLOURS) >= 6 and len(world.BACKGROUNDS) >= 4
    colours = np.asarray(list(world.COLOURS.values()), dtype=float)
    backgrounds = np.asarray(list(world.BACKGROUNDS.values()), dtype=float)
    pairwise = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + 1e9 * np.eye(len(colours))
    assert pairwise.min() > 100
    assert np.linalg.norm(colours[:, None] - backgrounds[None], axis=-1).min() > 100


def test_sample_is_deterministic():
    for seed in (0, 7, 12345):
        a, b = world.sample(seed), world.sample(seed)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.caption == b.caption and a.background == b.background
        assert [(o.kind, o.colour, o.box) for o in a.objects] == [(o.kind, o.colour, o.box) for o in b.objects]
        for x, y in zip(a.objects, b.objects, strict=True):
            np.testing.assert_array_equal(x.mask, y.mask)
    images = {world.sample(seed).image.tobytes() for seed in range(20)}
    assert len(images) == 20
    layouts = [world.sample_layout(seed) for seed in (3, 3, 4)]
    assert layouts[0].prompt == layouts[1].prompt
    for m0, m1 in zip(layouts[0].masks(), layouts[1].masks(), strict=True):
        np.testing.assert_array_equal(m0, m1)
    assert layouts[0].prompt != layouts[2].prompt or any(
        m0.shape != m2.shape or not np.array_equal(m0, m2)
        for m0, m2 in zip(layouts[0].masks(), layouts[2].masks(), strict=False))


@pytest.mark.parametrize("size", [32, 48, 64])
def test_annotations_are_exact(size):
    lo = world._side_range(size)[0]
    smallest = min(int(world.shape_mask(kind, 0, 0, lo, size).sum()) for kind in world.SHAPES)
    for seed in range(60):
        sample = world.sample(seed, size=size)
        check_annotations(sample)
        hi = world._side_range(size)[1]
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.box
            assert x1 - x0 <= hi + 1 and y1 - y0 <= hi + 1
            assert obj.mask.sum() >= world.MIN_VISIBLE * smallest


def test_captions_have_no_positions_and_name_every_object():
    for seed in range(100):
        sample = world.sample(seed)
        assert not POSITION_WORDS.search(sample.caption), sample.caption
        assert "," not in sample.caption
        expected = " and ".join(f"a {o.colour} {o.kind}" for o in sample.objects)
        assert sample.caption == f"{expected} on a {sample.background} background"
        for obj in sample.objects:
            assert obj.prompt == f"a {obj.colour} {obj.kind}" and obj.prompt in sample.caption


def test_coverage_over_200_seeds():
    samples = [world.sample(seed) for seed in range(200)]
    kinds = {o.kind for s in samples for o in s.objects}
    colours = {o.colour for s in samples for o in s.objects}
    assert len(kinds) >= 4 and kinds <= set(world.SHAPES)
    assert len(colours) >= 6 and colours <= set(world.COLOURS)
    assert {s.background for s in samples} == set(world.BACKGROUNDS)
    assert {len(s.objects) for s in samples} == {1, 2, 3, 4}


def test_object_count_bounds_and_bad_arguments():
    for seed in range(30):
        assert len(world.sample(seed, min_objects=3, max_objects=3).objects) == 3
        assert len(world.sample(seed, size=32, min_objects=1, max_objects=1).objects) == 1
    with pytest.raises(ValueError):
        world.sample(0, size=8)
    with pytest.raises(ValueError):
        world.sample(0, min_objects=3, max_objects=2)
    with pytest.raises(ValueError):
        world.sample_layout(0, kinds=("triangle",))


def test_layouts_validate_and_round_trip():
    for seed in range(15):
        sample = world.sample(seed)
        boxes, masks = sample.layout(), sample.mask_layout()
        for layout in (boxes, masks):
            layout.validate()
            assert layout.prompt == sample.caption and (layout.width, layout.height) == sample.image.size
            assert [e.prompt for e in layout.entities] == [o.prompt for o in sample.objects]
            back = layout_from_dict(layout_to_dict(layout))
            assert back.prompt == layout.prompt and [e.prompt for e in back.entities] == \
                [e.prompt for e in layout.entities]
            for m0, m1 in zip(layout.masks(), back.masks(), strict=True):
                np.testing.assert_array_equal(m0, m1)
        for entity, obj in zip(boxes.entities, sample.objects, strict=True):
            assert tuple(entity.box) == obj.box
            box_mask = box_to_mask(entity.box, 64, 64)
            assert not (obj.mask & ~box_mask).any()
        for entity, obj in zip(masks.entities, sample.objects, strict=True):
            assert entity.spatial_field == "mask"
            np.testing.assert_array_equal(entity.rasterize(64, 64), obj.mask)


@pytest.mark.parametrize("size", [32, 64])
def test_sample_layout_kinds(size):
    for kind in world.LAYOUT_KINDS:
        for seed in range(25):
            layout = world.sample_layout(seed, size=size, kinds=(kind,))
            layout.validate()
            assert (layout.width, layout.height) == (size, size) and layout.entities
            assert not POSITION_WORDS.search(layout.prompt)
            names = entity_colours(layout)
            assert len(set(names)) == len(names) and set(names) <= set(world.COLOURS)
            taken = np.zeros((size, size), dtype=bool)
            for entity in layout.entities:
                mask = entity.mask
                assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == (size, size)
                assert PROMPT.match(entity.prompt).group(2) in world.SHAPES
                assert not (taken & mask).any()
                taken |= mask
                x0, y0, x1, y1 = bbox(mask)
                rectangle = bool(mask[y0:y1, x0:x1].all())
                if kind == "box":
                    assert rectangle
                elif kind == "ellipse":
                    assert not rectangle and runs_per_line(mask) == 1
                    assert mask.sum() / hull_area(mask) > 0.8
                else:
                    assert not rectangle and runs_per_line(mask) >= 2


def test_sample_layout_mixes_kinds():
    rectangles = convex = irregular = 0
    for seed in range(40):
        for mask in world.sample_layout(seed).masks():
            x0, y0, x1, y1 = bbox(mask)
            if mask[y0:y1, x0:x1].all():
                rectangles += 1
            elif runs_per_line(mask) == 1:
                convex += 1
            else:
                irregular += 1
    assert min(rectangles, convex, irregular) >= 5


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.sampled_from([32, 48, 64]))
def test_masks_partition_the_object_pixels(seed, size):
    sample = world.sample(seed, size=size)
    image = np.asarray(sample.image)
    palette = np.zeros((size, size), dtype=bool)
    for colour in world.COLOURS.values():
        palette |= colour_pixels(image, colour)
    cover = np.zeros((size, size), dtype=np.int64)
    for obj in sample.objects:
        cover += obj.mask
    assert cover.max() <= 1
    np.testing.assert_array_equal(cover.astype(bool), palette)
    # The metric segments a real sample exactly.
    scores = metrics.entity_scores(image, [o.mask for o in sample.objects], [o.colour for o in sample.objects])
    assert all(s["iou"] == 1.0 and s["colour_ok"] and s["hit"] for s in scores)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------


def test_iou_conventions():
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert metrics.iou(empty, empty) == 1.0
    assert metrics.iou(full, empty) == 0.0 and metrics.iou(empty, full) == 0.0
    half = full.copy()
    half[:, :2] = False
    assert metrics.iou(half, full) == 0.5
    with pytest.raises(ValueError):
        metrics.iou(full, np.ones((4, 5), bool))


def test_colour_segment_rule():
    red, orange = np.asarray(world.COLOURS["red"], float), np.asarray(world.COLOURS["orange"], float)
    direction = (orange - red) / np.linalg.norm(orange - red)
    pixels = np.stack([red + 59 * direction, red + 61 * direction, (red + orange) / 2,
                       red + 0.45 * (orange - red), np.asarray(world.BACKGROUNDS["gray"], float)])[None]
    # distances to red: 59, 61, 62.6 (tie with orange), 56.3, 180
    assert metrics.colour_segment(pixels, world.COLOURS["red"]).tolist() == [[True, False, False, True, False]]
    wide = metrics.colour_segment(pixels, world.COLOURS["red"], threshold=100)
    assert wide.tolist() == [[True, True, False, True, False]]  # the exact midpoint is a tie: nobody's
    assert not metrics.colour_segment(pixels, world.COLOURS["orange"], threshold=100)[0, 2]
    assert (metrics.label_image(pixels, threshold=100) == [[0, 0, -1, 0, -1]]).all()


def test_perfect_prediction_scores_one():
    all_scores = []
    for seed in range(10):
        layout = world.sample_layout(seed)
        masks, names = layout.masks(), entity_colours(layout)
        for background in world.BACKGROUNDS:
            scores = metrics.entity_scores(render(masks, names, background), masks, names)
            assert all(s["iou"] == 1.0 and s["colour_ok"] and s["hit"] and s["dominant"] == s["colour"]
                       for s in scores)
            all_scores += scores
    summary = metrics.summarise(all_scores)
    assert summary == {"miou": 1.0, "colour_accuracy": 1.0, "recall": 1.0, "n": len(all_scores)}


def test_empty_prediction_scores_zero():
    layout = world.sample_layout(5)
    masks, names = layout.masks(), entity_colours(layout)
    scores = metrics.entity_scores(render([], [], "white"), masks, names)
    assert all(s["iou"] == 0.0 and not s["colour_ok"] and not s["hit"] and s["dominant"] is None for s in scores)
    assert metrics.summarise(scores) == {"miou": 0.0, "colour_accuracy": 0.0, "recall": 0.0, "n": len(masks)}


def test_half_covered_and_shifted_masks():
    mask = box_to_mask((10, 10, 20, 20), 64, 64)  # 100 pixels
    half = box_to_mask((10, 10, 15, 20), 64, 64)  # left 50 of them
    shifted = box_to_mask((15, 10, 25, 20), 64, 64)  # 50 inside, 50 outside
    (s_half,) = metrics.entity_scores(render([half], ["red"]), [mask], ["red"])
    assert s_half["iou"] == 0.5 and not s_half["hit"] and s_half["colour_ok"]
    (s_shift,) = metrics.entity_scores(render([shifted], ["red"]), [mask], ["red"])
    assert s_shift["iou"] == pytest.approx(50 / 150) and s_shift["colour_ok"]
    most = box_to_mask((10, 10, 19, 20), 64, 64)  # 90 of 100
    (s_most,) = metrics.entity_scores(render([most], ["red"]), [mask], ["red"])
    assert s_most["iou"] == 0.9 and s_most["hit"]
    summary = metrics.summarise([s_half, s_shift, s_most])
    assert summary["miou"] == pytest.approx((0.5 + 1 / 3 + 0.9) / 3) and summary["recall"] == pytest.approx(1 / 3)


def test_wrong_colour_fails_colour_check():
    mask = box_to_mask((8, 8, 40, 30), 64, 64)
    (score,) = metrics.entity_scores(render([mask], ["blue"]), [mask], ["red"])
    assert score["iou"] == 0.0 and not score["colour_ok"] and score["dominant"] == "blue"
    # A mostly-red region with a blue minority is still red; an exact tie is not.
    left, right = box_to_mask((8, 8, 30, 30), 64, 64), box_to_mask((30, 8, 40, 30), 64, 64)
    (score,) = metrics.entity_scores(render([left, right], ["red", "blue"]), [mask], ["red"])
    assert score["colour_ok"] and score["iou"] == pytest.approx(left.sum() / mask.sum())
    a, b = box_to_mask((8, 8, 24, 30), 64, 64), box_to_mask((24, 8, 40, 30), 64, 64)
    (score,) = metrics.entity_scores(render([a, b], ["red", "blue"]), [mask], ["red"])
    assert not score["colour_ok"] and score["dominant"] is None


def test_metric_inputs_are_checked():
    image = render([], [])
    with pytest.raises(ValueError):
        metrics.entity_scores(image, [np.zeros((32, 32), bool)], ["red"])
    with pytest.raises(ValueError):
        metrics.entity_scores(image, [np.zeros((64, 64), bool)], ["chartreuse"])
    with pytest.raises(ValueError):
        metrics.entity_scores(image, [np.zeros((64, 64), bool)], [])
    summary = metrics.summarise([])
    assert summary["n"] == 0 and np.isnan(summary["miou"])
    # PIL images are accepted too.
    sample = world.sample(1)
    scores = metrics.entity_scores(sample.image, [o.mask for o in sample.objects], [o.colour for o in sample.objects])
    assert metrics.summarise(scores)["miou"] == 1.0

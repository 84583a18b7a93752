"""Training data: record formats, validation and skipping, buckets, the cover-and-crop alignment, batching."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from eligen.entities import box_to_mask
from eligen.train.data import (
    BOX_OUTSIDE,
    DEGENERATE_BOX,
    EMPTY_ENTITY_PROMPT,
    LENGTH_MISMATCH,
    MALFORMED_ENTITY,
    MALFORMED_JSON,
    MISSING_IMAGE,
    MISSING_MASK,
    MISSING_PROMPT_FIELD,
    NOT_AN_OBJECT,
    UNREADABLE_IMAGE,
    WRONG_MASK_SIZE,
    BucketBatchSampler,
    CoverCrop,
    EntityDataset,
    Record,
    bucket_sizes,
    collate,
    load_records,
)

BACKGROUND = (30, 30, 30)
RED, GREEN, BLUE = (220, 40, 40), (40, 200, 60), (50, 60, 220)

# name: (width, height, [(colour name, colour, box)]) -- disjoint solid rectangles on a dark background.
SCENES = {
    "tall": (40, 60, [("red", RED, (5, 10, 25, 30)), ("green", GREEN, (20, 36, 38, 57))]),
    "wide": (60, 40, [("blue", BLUE, (8, 5, 30, 30)), ("red", RED, (35, 12, 55, 36))]),
    "square": (50, 50, [("green", GREEN, (10, 10, 40, 25))]),
    "panorama": (90, 30, [("red", RED, (25, 5, 70, 25))]),
}


def draw_scene(directory, name):
    """Write ``name.png`` and one exact PNG mask per rectangle; returns (image file, [(prompt, box, mask file)])."""
    width, height, rects = SCENES[name]
    image = Image.new("RGB", (width, height), BACKGROUND)
    entities = []
    for i, (prompt, colour, box) in enumerate(rects):
        image.paste(colour, box)  # fills x0..x1-1, y0..y1-1: the box_to_mask rule for integer boxes
        mask = Image.fromarray(box_to_mask(box, width, height).astype(np.uint8) * 255, mode="L")
        mask.save(directory / f"{name}_mask{i}.png")
        entities.append((f"a {prompt} rectangle", list(box), f"{name}_mask{i}.png"))
    image.save(directory / f"{name}.png")
    return f"{name}.png", entities


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def scene_records(directory, use_masks=True, use_boxes=True):
    """Our JSONL records for every scene: each rectangle as a box entity and/or a mask entity."""
    records = []
    for name in SCENES:
        image, entities = draw_scene(directory, name)
        ours = []
        for prompt, box, mask in entities:
            if use_boxes:
                ours.append({"prompt": prompt, "box": box})
            if use_masks:
                ours.append({"prompt": prompt, "mask": mask})
        records.append({"image": image, "prompt": f"a {name} picture", "entities": ours})
    return records


@pytest.fixture
def scene_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", scene_records(tmp_path))


def to_uint8(image):
    """(3, H, W) in [-1, 1] -> (H, W, 3) values in [0, 255]."""
    return ((image.permute(1, 2, 0).numpy() + 1.0) * 127.5).round()


def colour_region(image, colour, tolerance=60):
    return np.abs(to_uint8(image) - np.array(colour)).max(axis=-1) < tolerance


def boundary_band(mask):
    """Pixels within one pixel (3x3 neighbourhood) of a boundary of ``mask``."""
    padded = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    windows = [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    return np.any(windows, axis=0) != np.all(windows, axis=0)


def scene_colours(name):
    """Colour of each entity, in the order of scene_records (box then mask for each rectangle)."""
    return [colour for _, colour, _ in SCENES[name][2] for _ in range(2)]


# ----------------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------------


def test_both_formats_give_the_same_samples(tmp_path):
    ours = scene_records(tmp_path, use_boxes=False)
    write_jsonl(tmp_path / "data.jsonl", ours)
    reference = [{"image": r["image"], "prompt": r["prompt"],
                  "eligen_entity_prompts": [e["prompt"] for e in r["entities"]],
                  "eligen_entity_masks": [e["mask"] for e in r["entities"]]} for r in ours]
    (tmp_path / "metadata.json").write_text(json.dumps(reference, indent=2))

    a = EntityDataset(tmp_path / "data.jsonl", resolution=64, multiple=8)
    b = EntityDataset(tmp_path / "metadata.json", resolution=64, multiple=8)
    assert len(a) == len(b) == len(SCENES)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["prompt"] == y["prompt"] and x["entity_prompts"] == y["entity_prompts"]
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["entity_masks"], y["entity_masks"])
        assert x["entity_masks"].any(dim=(1, 2)).all()


def test_load_records_parses_paths_relative_to_the_file(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    path = write_jsonl(sub / "d.jsonl", [
        {"image": "img/a.png", "prompt": "p", "entities": [{"prompt": "e", "box": [1, 2, 3, 4]},
                                                           {"prompt": "f", "mask": "m.png"}]},
        "",
        "   ",
        {"image": "/abs/b.png", "prompt": "q"},
    ])
    records = load_records(path)
    assert len(records) == 2  # blank lines are skipped
    assert records[0] == Record(sub / "img/a.png", "p", [("e", {"box": [1.0, 2.0, 3.0, 4.0]}),
                                                         ("f", {"mask": sub / "m.png"})], source="line 1")
    assert records[1].image == Path("/abs/b.png") and records[1].entities == [] and records[1].error is None


def test_a_json_list_is_the_reference_format_whatever_the_name(tmp_path):
    data = [{"image": "a.png", "prompt": "p", "eligen_entity_prompts": ["x"], "eligen_entity_masks": ["m.png"]}]
    path = tmp_path / "meta.txt"
    path.write_text(json.dumps(data))
    (record,) = load_records(path)
    assert record.entities == [("x", {"mask": tmp_path / "m.png"})] and record.source == "record 1"


# ----------------------------------------------------------------------------------------------------------
# Alignment of masks and boxes with the image
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("resolution", "multiple", "buckets"), [(64, 8, True), (64, 8, False), (32, 8, True),
                                                                 (48, 16, False), (96, 16, True)])
def test_entity_masks_cover_exactly_the_rectangles(scene_file, resolution, multiple, buckets):
    dataset = EntityDataset(scene_file, resolution=resolution, multiple=multiple, buckets=buckets)
    assert len(dataset) == len(SCENES)
    for index, name in enumerate(SCENES):
        item = dataset[index]
        bucket = dataset.bucket_of(index)
        assert item["image"].shape == (3, *bucket) and item["image"].dtype == torch.float32
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
        masks = item["entity_masks"].numpy()
        assert masks.shape == (len(scene_colours(name)), *bucket) and masks.dtype == bool
        for k, colour in enumerate(scene_colours(name)):
            mask = masks[k]
            keep = ~boundary_band(mask)
            assert (mask & keep).sum() > 0, f"{name} entity {k} vanished"
            region = colour_region(item["image"], colour)
            wrong = (mask != region) & keep
            assert not wrong.any(), f"{name} entity {k} in bucket {bucket}: {wrong.sum()} misaligned pixels"
        for k in range(0, masks.shape[0], 2):  # box entity and mask entity of the same rectangle
            assert np.array_equal(masks[k], masks[k + 1]), f"{name}: box and PNG mask differ"


def test_crop_without_resampling_is_pixel_exact(tmp_path):
    image = Image.new("RGB", (64, 80), BACKGROUND)
    image.paste(RED, (3, 5, 20, 40))
    image.paste(BLUE, (30, 60, 64, 80))
    image.save(tmp_path / "a.png")
    write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "prompt": "p", "entities": [
        {"prompt": "red", "box": [3, 5, 20, 40]}, {"prompt": "blue", "box": [30, 60, 64, 80]}]}])
    dataset = EntityDataset(tmp_path / "d.jsonl", resolution=64, multiple=8, buckets=False)
    item = dataset[0]
    assert dataset.bucket_of(0) == (64, 64)
    transform = dataset.transform_of(0)
    assert (transform.scaled_width, transform.scaled_height, transform.left, transform.top) == (64, 80, 0, 8)
    for k, colour in enumerate((RED, BLUE)):
        assert np.array_equal(item["entity_masks"][k].numpy(), colour_region(item["image"], colour, tolerance=2))
    expected = np.asarray(image, dtype=np.float32)[8:72] / 127.5 - 1.0
    assert torch.allclose(item["image"].permute(1, 2, 0), torch.from_numpy(expected))


def test_max_entities_keeps_the_first(scene_file):
    dataset = EntityDataset(scene_file, resolution=64, multiple=8, max_entities=1)
    full = EntityDataset(scene_file, resolution=64, multiple=8)
    for i in range(len(dataset)):
        assert dataset[i]["entity_prompts"] == full[i]["entity_prompts"][:1]
        assert torch.equal(dataset[i]["entity_masks"], full[i]["entity_masks"][:1])


SIDES = st.integers(1, 160)
BUCKETS = st.tuples(st.integers(1, 16), st.integers(1, 16)).map(lambda hw: (8 * hw[0], 8 * hw[1]))


@st.composite
def box_in_image(draw, step=1):
    """(width, height, box) with a non-degenerate box inside the image, corners on a 1/step pixel grid."""
    width, height = draw(SIDES), draw(SIDES)
    x0 = draw(st.integers(0, width * step - 1))
    x1 = draw(st.integers(x0 + 1, width * step))
    y0 = draw(st.integers(0, height * step - 1))
    y1 = draw(st.integers(y0 + 1, height * step))
    return width, height, (Fraction(x0, step), Fraction(y0, step), Fraction(x1, step), Fraction(y1, step))


def check_cover(t: CoverCrop, width, height, bucket):
    """The transform covers the bucket, keeps the aspect ratio to rounding and centres the crop."""
    scale = max(bucket[0] / height, bucket[1] / width)
    assert t.scaled_width >= bucket[1] and t.scaled_height >= bucket[0]
    assert abs(t.scaled_width - width * scale) <= 0.5 + 1e-9 and abs(t.scaled_height - height * scale) <= 0.5 + 1e-9
    assert t.scaled_width == bucket[1] or t.scaled_height == bucket[0]
    assert t.left == (t.scaled_width - bucket[1]) // 2 and t.top == (t.scaled_height - bucket[0]) // 2


@settings(max_examples=150, deadline=None)
@given(box_in_image(step=4), BUCKETS)
def test_box_mask_is_the_analytically_transformed_box(case, bucket):
    width, height, box = case
    t = CoverCrop.fit(width, height, bucket)
    check_cover(t, width, height, bucket)
    got = t.box_mask([float(v) for v in box])
    # The exact definition: output pixel (i, j) is on iff its centre, mapped back to the original image, lies in
    # [x0, x1) x [y0, y1).  Evaluated in rational arithmetic.
    sx, sy = Fraction(t.scaled_width, width), Fraction(t.scaled_height, height)
    cols = np.array([box[0] <= (t.left + j + Fraction(1, 2)) / sx < box[2] for j in range(bucket[1])])
    rows = np.array([box[1] <= (t.top + i + Fraction(1, 2)) / sy < box[3] for i in range(bucket[0])])
    assert np.array_equal(got, rows[:, None] & cols[None, :])
    # ... and the transformed corners are the scaled corners minus the crop offset.
    x0, _, _, y1 = t.box([float(v) for v in box])
    assert math.isclose(x0, float(box[0] * sx - t.left), abs_tol=1e-9)
    assert math.isclose(y1, float(box[3] * sy - t.top), abs_tol=1e-9)


@settings(max_examples=150, deadline=None)
@given(box_in_image(step=1), BUCKETS)
def test_integer_box_and_its_png_mask_transform_identically(case, bucket):
    width, height, box = case
    t = CoverCrop.fit(width, height, bucket)
    box = [int(v) for v in box]
    assert np.array_equal(t.mask(box_to_mask(box, width, height)), t.box_mask(box))


def test_mask_transform_is_nearest_neighbour_with_pixel_centres():
    t = CoverCrop.fit(3, 3, (6, 6))  # exact 2x upscale: every source pixel becomes a 2x2 block
    source = np.arange(9).reshape(3, 3) % 2 == 0
    assert np.array_equal(t.mask(source), source.repeat(2, axis=0).repeat(2, axis=1))
    t = CoverCrop.fit(8, 4, (4, 4))  # scale 1, crop columns 2..5
    source = np.random.default_rng(0).random((4, 8)) > 0.5
    assert np.array_equal(t.mask(source), source[:, 2:6])


# ----------------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("resolution", "multiple"), [(512, 64), (1024, 64), (768, 32), (64, 8), (1024, 16)])
def test_bucket_sizes_are_multiples_of_the_right_area_one_per_ratio(resolution, multiple):
    ratios = (1 / 2, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 2)
    sizes = bucket_sizes(resolution, multiple)
    assert sizes == sorted(set(sizes))
    assert len(sizes) == len(ratios)
    for h, w in sizes:
        assert h % multiple == 0 and w % multiple == 0
        assert abs(h * w / resolution**2 - 1) < 0.15
    by_ratio = sorted(sizes, key=lambda hw: hw[1] / hw[0])
    for (h, w), ratio in zip(by_ratio, ratios, strict=True):
        assert abs(math.log(w / h / ratio)) < 0.2
    assert (resolution, resolution) in sizes


def test_bucket_sizes_deduplicate_coarse_grids():
    sizes = bucket_sizes(64, 64)
    assert sizes == [(64, 64)]
    sizes = bucket_sizes(256, 64)
    assert len(sizes) < 7 and len(sizes) == len(set(sizes))
    assert bucket_sizes(512, 64, ratios=(1,)) == [(512, 512)]
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_bucket_of_picks_the_nearest_aspect_ratio(scene_file):
    dataset = EntityDataset(scene_file, resolution=64, multiple=8)
    expected = {"tall": (80, 56), "wide": (56, 80), "square": (64, 64), "panorama": (48, 88)}
    for index, name in enumerate(SCENES):
        width, height, _ = SCENES[name]
        assert dataset.bucket_of(index) == expected[name]
        chosen = abs(math.log(expected[name][1] / expected[name][0] * height / width))
        for h, w in dataset.available_buckets:
            assert chosen <= abs(math.log(w / h * height / width)) + 1e-12
    square = EntityDataset(scene_file, resolution=64, multiple=8, buckets=False)
    assert [square.bucket_of(i) for i in range(len(square))] == [(64, 64)] * len(SCENES)


# ----------------------------------------------------------------------------------------------------------
# Bad records
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def messy(tmp_path):
    """20 good records and 14 bad ones of every kind; returns the JSONL path."""
    image, entities = draw_scene(tmp_path, "tall")
    (tmp_path / "garbage.png").write_bytes(b"this is not a PNG")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 64, 3), dtype=np.uint8))
    for name, kind in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):  # valid headers, the rest cut off
        noise.save(tmp_path / name, format=kind)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    Image.new("L", (30, 30), 255).save(tmp_path / "small_mask.png")
    good = {"image": image, "prompt": "good", "entities": [{"prompt": "red", "box": entities[0][1]},
                                                           {"prompt": "green", "mask": entities[1][2]}]}
    bad = [
        {"image": "nowhere.png", "prompt": "p"},
        {"image": "garbage.png", "prompt": "p"},
        {"image": "cut.png", "prompt": "p"},
        {"image": "cut.jpg", "prompt": "p"},
        {"image": image, "prompt": "p", "entities": [{"prompt": "e", "mask": "small_mask.png"}]},
        {"image": image, "prompt": "p", "entities": [{"prompt": "e", "box": [100, 100, 120, 120]}]},
        {"image": image, "prompt": "p", "entities": [{"prompt": "e", "box": [10, 10, 10, 20]}]},
        {"image": image, "prompt": "p", "entities": [{"prompt": "  ", "box": [1, 1, 5, 5]}]},
        '{"image": "a.png", "prompt": ',
        [1, 2, 3],
        {"image": image},
        {"image": image, "prompt": "p", "entities": [{"prompt": "e", "box": [1, 1, 5, 5], "mask": "m.png"}]},
        {"image": image, "prompt": "p", "entities": [{"box": [1, 1, 5, 5]}]},
        {"image": image, "prompt": "p", "entities": [{"prompt": "e", "mask": "absent_mask.png"}]},
    ]
    lines = [good] * 10 + bad + [good] * 10
    return write_jsonl(tmp_path / "messy.jsonl", lines)


MESSY_REASONS = {MISSING_IMAGE: 1, UNREADABLE_IMAGE: 3, WRONG_MASK_SIZE: 1, BOX_OUTSIDE: 1, DEGENERATE_BOX: 1,
                 EMPTY_ENTITY_PROMPT: 1, MALFORMED_JSON: 1, NOT_AN_OBJECT: 1, MISSING_PROMPT_FIELD: 1,
                 MALFORMED_ENTITY: 2, MISSING_MASK: 1}


def test_bad_records_are_skipped_and_counted(messy):
    dataset = EntityDataset(messy, resolution=64, multiple=8, max_bad_fraction=0.5)
    assert len(dataset) == 20
    assert (dataset.stats.total, dataset.stats.bad) == (34, 14)
    assert dataset.stats.reasons == MESSY_REASONS
    assert next(iter(dataset.stats.reasons)) == UNREADABLE_IMAGE  # most frequent first
    assert {r.source for r in dataset.bad_records} == {f"line {n}" for n in range(11, 25)}
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["prompt"] == "good" and item["entity_masks"].shape == (2, 80, 56)


def test_too_many_bad_records_raise_with_counts(messy):
    with pytest.raises(ValueError, match=r"14 of 34 records are bad") as info:
        EntityDataset(messy, resolution=64, multiple=8)
    assert "malformed entity: 2" in str(info.value) and "missing image: 1" in str(info.value)
    assert "line 11" in str(info.value)


def test_metadata_length_mismatch_is_counted(tmp_path):
    image, entities = draw_scene(tmp_path, "wide")
    good = {"image": image, "prompt": "p", "eligen_entity_prompts": ["blue", "red"],
            "eligen_entity_masks": [entities[0][2], entities[1][2]]}
    mismatch = dict(good, eligen_entity_prompts=["blue"])
    (tmp_path / "metadata.json").write_text(json.dumps([good] * 9 + [mismatch]))
    dataset = EntityDataset(tmp_path / "metadata.json", resolution=64, multiple=8, max_bad_fraction=0.1)
    assert len(dataset) == 9
    assert dataset.stats == type(dataset.stats)(total=10, bad=1, reasons={LENGTH_MISMATCH: 1})
    with pytest.raises(ValueError, match="1 of 10"):
        EntityDataset(tmp_path / "metadata.json", resolution=64, multiple=8, max_bad_fraction=0.05)


def test_empty_datasets_raise(tmp_path):
    write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no records"):
        EntityDataset(tmp_path / "blank.jsonl", resolution=64, multiple=8)
    write_jsonl(tmp_path / "bad.jsonl", [{"image": "nowhere.png", "prompt": "p"}, "not json"])
    with pytest.raises(ValueError, match=r"no usable training records.*missing image: 1"):
        EntityDataset(tmp_path / "bad.jsonl", resolution=64, multiple=8, max_bad_fraction=1.0)
    with pytest.raises(FileNotFoundError):
        EntityDataset(tmp_path / "absent.jsonl", resolution=64, multiple=8)


# ----------------------------------------------------------------------------------------------------------
# Collate
# ----------------------------------------------------------------------------------------------------------


def fake_sample(count, size=(8, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand((3, *size), generator=g) * 2 - 1, "prompt": f"prompt {seed}",
            "entity_prompts": [f"e{seed}.{k}" for k in range(count)],
            "entity_masks": torch.rand((count, *size), generator=g) > 0.5}


def test_collate_pads_entities_with_inert_slots():
    samples = [fake_sample(0, seed=0), fake_sample(1, seed=1), fake_sample(3, seed=2)]
    batch = collate(samples)
    assert batch["images"].shape == (3, 3, 8, 12)
    assert torch.equal(batch["images"][1], samples[1]["image"])
    assert batch["prompts"] == ["prompt 0", "prompt 1", "prompt 2"]
    assert batch["entity_prompts"] == [["", "", ""], ["e1.0", "", ""], ["e2.0", "e2.1", "e2.2"]]
    assert batch["entity_counts"] == [0, 1, 3]
    masks = batch["entity_masks"]
    assert masks.shape == (3, 3, 8, 12) and masks.dtype == torch.bool
    assert not masks[0].any() and not masks[1, 1:].any()
    assert torch.equal(masks[1, :1], samples[1]["entity_masks"])
    assert torch.equal(masks[2], samples[2]["entity_masks"])


def test_collate_without_entities_and_mixed_buckets():
    batch = collate([fake_sample(0), fake_sample(0, seed=1)])
    assert batch["entity_masks"].shape == (2, 0, 8, 12) and batch["entity_prompts"] == [[], []]
    with pytest.raises(ValueError, match="one bucket"):
        collate([fake_sample(1), fake_sample(1, size=(12, 8))])


def test_data_loader_end_to_end(scene_file):
    dataset = EntityDataset(scene_file, resolution=64, multiple=8, buckets=False)
    sampler = BucketBatchSampler(dataset, batch_size=3, drop_last=False)
    batches = list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    assert sorted(len(b["prompts"]) for b in batches) == [1, 3]
    assert all(b["images"].shape[1:] == (3, 64, 64) for b in batches)
    assert sorted(c for b in batches for c in b["entity_counts"]) == [2, 2, 4, 4]


# ----------------------------------------------------------------------------------------------------------
# BucketBatchSampler
# ----------------------------------------------------------------------------------------------------------


class FakeBuckets:
    """Stands in for EntityDataset: only ``__len__`` and ``bucket_of`` are used by the sampler."""

    def __init__(self, sizes):
        self.labels = [bucket for bucket, count in sizes.items() for _ in range(count)]
        self.labels = [self.labels[i] for i in torch.randperm(len(self.labels), generator=torch.Generator()
                                                                  .manual_seed(7)).tolist()]

    def __len__(self):
        return len(self.labels)

    def bucket_of(self, index):
        return self.labels[index]


DATA = FakeBuckets({(64, 64): 10, (48, 80): 8, (80, 48): 5})


def test_batches_are_single_bucket_and_cover_every_index():
    sampler = BucketBatchSampler(DATA, batch_size=3, drop_last=False)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 + 3 + 2
    assert all(len({DATA.bucket_of(i) for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(DATA)))
    dropped = BucketBatchSampler(DATA, batch_size=3, drop_last=True)
    batches = list(dropped)
    assert len(batches) == len(dropped) == 3 + 2 + 1 and all(len(b) == 3 for b in batches)
    assert len({i for b in batches for i in b}) == 18


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = BucketBatchSampler(DATA, 3, seed=5), BucketBatchSampler(DATA, 3, seed=5)
    assert list(a) == list(b)  # both at epoch 0
    epoch0 = BucketBatchSampler(DATA, 3, seed=5).batches(0)
    epoch1 = BucketBatchSampler(DATA, 3, seed=5).batches(1)
    other_seed = BucketBatchSampler(DATA, 3, seed=6).batches(0)
    assert epoch0 != epoch1 and epoch0 != other_seed
    assert sorted(map(sorted, epoch0)) != sorted(map(sorted, epoch1))  # the shuffle is within buckets too
    c = BucketBatchSampler(DATA, 3, seed=5)
    c.set_epoch(1)
    assert list(c) == epoch1
    assert list(c) == BucketBatchSampler(DATA, 3, seed=5).batches(2)  # an exhausted epoch moves on


def stream(sampler):
    """Batches forever, the way the trainer drives the sampler: an epoch, then set_epoch(epoch + 1)."""
    while True:
        yield from sampler
        sampler.set_epoch(sampler.state_dict()["epoch"] + 1)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("consumed", [0, 1, 4, 6, 7, 13])
def test_sampler_resumes_exactly(consumed):
    reference = BucketBatchSampler(DATA, 3, seed=3)
    reference.set_epoch(2)
    full = take(stream(reference), 16)  # 6 batches per epoch: epochs 2, 3 and part of 4
    assert full[:6] == reference.batches(2) and full[6:12] == reference.batches(3)
    interrupted = BucketBatchSampler(DATA, 3, seed=3)
    interrupted.set_epoch(2)
    head = take(stream(interrupted), consumed)
    state = interrupted.state_dict()
    finished = max(0, consumed - 1) // 6  # epochs completed before the last batch taken
    assert state == {"epoch": 2 + finished, "position": consumed - 6 * finished}
    resumed = BucketBatchSampler(DATA, 3, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # re-announcing the current epoch keeps the position
    assert head + take(stream(resumed), 16 - consumed) == full


def test_sampler_resumes_through_a_data_loader():
    dataset = torch.utils.data.TensorDataset(torch.arange(len(DATA)))
    dataset.bucket_of = DATA.bucket_of
    sampler = BucketBatchSampler(dataset, 3, seed=1)
    full = [b[0].tolist() for b in torch.utils.data.DataLoader(dataset, batch_sampler=sampler)]
    sampler = BucketBatchSampler(dataset, 3, seed=1)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler))
    head = [next(loader)[0].tolist() for _ in range(2)]
    resumed = BucketBatchSampler(dataset, 3, seed=1)
    resumed.load_state_dict(sampler.state_dict())
    tail = [b[0].tolist() for b in torch.utils.data.DataLoader(dataset, batch_sampler=resumed)]
    assert head + tail == full


def test_sharding_partitions_the_global_order():
    whole = BucketBatchSampler(DATA, 3, seed=2, drop_last=False).batches(4)
    shards = [BucketBatchSampler(DATA, 3, seed=2, drop_last=False, rank=r, world_size=2) for r in range(2)]
    for shard in shards:
        shard.set_epoch(4)
    parts = [list(s) for s in shards]
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    assert sorted(parts[0] + parts[1]) == sorted(whole)
    assert [len(s) for s in shards] == [len(p) for p in parts]
    equal = [BucketBatchSampler(DATA, 3, seed=2, drop_last=True) for _ in range(2)]
    for rank, sampler in enumerate(equal):
        sampler.shard(rank, 2)
    parts = [list(s) for s in equal]
    assert [len(p) for p in parts] == [3, 3]  # 6 full batches split evenly
    assert not set(map(tuple, parts[0])) & set(map(tuple, parts[1]))


def test_sampler_rejects_impossible_settings():
    with pytest.raises(ValueError, match="no batches"):
        BucketBatchSampler(DATA, batch_size=11)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(DATA, 3, rank=2, world_size=2)
    sampler = BucketBatchSampler(DATA, 3)
    with pytest.raises(ValueError, match="position"):
        sampler.load_state_dict({"epoch": 0, "position": 99})

"""Scoring maths of the benchmark harness on constructed cases: perfect images score 1, empty ones 0, boxes at the
wrong resolution are rescaled or refused (never silently wrong), colours and IoUs against independent references."""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
from PIL import Image

from eligen.evals import cocomig, layoutsam
from eligen.evals.boxes import box_iou, crop_bounds, nms, pixel_box, rescale_box
from eligen.evals.colour import HSV_RANGES, colour_fraction, rgb_to_hsv8
from eligen.evals.layouts import BenchEntity, BenchLayout, layoutsam_layout, mig_entity, read_cocomig

RGB = {"red": (220, 20, 20), "blue": (20, 40, 220), "green": (30, 200, 40), "yellow": (230, 220, 30),
       "black": (10, 10, 10), "white": (250, 250, 250), "brown": (150, 75, 20)}


def test_hsv_is_within_one_step_of_colorsys():
    """OpenCV's fixed-point HSV (tests/test_evals_protocols.py pins it exactly) stays within one step of the float
    formula."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(500, 3))
    ours = rgb_to_hsv8(pixels.astype(np.uint8))
    for (r, g, b), (h, s, v) in zip(pixels, ours, strict=True):
        rh, rs, rv = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        assert min(abs(h - rh * 180), 180 - abs(h - rh * 180)) <= 1
        assert abs(s - rs * 255) <= 1 and v == round(rv * 255)


@pytest.mark.parametrize("name", sorted(RGB))
def test_each_named_colour_is_found_and_only_its_own(name):
    patch = np.full((4, 4, 3), RGB[name], dtype=np.uint8)
    assert colour_fraction(patch, name) == 1.0
    others = [c for c in HSV_RANGES if c != name and colour_fraction(patch, c) > 0]
    assert others == []
    with pytest.raises(ValueError, match="unknown COCO-MIG colour"):
        colour_fraction(patch, "purple")


def test_box_iou_and_nms_against_pixel_counts():
    a, b = (2, 2, 10, 8), (5, 4, 12, 12)
    grid = np.zeros((16, 16, 2), dtype=bool)
    grid[2:8, 2:10, 0] = True
    grid[4:12, 5:12, 1] = True
    expected = (grid[..., 0] & grid[..., 1]).sum() / (grid[..., 0] | grid[..., 1]).sum()
    assert box_iou(a, [b])[0] == pytest.approx(expected)
    assert box_iou(a, [(20, 20, 30, 30)])[0] == 0.0
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9.5], [20, 20, 30, 30]], dtype=float)
    assert nms(boxes, np.array([0.5, 0.9, 0.3]), 0.8) == [1, 2]


def test_boxes_at_the_wrong_resolution_are_rescaled_or_refused():
    box = (100.0, 200.0, 400.0, 600.0)  # drawn for a 1024 x 1024 image
    assert rescale_box(box, (1024, 1024), (512, 512)) == (50.0, 100.0, 200.0, 300.0)
    assert rescale_box(box, (1024, 1024), (1024, 1024)) == box
    with pytest.raises(ValueError, match="another aspect ratio"):
        rescale_box(box, (1024, 1024), (512, 256))
    assert pixel_box((0.25, 0.5, 0.75, 1.0), 64, 32) == (16.0, 16.0, 48.0, 32.0)
    assert crop_bounds((15.5, 3.2, 48.1, 40.0), 64, 32) == (15, 3, 49, 32)


class _CropJudge:
    """A judge that sees: 'Yes' when most of the crop is not the white background, to every question."""

    convention = "auto"

    def __init__(self):
        self.questions = []

    def ask(self, prompt, image=None):
        self.questions.append(prompt)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        return "Yes." if (pixels.min(axis=1) < 200).mean() > 0.5 else "No, it is not."


def _layout(entities):
    return BenchLayout(index=0, key="k", prompt="a picture", entities=tuple(entities))


def _painted(size, boxes, colours):
    image = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    for (x0, y0, x1, y1), colour in zip(boxes, colours, strict=True):
        image[int(y0):int(y1), int(x0):int(x1)] = RGB[colour]
    return Image.fromarray(image)


def test_layoutsam_perfect_image_scores_1_and_empty_image_0():
    entities = [BenchEntity("a red cube", (0.1, 0.1, 0.4, 0.5), "cube", "a red cube, shiny"),
                BenchEntity("a blue ball", (0.5, 0.5, 0.9, 0.9), "ball", "a blue ball")]
    size = (64, 48)
    boxes = [pixel_box(e.box, *size) for e in entities]
    perfect = _painted(size, boxes, ["red", "blue"])
    judge = _CropJudge()
    rows = [{"layout": 0, **layoutsam.score_entity(judge, perfect.crop(crop_bounds(b, *size)), e)}
            for e, b in zip(entities, boxes, strict=True)]
    assert layoutsam.summarise(rows) == {"spatial": 100.0, "colour": 100.0, "texture": 100.0, "shape": 100.0,
                                         "boxes": 2, "layouts": 1}
    assert len(judge.questions) == 8 and '"cube"' in judge.questions[0] and "shiny" in judge.questions[1]
    empty, judge = Image.new("RGB", size, "white"), _CropJudge()
    rows = [{"layout": 0, **layoutsam.score_entity(judge, empty.crop(crop_bounds(b, *size)), e)}
            for e, b in zip(entities, boxes, strict=True)]
    assert layoutsam.summarise(rows)["spatial"] == 0 and layoutsam.summarise(rows)["shape"] == 0
    assert len(judge.questions) == 2  # attributes are asked only of boxes judged present


def test_layoutsam_boxes_scaled_for_another_size_would_miss():
    """The benchmark's pitfall: a 1024-scaled box on a 512 image crops the wrong place; rescaled it is right."""
    entity = BenchEntity("a red cube", (0.0, 0.0, 0.3, 0.3), "cube", "a red cube")
    drawn = pixel_box(entity.box, 1024, 1024)
    image = _painted((512, 512), [pixel_box(entity.box, 512, 512)], ["red"])
    wrong = image.crop(crop_bounds((drawn[0] + 400, drawn[1] + 400, drawn[2] + 400, drawn[3] + 400), 512, 512))
    assert layoutsam.score_entity(_CropJudge(), wrong, entity)["spatial"] == 0.0
    right = image.crop(crop_bounds(rescale_box(drawn, (1024, 1024), (512, 512)), 512, 512))
    assert layoutsam.score_entity(_CropJudge(), right, entity)["spatial"] == 1.0


def test_yes_no_answers_are_read_as_the_protocol_reads_them():
    """CreatiLayout's reading: "Yes" or "yes" anywhere in the answer."""
    assert layoutsam.is_yes("Yes") and layoutsam.is_yes("yes, it is") and layoutsam.is_yes("**Yes**.")
    assert not layoutsam.is_yes("No") and not layoutsam.is_yes("maybe") and not layoutsam.is_yes("")
    assert not layoutsam.is_yes("YES")  # neither "Yes" nor "yes" occurs in it
    assert layoutsam.is_yes("No. Yes?") and layoutsam.is_yes("No, the eyes are closed.")  # "yes" inside "eyes"


class _ExactDetector:
    def __init__(self, boxes_by_name):
        self.boxes = boxes_by_name

    def detect(self, image, label):
        return [(tuple(b), 0.9) for b in self.boxes.get(label, [])]


def _box_mask(size):
    """A fake SAM whose best mask is the box itself."""
    def segment(box):
        mask = np.zeros((size[1], size[0]), dtype=bool)
        mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
        return mask
    return segment


def _mig_rows(layout, image, detector, size):
    pixels = np.asarray(image)
    rows = []
    for entity in layout.entities:
        box = pixel_box(entity.box, *size)
        rows.append({"layout": layout.index, "level": layout.level,
                     **cocomig.score_instance(detector.detect(image, entity.name), box, pixels, entity.colour,
                                              _box_mask(size))})
    return rows


def test_cocomig_perfect_image_scores_1_and_empty_image_0():
    layout = _layout([mig_entity("a red apple", (0.1, 0.1, 0.4, 0.4), "t"),
                      mig_entity("a green apple", (0.5, 0.5, 0.9, 0.9), "t"),
                      mig_entity("a black cat", (0.5, 0.0, 1.0, 0.3), "t")])
    size = (64, 64)
    boxes = [pixel_box(e.box, *size) for e in layout.entities]
    perfect = _painted(size, boxes, ["red", "green", "black"])
    detector = _ExactDetector({"apple": boxes[:2], "cat": boxes[2:]})
    summary = cocomig.summarise(_mig_rows(layout, perfect, detector, size))
    assert summary["all"] == {"isr": 100.0, "sr": 100.0, "miou": 100.0, "instances": 3, "images": 1}
    assert summary["L3"]["isr"] == 100.0 and summary["L2"]["instances"] == 0
    empty = cocomig.summarise(_mig_rows(layout, Image.new("RGB", size, "white"), _ExactDetector({}), size))
    assert empty["all"] == {"isr": 0.0, "sr": 0.0, "miou": 0.0, "instances": 3, "images": 1}
    table = cocomig.format_table(summary, "run")
    assert "| EliGen, published | 64.12 | 26.00 | 59.23 |" in table
    assert "| run, L3 | 100.00 | 100.00 | 100.00 | 3 | 1 |" in table


def test_cocomig_wrong_colour_and_near_miss():
    layout = _layout([mig_entity("a red apple", (0.0, 0.0, 0.5, 0.5), "t"),
                      mig_entity("a blue bus", (0.5, 0.5, 1.0, 1.0), "t")])
    size = (40, 40)
    boxes = [pixel_box(e.box, *size) for e in layout.entities]
    image = _painted(size, boxes, ["green", "blue"])  # the apple is painted green
    shifted = (boxes[1][0] + 8, boxes[1][1] + 8, boxes[1][2] + 8, boxes[1][3] + 8)  # IoU (12*12)/(2*400-144) < 0.5
    rows = _mig_rows(layout, image, _ExactDetector({"apple": [boxes[0]], "bus": [shifted]}), size)
    assert rows[0]["detected"] and not rows[0]["colour_ok"] and rows[0]["miou"] == 0.0
    assert not rows[1]["detected"] and rows[1]["miou"] == pytest.approx(144 / 656)
    summary = cocomig.summarise(rows)["all"]
    assert summary["isr"] == 0.0 and summary["miou"] == pytest.approx(100 * 144 / 656 / 2)


def test_layoutsam_rows_parse_like_the_dataset():
    row = {"global_caption": "a room", "bbox_list": "[[0, 0, 50, 100], [100, 50, 200, 100]]",
           "region_captions": "['a lamp', 'a sofa']", "detail_region_captions": ["a tall lamp", "a red sofa"],
           "width": 200, "height": 100, "file_name": "x.jpg"}
    layout = layoutsam_layout(3, row)
    assert layout.key == "x.jpg" and [e.box for e in layout.entities] == [(0, 0, 0.25, 1.0), (0.5, 0.5, 1.0, 1.0)]
    assert [(e.name, e.prompt) for e in layout.entities] == [("a lamp", "a tall lamp"), ("a sofa", "a red sofa")]
    with pytest.raises(ValueError, match="row 3: missing field"):
        layoutsam_layout(3, {k: v for k, v in row.items() if k != "width"})
    with pytest.raises(ValueError, match="must match one to one"):
        layoutsam_layout(3, {**row, "region_captions": "['a lamp']"})


def test_cocomig_json_form_and_bad_colour(tmp_path):
    path = tmp_path / "mig.json"
    path.write_text(json.dumps({"7": {"caption": "a photo of a black bird and a white bird",
                                      "segment": [{"label": "black bird", "bbox": [0.1, 0.2, 0.3, 0.4]},
                                                  {"label": "white bird", "bbox": [0.5, 0.5, 0.7, 0.9]}]}}))
    (layout,) = read_cocomig(path)
    assert layout.level == 2 and [(e.name, e.colour) for e in layout.entities] == [("bird", "black"),
                                                                                     ("bird", "white")]
    with pytest.raises(ValueError, match="does not start with one of COCO-MIG's colours"):
        mig_entity("a purple bird", (0, 0, 1, 1), "here")

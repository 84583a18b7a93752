"""Parsing grounding-VLM answers (Qwen2-VL tags, Qwen2.5-VL JSON) into validated EliGen entities."""

from __future__ import annotations

import json
import math
import string
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from eligen.data.parse import (
    ANNOTATE_INSTRUCTIONS,
    ANNOTATE_INSTRUCTIONS_QWEN2,
    PLAN_INSTRUCTIONS,
    Annotation,
    GroundedEntity,
    ParseError,
    box_iou,
    extract_caption,
    parse_annotation,
    parse_plan,
    parse_qwen2_boxes,
    parse_qwen25_json,
    validate_entities,
)
from eligen.entities import Layout, LayoutError

W, H = 1280, 720  # non-square on purpose: x scales by 1.28, y by 0.72

QWEN2_ANSWER = """Caption: A wooden table with a red apple and two blue mugs in soft morning light.
<|object_ref_start|>a red apple<|object_ref_end|><|box_start|>(123,456),(789,1000)<|box_end|>
<|object_ref_start|> a blue mug <|object_ref_end|> <|box_start|>( 10 , 20 ) , ( 300 , 400 )<|box_end|>\
<|box_start|>(500,500),(600,600)<|box_end|>
"""

QWEN25_ANSWER = """Here are the objects I found:
```json
[
  {"bbox_2d": [10, 20, 300, 400], "label": "a red apple"},
  {"bbox_2d": [400, 100, 1000, 700], "prompt": "a blue mug"},
  {"bbox_2d": [0, 0, 1280, 200], "description": "a pale sky"}
]
```
Caption: A wooden table in the morning.
Let me know if you need anything else."""


def _boxes(entities):
    return [(e.prompt, tuple(e.box)) for e in entities]


# ----------------------------------------------------------------------------------------------------------
# Qwen2-VL
# ----------------------------------------------------------------------------------------------------------


def test_qwen2_tags_scale_the_1000_grid_to_pixels_exactly():
    entities = parse_qwen2_boxes(QWEN2_ANSWER, W, H)
    assert _boxes(entities) == [
        ("a red apple", (157.44, 328.32, 1009.92, 720.0)),
        ("a blue mug", (12.8, 14.4, 384.0, 288.0)),
        ("a blue mug", (640.0, 360.0, 768.0, 432.0)),  # a second box after the same ref shares its label
    ]


def test_qwen2_labels_without_ref_tags_come_from_the_same_line():
    text = ("1. a red apple: <|box_start|>(0,0),(500,500)<|box_end|>\n"
            "- the blue mug (500,500),(1000,1000)\n"  # box tags stripped by a server that skips special tokens
            "<|box_start|>(100,100),(200,200)<|box_end|>\n")  # no label on its line: empty prompt
    entities = parse_qwen2_boxes(text, 1000, 500)
    assert _boxes(entities) == [("a red apple", (0.0, 0.0, 500.0, 250.0)),
                                ("the blue mug", (500.0, 250.0, 1000.0, 500.0)),
                                ("", (100.0, 50.0, 200.0, 100.0))]
    assert [e.prompt for e in validate_entities(entities, 1000, 500)] == ["a red apple", "the blue mug"]


def test_qwen2_ref_label_wins_over_text_between_ref_and_box():
    text = "<|object_ref_start|>cat<|object_ref_end|> is sitting at <|box_start|>(0,0),(10,10)<|box_end|>"
    assert _boxes(parse_qwen2_boxes(text, 1000, 1000)) == [("cat", (0.0, 0.0, 10.0, 10.0))]


def test_qwen2_swapped_corners_are_sorted_and_decimals_accepted():
    text = "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(500.5,900),(100,100.25)<|box_end|>"
    assert _boxes(parse_qwen2_boxes(text, 2000, 400)) == [("dog", (200.0, 40.1, 1001.0, 360.0))]


def test_qwen2_without_boxes_is_a_parse_error_quoting_the_answer():
    with pytest.raises(ParseError, match=r"0-1000 grid.*'I cannot see any objects\.'"):
        parse_qwen2_boxes("I cannot see any objects.", W, H)


# ----------------------------------------------------------------------------------------------------------
# Qwen2.5-VL
# ----------------------------------------------------------------------------------------------------------


def test_qwen25_json_in_fences_with_prose_and_label_aliases():
    assert _boxes(parse_qwen25_json(QWEN25_ANSWER, W, H)) == [
        ("a red apple", (10.0, 20.0, 300.0, 400.0)),
        ("a blue mug", (400.0, 100.0, 1000.0, 700.0)),
        ("a pale sky", (0.0, 0.0, 1280.0, 200.0)),
    ]


def test_qwen25_wrapper_object_bare_json_and_nested_corner_pairs():
    wrapped = json.dumps({"caption": "c", "entities": [{"label": "a", "bbox_2d": [1, 2, 30, 40]}]})
    assert _boxes(parse_qwen25_json(wrapped, 100, 100)) == [("a", (1.0, 2.0, 30.0, 40.0))]
    pairs = '[{"bbox_2d": [[50, 60], [5, 6]], "label": "b"}]'
    assert _boxes(parse_qwen25_json(pairs, 100, 100)) == [("b", (5.0, 6.0, 50.0, 60.0))]


def test_qwen25_truncated_list_keeps_its_complete_objects():
    text = '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "a"}, {"bbox_2d": [5, 5, 50, 50], "label": "b"}, {"bbox_2d'
    assert _boxes(parse_qwen25_json(text, 100, 100)) == [("a", (1.0, 2.0, 30.0, 40.0)), ("b", (5.0, 5.0, 50.0, 50.0))]


def test_qwen25_model_size_rescales_to_the_original_image():
    text = '[{"bbox_2d": [28, 56, 280, 560], "label": "a"}]'
    entities = parse_qwen25_json(text, 1000, 2000, model_size=(280, 560))
    assert _boxes(entities) == [("a", (100.0, 200.0, 1000.0, 2000.0))]


def test_qwen25_rejects_non_finite_and_malformed_boxes():
    text = ('[{"bbox_2d": [NaN, 0, 10, 10], "label": "nan"}, {"bbox_2d": [0, 0, Infinity, 10], "label": "inf"},'
            ' {"bbox_2d": [0, 0, 1e999, 10], "label": "overflow"}, {"bbox_2d": [0, 0, ' + "9" * 400 + ', 10],'
            ' "label": "huge int"}, {"bbox_2d": [0, 0, 10], "label": "three"}, {"bbox_2d": "0 0 10 10",'
            ' "label": "string"}, {"bbox_2d": [0, 0, true, 10], "label": "bool"}, {"bbox_2d": [1, 1, 9, 9],'
            ' "label": "ok"}]')
    assert _boxes(parse_qwen25_json(text, 100, 100)) == [("ok", (1.0, 1.0, 9.0, 9.0))]


def test_qwen25_without_boxes_is_a_parse_error():
    with pytest.raises(ParseError, match=r'bbox_2d.*\[\{"label": "a"\}\]'):
        parse_qwen25_json('[{"label": "a"}]', 100, 100)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def test_validate_clips_drops_degenerate_empty_and_duplicate_entities_and_keeps_order():
    entities = [
        GroundedEntity("  an apple ", (-50.0, -10.0, 100.0, 60.0)),  # clipped, prompt stripped
        GroundedEntity("a mug", (50.0, 10.0, 51.5, 70.0)),  # 1.5 px wide: degenerate
        GroundedEntity("a plate", (95.0, 50.0, 300.0, 60.0)),  # clipped to 5 px wide: kept
        GroundedEntity("   ", (10.0, 10.0, 50.0, 50.0)),  # empty prompt
        GroundedEntity("AN APPLE", (0.0, 0.0, 99.0, 60.0)),  # same prompt, IoU 0.99: duplicate
        GroundedEntity("an apple", (0.0, 0.0, 50.0, 60.0)),  # same prompt, IoU 0.5: a second apple
        GroundedEntity("a pear", (0.0, 0.0, 100.0, 60.0)),  # same box, other prompt: kept
        GroundedEntity("a fork", (120.0, 10.0, 140.0, 40.0)),  # entirely outside: nothing left
        GroundedEntity("a nan", (math.nan, 0.0, 10.0, 10.0)),
        GroundedEntity("an inf", (0.0, 0.0, math.inf, 10.0)),
    ]
    kept = validate_entities(entities, 100, 80)
    assert _boxes(kept) == [("an apple", (0.0, 0.0, 100.0, 60.0)), ("a plate", (95.0, 50.0, 100.0, 60.0)),
                            ("an apple", (0.0, 0.0, 50.0, 60.0)), ("a pear", (0.0, 0.0, 100.0, 60.0))]
    assert [e.prompt for e in validate_entities(entities, 100, 80, max_entities=2)] == ["an apple", "a plate"]
    assert validate_entities(entities, 100, 80, max_entities=0) == []
    assert [e.prompt for e in validate_entities(entities, 100, 80, min_size=1.0)][:2] == ["an apple", "a mug"]


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


# ----------------------------------------------------------------------------------------------------------
# Whole answers, captions, records and layouts
# ----------------------------------------------------------------------------------------------------------


def test_parse_annotation_qwen2_caption_line():
    for convention in ("qwen2", "auto"):
        annotation = parse_annotation(QWEN2_ANSWER, W, H, convention)
        assert annotation.caption == "A wooden table with a red apple and two blue mugs in soft morning light."
        assert _boxes(annotation.entities) == [("a red apple", (157.44, 328.32, 1009.92, 720.0)),
                                               ("a blue mug", (12.8, 14.4, 384.0, 288.0)),
                                               ("a blue mug", (640.0, 360.0, 768.0, 432.0))]


def test_parse_annotation_qwen25_caption_line_after_fenced_json():
    for convention in ("qwen25", "auto"):
        annotation = parse_annotation(QWEN25_ANSWER, W, H, convention, max_entities=2)
        assert annotation.caption == "A wooden table in the morning."
        assert [e.prompt for e in annotation.entities] == ["a red apple", "a blue mug"]


def test_parse_annotation_json_caption_field_clips_and_dedupes():
    text = json.dumps({"caption": "  Two cats on a sofa. ", "entities": [
        {"label": "a grey cat", "bbox_2d": [-20, 10, 300, 250]},
        {"label": "A grey cat", "bbox_2d": [0, 10, 301, 250]},
        {"label": "", "bbox_2d": [10, 10, 100, 100]},
        {"label": "a tabby cat", "bbox_2d": [350, 100, 700, 900]},
        {"label": "a speck", "bbox_2d": [5, 5, 6, 50]},
    ]})
    annotation = parse_annotation(text, 640, 480)
    assert annotation.caption == "Two cats on a sofa."
    assert _boxes(annotation.entities) == [("a grey cat", (0.0, 10.0, 300.0, 250.0)),
                                           ("a tabby cat", (350.0, 100.0, 640.0, 480.0))]


@pytest.mark.parametrize("text", ["**Caption:** A red barn.\n(0,0),(10,10)",
                                  "caption:\n  A red barn.  \nbarn (0,0),(10,10)",
                                  '{"caption": "A red barn.", "entities": [{"label": "barn", "bbox_2d": [0, 0',
                                  '[{"caption": "no"}]\n{"caption": "A red barn."}'])
def test_caption_extraction(text):
    assert extract_caption(text) == "A red barn."


def test_parse_annotation_errors():
    boxes_only = "<|object_ref_start|>a<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>"
    with pytest.raises(ParseError, match="caption"):
        parse_annotation(boxes_only, 100, 100)
    with pytest.raises(ParseError, match="at least one entity"):
        parse_annotation("Caption: x\n" + boxes_only.replace(">a<", "> <"), 100, 100)
    with pytest.raises(ParseError, match="bbox_2d"):  # JSON only: the Qwen2 tags are not read
        parse_annotation("Caption: x\n" + boxes_only, 100, 100, "qwen25")
    with pytest.raises(ParseError, match="string"):
        parse_annotation(None, 100, 100)
    with pytest.raises(ValueError, match="convention"):
        parse_annotation("Caption: x", 100, 100, "qwen3")


def test_auto_falls_back_to_qwen2_when_the_json_holds_no_valid_entity():
    text = ('Caption: a dog\n[{"bbox_2d": [0, 0, 0, 0], "label": "nothing"}]\n'
            "<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>")
    assert _boxes(parse_annotation(text, 100, 100).entities) == [("a dog", (0.0, 0.0, 50.0, 50.0))]


@pytest.mark.parametrize("text", ["[" * 100_000, "[" * 5_000 + "]" * 5_000, '{"a": ' * 50_000,
                                  "<|object_ref_start|>" * 50_000, "(" + "9" * 50_000 + ",1),(2,3)",
                                  '[{"bbox_2d": [0, 0, ' + "9" * 10_000 + ', 5], "label": "a"}]'])
def test_pathological_answers_fail_cleanly_and_fast(text):
    start = time.perf_counter()
    with pytest.raises(ParseError):
        parse_annotation(text, 100, 100)
    assert time.perf_counter() - start < 5.0


def test_parse_error_message_is_short():
    with pytest.raises(ParseError) as info:
        parse_annotation("x" * 10_000, 100, 100)
    assert len(str(info.value)) < 700 and "xxx..." in str(info.value)


def test_to_record_is_read_by_the_trainer(tmp_path):
    from eligen.train.data import EntityDataset

    Image.new("RGB", (W, H), "white").save(tmp_path / "img.png")
    annotation = parse_annotation(QWEN2_ANSWER, W, H)
    record = annotation.to_record("img.png")
    assert record == {"image": "img.png",
                      "prompt": "A wooden table with a red apple and two blue mugs in soft morning light.",
                      "entities": [{"prompt": "a red apple", "box": [157.44, 328.32, 1009.92, 720.0]},
                                   {"prompt": "a blue mug", "box": [12.8, 14.4, 384.0, 288.0]},
                                   {"prompt": "a blue mug", "box": [640.0, 360.0, 768.0, 432.0]}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    dataset = EntityDataset(tmp_path / "data.jsonl", resolution=64, multiple=16, max_bad_fraction=0.0)
    assert dataset.stats.bad == 0 and len(dataset) == 1
    item = dataset[0]
    assert item["prompt"] == record["prompt"]
    assert item["entity_prompts"] == ["a red apple", "a blue mug", "a blue mug"]
    assert item["entity_masks"].shape[0] == 3 and all(bool(m.any()) for m in item["entity_masks"])


def test_to_layout_validates():
    layout = parse_annotation(QWEN25_ANSWER, W, H).to_layout(W, H)
    assert isinstance(layout, Layout) and (layout.width, layout.height) == (W, H)
    layout.validate()
    assert [(e.prompt, list(e.box)) for e in layout.entities] == [("a red apple", [10.0, 20.0, 300.0, 400.0]),
                                                                  ("a blue mug", [400.0, 100.0, 1000.0, 700.0]),
                                                                  ("a pale sky", [0.0, 0.0, 1280.0, 200.0])]
    with pytest.raises(LayoutError):  # the boxes do not fit a much smaller image
        Annotation("c", [GroundedEntity("a", (500.0, 500.0, 600.0, 600.0))]).to_layout(100, 100)


# ----------------------------------------------------------------------------------------------------------
# Instructions and plans
# ----------------------------------------------------------------------------------------------------------


def test_instruction_examples_parse_with_their_parsers():
    annotate = ANNOTATE_INSTRUCTIONS.format(max_entities=7)
    assert "up to 7 " in annotate
    example = annotate[annotate.index("```json"):]
    annotation = parse_annotation(example, 512, 512, "qwen25")
    assert annotation.caption.startswith("a wooden table")
    assert _boxes(annotation.entities) == [("a red apple with a leaf", (120.0, 340.0, 260.0, 470.0)),
                                           ("a blue ceramic mug", (300.0, 280.0, 420.0, 460.0))]
    qwen2 = ANNOTATE_INSTRUCTIONS_QWEN2.format(max_entities=3)
    assert "up to 3 " in qwen2 and "<|box_start|>" in qwen2
    plan = PLAN_INSTRUCTIONS.format(prompt="a cat on a mat", width=1024, height=768, max_entities=4)
    assert "a cat on a mat" in plan and "1024x768" in plan and "up to 4 " in plan


def test_parse_plan():
    text = """Here is the plan:
```json
{"caption": "A ginger cat asleep on a woven mat by a sunny window.",
 "entities": [{"label": "a ginger cat", "bbox_2d": [300, 400, 700, 650]},
              {"label": "a woven mat", "bbox_2d": [150, 550, 900, 800]},
              {"label": "a sunny window", "bbox_2d": [600, 0, 1024, 300]}]}
```"""
    plan = parse_plan(text, 1024, 768)
    assert plan.caption == "A ginger cat asleep on a woven mat by a sunny window."
    assert _boxes(plan.entities) == [("a ginger cat", (300.0, 400.0, 700.0, 650.0)),
                                     ("a woven mat", (150.0, 550.0, 900.0, 768.0)),
                                     ("a sunny window", (600.0, 0.0, 1024.0, 300.0))]
    plan.to_layout(1024, 768).validate()
    alias = parse_plan('{"prompt": "a mat", "entities": [{"prompt": "mat", "bbox_2d": [0, 0, 10, 10]}]}', 64, 64)
    assert (alias.caption, _boxes(alias.entities)) == ("a mat", [("mat", (0.0, 0.0, 10.0, 10.0))])
    with pytest.raises(ParseError):
        parse_plan("<|object_ref_start|>a<|object_ref_end|><|box_start|>(0,0),(5,5)<|box_end|>", 64, 64)


# ----------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------

FRAGMENTS = ["<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "(", ")", ",", " ",
             "\n", '{"bbox_2d": [', '"label": ', '"prompt": ', '"caption": ', '{"caption": "x", "entities": [',
             "[", "]", "{", "}", '"', "'", ":", "Caption:", "```json", "```", "apple", "a red mug", "NaN",
             "Infinity", "-Infinity", "1e999", "9" * 400, "-0", ".5", "1.", "true", "null",
             # whole pieces, so that some answers parse (and then must be valid)
             "Caption: a cat\n", "<|box_start|>(100,200),(300,400)<|box_end|>", "(-50,900),(1500,20)",
             '{"bbox_2d": [10, 20, 300, 400], "label": "a cat"}', '"bbox_2d": [-9, 5, 99999, 7]', '"label": "x"}']
NUMBERS = st.one_of(st.integers(-(10**30), 10**30).map(str), st.floats().map(repr), st.integers(0, 1000).map(str))
FRAGMENT_TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), NUMBERS, st.text(max_size=4)), max_size=40).map(
    "".join)
SIZES = st.tuples(st.integers(1, 3000), st.integers(1, 3000))
BASE_ANSWERS = [QWEN2_ANSWER, QWEN25_ANSWER, QWEN2_ANSWER.replace("<|", "").replace("|>", ""),
                '{"caption": "a cat", "entities": [{"label": "a cat", "bbox_2d": [10, 20, 300, 400]}, '
                '{"label": "a hat", "bbox_2d": [-40, 0, 5000, 90]}]}']


@st.composite
def mangled_answers(draw):
    """A real answer with fragments inserted, spans deleted and an optional truncation."""
    text = draw(st.sampled_from(BASE_ANSWERS))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:position] + draw(st.one_of(st.sampled_from(FRAGMENTS), NUMBERS)) + text[position:]
        else:
            text = text[:position] + text[position + draw(st.integers(1, 20)):]
    return text[:draw(st.integers(0, len(text)))] if draw(st.booleans()) else text


def _assert_valid(annotation: Annotation, width: int, height: int) -> None:
    assert isinstance(annotation.caption, str) and annotation.caption.strip()
    assert annotation.entities
    for entity in annotation.entities:
        assert isinstance(entity.prompt, str) and entity.prompt and entity.prompt == entity.prompt.strip()
        x0, y0, x1, y1 = entity.box
        assert all(math.isfinite(v) for v in entity.box)
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    annotation.to_layout(width, height).validate()


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(), FRAGMENT_TEXT, mangled_answers()), size=SIZES,
       convention=st.sampled_from(["auto", "qwen2", "qwen25", "plan"]))
def test_any_text_gives_a_valid_annotation_or_a_parse_error(text, size, convention):
    width, height = size
    try:
        if convention == "plan":
            annotation = parse_plan(text, width, height)
        else:
            annotation = parse_annotation(text, width, height, convention)
    except ParseError:
        return
    _assert_valid(annotation, width, height)


@st.composite
def scenes(draw, grid: bool):
    """An image size, a caption and valid entities with distinct prompts (pixel boxes, integers unless grid)."""
    width, height = draw(st.integers(16, 2048)), draw(st.integers(16, 2048))
    # Room for 1000-grid rounding (half a grid step per corner) on top of the 2-pixel minimum size.
    margin_x, margin_y = (2 + width / 1000, 2 + height / 1000) if grid else (2, 2)
    alphabet = string.ascii_letters + " " if grid else st.characters(exclude_categories=["Cs"])
    prompt = st.text(alphabet=alphabet, min_size=1, max_size=20).map(str.strip).filter(bool)
    prompts = draw(st.lists(prompt, min_size=1, max_size=6, unique_by=str.casefold))
    entities = []
    for text in prompts:
        x0 = draw(st.integers(0, int(width - margin_x - 1)))
        y0 = draw(st.integers(0, int(height - margin_y - 1)))
        x1 = draw(st.integers(math.ceil(x0 + margin_x), width))
        y1 = draw(st.integers(math.ceil(y0 + margin_y), height))
        entities.append(GroundedEntity(text, (float(x0), float(y0), float(x1), float(y1))))
    caption = draw(st.text(alphabet=string.ascii_letters + " .,", min_size=1, max_size=40).map(str.strip)
                   .filter(bool))
    return width, height, caption, entities


def _render_qwen25(caption, entities, style):
    items = [{"bbox_2d": [int(v) for v in e.box], "label": e.prompt} for e in entities]
    if style == "wrapped":
        return json.dumps({"caption": caption, "entities": items}, indent=1)
    body = json.dumps(items, ensure_ascii=style == "fenced")
    if style == "fenced":
        return f"Sure, here are the entities.\n```json\n{body}\n```\nCaption: {caption}\n"
    return f"Caption: {caption}\nThe objects are {body} as requested."


def _render_qwen2(caption, entities, width, height, tags):
    lines = [f"Caption: {caption}"]
    for e in entities:
        x0, y0, x1, y1 = (round(v * 1000 / size) for v, size in zip(e.box, (width, height, width, height), strict=True))
        if tags:
            lines.append(f"<|object_ref_start|>{e.prompt}<|object_ref_end|><|box_start|>({x0},{y0}),({x1},{y1})"
                         "<|box_end|>")
        else:
            lines.append(f"{e.prompt}: ({x0}, {y0}), ({x1}, {y1})")
    return "\n".join(lines)


@settings(max_examples=200, deadline=None)
@given(scene=scenes(grid=False), style=st.sampled_from(["wrapped", "fenced", "prose"]),
       convention=st.sampled_from(["auto", "qwen25"]))
def test_qwen25_round_trip(scene, style, convention):
    width, height, caption, entities = scene
    annotation = parse_annotation(_render_qwen25(caption, entities, style), width, height, convention)
    assert annotation.caption == caption
    assert _boxes(annotation.entities) == _boxes(entities)


@settings(max_examples=200, deadline=None)
@given(scene=scenes(grid=True), tags=st.booleans(), convention=st.sampled_from(["auto", "qwen2"]))
def test_qwen2_round_trip(scene, tags, convention):
    width, height, caption, entities = scene
    annotation = parse_annotation(_render_qwen2(caption, entities, width, height, tags), width, height, convention)
    assert annotation.caption == caption
    assert [e.prompt for e in annotation.entities] == [e.prompt for e in entities]
    for parsed, original in zip(annotation.entities, entities, strict=True):
        for value, expected, size in zip(parsed.box, original.box, (width, height, width, height), strict=True):
            assert abs(value - expected) <= size / 2000 + 1e-9


def test_a_huge_answer_costs_linear_time_before_the_entity_cap():
    # a 3 MB answer with 60,000 distinct entities took over 300 s of CPU (every entity compared with every kept
    # one before the cap was applied); it must stay a second or two
    import time

    entities = [{"label": f"thing {i}", "bbox_2d": [i % 80, (i // 80) % 50, i % 80 + 3, (i // 80) % 50 + 5]}
                for i in range(60_000)]
    answer = json.dumps({"caption": "many things", "entities": entities})
    started = time.process_time()
    annotation = parse_annotation(answer, 84, 56, "qwen25", max_entities=8)
    assert len(annotation.entities) == 8
    assert time.process_time() - started < 15

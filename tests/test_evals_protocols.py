"""The scorers reproduce the benchmarks' own evaluation code (docs/design.md section 13) on fixtures worked out by hand:
COCO-MIG (MIG-Bench's eval_mig.py: OpenCV HSV, the active colour table, SAM on the ground-truth box, 512x512, its
accumulators), LayoutSAM-Eval (CreatiLayout's score_layoutsam_benchmark.py: questions, reading, crops, decoding) and
OverLayBench (its toolkit's prompts and metrics), plus the benchmarks' generation defaults."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from eligen.evals import cocomig, layoutsam, overlaybench
from eligen.evals.colour import HSV_RANGES, colour_fraction, colour_mask, mask_colour, rgb_to_hsv8
from eligen.evals.configs import LayoutSamConfig
from eligen.evals.generation import resolve_settings
from eligen.evals.judges import GREEDY, MINICPM_CHAT, MODEL_DEFAULTS, ServedJudge
from eligen.evals.layouts import BenchEntity, BenchLayout, mig_entity, overlaybench_layout, read_indices
from eligen.evals.resample import resize_like_opencv
from test_evals_harness import save_tiny_sam

# ------------------------------------------------------------------------------------------------------ COCO-MIG colour


def hsv(*rgb):
    return tuple(int(v) for v in rgb_to_hsv8(np.array([rgb], dtype=np.uint8))[0])


def test_hsv_is_opencvs_fixed_point_not_the_rounded_float():
    # (5, 37, 231): V = 231, diff = 226; S = (226 * round(1044480 / 231) + 2048) >> 12 = (226 * 4522 + 2048) >> 12
    # = 250, where the float formula gives 226 / 231 * 255 = 249.48 -> 249
    assert hsv(5, 37, 231)[1:] == (250, 231)
    # cyan (0, 255, 255): V = G, H = (B - R + 2 diff) * round(122880 / 255) = 765 * 482, + 2048, >> 12 = 90
    assert hsv(0, 255, 255) == (90, 255, 255)
    # (0, 255, 250): 760 * 482 + 2048 >> 12 = 89; (255, 80, 0): 80 * 482 + 2048 >> 12 = 9; (255, 81, 0): 10
    assert hsv(0, 255, 250)[0] == 89 and hsv(255, 80, 0)[0] == 9 and hsv(255, 81, 0)[0] == 10
    # a negative hue is floored, then wraps: (255, 0, 1): (-1 * 482 + 2048) >> 12 = 0; (255, 0, 128):
    # (-128 * 482 + 2048) >> 12 = floor(-14.56) = -15 -> 165
    assert hsv(255, 0, 1)[0] == 0 and hsv(255, 0, 128)[0] == 165


def test_the_active_colour_table_and_its_edges():
    """eval_mig.py's active table (not its commented-out one), each edge on both sides, as the script judges it."""
    assert HSV_RANGES["blue"] == [((90, 50, 70), (128, 255, 255))]
    assert HSV_RANGES["red"] == [((0, 50, 70), (9, 255, 255)), ((159, 50, 70), (180, 255, 255))]
    assert HSV_RANGES["green"] == [((36, 50, 70), (89, 255, 255))] and HSV_RANGES["black"][0][1] == (180, 255, 30)
    cases = [((0, 255, 255), "blue", True), ((0, 255, 250), "blue", False),  # H 90 / 89 (the old table: both blue)
             ((0, 255, 250), "green", True),
             ((205, 205, 255), "blue", True), ((206, 206, 255), "blue", False),  # S 50 / 49 (V 255: S = diff)
             ((0, 0, 70), "blue", True), ((0, 0, 69), "blue", False),  # V 70 / 69
             ((255, 80, 0), "red", True), ((255, 81, 0), "red", False), ((255, 81, 0), "brown", True),  # H 9 / 10
             ((30, 30, 30), "black", True), ((31, 31, 31), "black", False)]  # V 30 / 31
    for rgb, colour, shown in cases:
        assert colour_mask(np.array([[rgb]], dtype=np.uint8), colour)[0, 0] == shown, (rgb, colour)


def test_the_colour_is_checked_in_the_mask_by_the_20_percent_rule():
    pixels = np.zeros((10, 10, 3), dtype=np.uint8)
    pixels[:2] = (255, 0, 0)  # 20 red pixels
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :] = True
    assert mask_colour(pixels, mask, "red") == (0.2, True)  # exactly 20 %: passes (shown / total >= 0.2)
    mask[9, 9] = False
    mask[8, 8] = False
    pixels[0, 0] = 0  # 19 of 98
    assert mask_colour(pixels, mask, "red") == (19 / 98, False)
    assert mask_colour(pixels, np.zeros((10, 10), dtype=bool), "red") == (None, False)  # an empty mask fails


# --------------------------------------------------------------------------------------------------- COCO-MIG scoring


class RecordingSam:
    """A fake SAM returning a known mask, recording the boxes it is asked about."""

    def __init__(self, mask):
        self.mask, self.boxes = mask, []

    def segment(self, image, box):
        self.boxes.append([float(v) for v in box])
        assert image.size == (512, 512)
        return self.mask


class FixedDetector:
    def __init__(self, boxes):
        self.boxes, self.sizes = boxes, []

    def detect(self, image, label):
        self.sizes.append(image.size)
        return [(tuple(b), 0.9) for b in self.boxes]


def _one_instance(phrase, box):
    return BenchLayout(index=0, key="k", prompt="p", entities=(mig_entity(phrase, box, "t"),))


def test_a_thin_object_passes_in_its_mask_where_the_box_fails():
    """A red pole 8 pixels wide in a 128-pixel box: 6 % of the box is red (the old detection-box rule fails it),
    all of SAM's mask is (the benchmark passes it)."""
    image = np.full((512, 512, 3), 255, dtype=np.uint8)
    image[100:400, 200:208] = (220, 20, 20)
    pole = np.zeros((512, 512), dtype=bool)
    pole[100:400, 200:208] = True
    layout = _one_instance("a red pole", (136 / 512, 100 / 512, 264 / 512, 400 / 512))
    sam = RecordingSam(pole)
    (row,) = cocomig.score_layout(cocomig.Judge(FixedDetector([(136, 100, 264, 400)]), sam), Image.fromarray(image),
                                  layout, [(0, 0, 1, 1)])
    assert colour_fraction(image[100:400, 136:264], "red") == pytest.approx(8 / 128)
    assert row["detected"] and row["colour_ok"] and row["success"] and row["colour_fraction"] == 1.0
    assert sam.boxes == [[136.0, 100.0, 264.0, 400.0]]  # the ground-truth box, in pixels of 512


def test_an_object_on_a_background_of_its_colour_fails_in_its_mask():
    """A red apple in a green field, asked as "a green apple": the box is 75 % green (the old rule passes it), the
    apple's mask none (the benchmark fails it, and its mIoU counts 0)."""
    image = np.zeros((512, 512, 3), dtype=np.uint8)
    image[:, :] = (30, 200, 40)
    image[150:250, 150:250] = (220, 20, 20)
    apple = np.zeros((512, 512), dtype=bool)
    apple[150:250, 150:250] = True
    layout = _one_instance("a green apple", (100 / 512, 100 / 512, 300 / 512, 300 / 512))
    detector = FixedDetector([(110, 100, 300, 300)])
    (row,) = cocomig.score_layout(cocomig.Judge(detector, RecordingSam(apple)), Image.fromarray(image), layout,
                                  [(0, 0, 1, 1)])
    assert colour_fraction(image[100:300, 100:300], "green") == pytest.approx(0.75)
    assert row["detected"] and row["iou"] == pytest.approx(190 / 200)
    assert not row["colour_ok"] and row["colour_fraction"] == 0.0 and row["miou"] == 0.0


def test_images_are_scored_at_512_and_sam_is_asked_only_of_detected_instances():
    image = Image.new("RGB", (1024, 1024), (20, 40, 220))
    layout = BenchLayout(index=0, key="k", prompt="p", entities=(
        mig_entity("a blue bus", (0.0, 0.0, 0.5, 0.5), "t"), mig_entity("a blue car", (0.5, 0.5, 1.0, 1.0), "t")))
    detector, sam = FixedDetector([(0, 0, 256, 256)]), RecordingSam(np.ones((512, 512), dtype=bool))
    rows = cocomig.score_layout(cocomig.Judge(detector, sam), image, layout, [(0, 0, 512, 512), (512, 512, 1024,
                                                                                                   1024)])
    assert detector.sizes == [(512, 512), (512, 512)]  # the detector sees the 512x512 image
    assert [r["box_512"] for r in rows] == [[0, 0, 256, 256], [256, 256, 512, 512]]
    assert rows[0]["success"] and not rows[1]["detected"] and rows[1]["iou"] == 0.0
    assert sam.boxes == [[0.0, 0.0, 256.0, 256.0]]


def test_the_512_resize_is_opencvs():
    """A halving averages each 2x2 block rounding half up ((sum + 2) >> 2), as OpenCV's fast area path does."""
    blocks = np.array([[0, 1, 1, 2, 0, 0, 1, 1], [1, 1, 2, 2, 1, 1, 1, 1]], dtype=np.uint8)  # four 2x2 blocks
    image = np.repeat(blocks[:, :, None], 3, axis=2)
    # blocks: (0+1+1+1+2)>>2 = 0.75 -> 1; (1+2+2+2+2)>>2 = 1.75 -> 2; (0+0+1+1+2)>>2 = 0.5 -> 1; 1
    assert resize_like_opencv(image, 4, 1)[0, :, 0].tolist() == [1, 2, 1, 1]
    same = np.arange(512 * 512 * 3, dtype=np.uint64).reshape(512, 512, 3).astype(np.uint8)
    assert np.array_equal(resize_like_opencv(same, 512, 512), same)
    # the bilinear weights: a 3-pixel ramp to 2 pixels samples at 0.25 and 1.75 -> (0 * 1536 + 100 * 512) / 2048 ...
    ramp = np.array([[[0] * 3, [100] * 3, [200] * 3]], dtype=np.uint8)
    assert resize_like_opencv(ramp, 2, 1)[0, :, 0].tolist() == [25, 175]


def _protocol_accumulators(outcomes):
    """eval_mig.py's bookkeeping, restated: per image (its level = instances - 2) the product of the instances'
    success flags; per instance its IoU (0 when detected in the wrong colour) and success; five level buckets."""
    sr = [0, 0, 0, 0, 0]
    sr_count = [0, 0, 0, 0, 0]
    inst = [0, 0, 0, 0, 0]
    inst_count = [0, 0, 0, 0, 0]
    miou = [0.0] * 5
    miou_count = [0] * 5
    for instances in outcomes:
        level = len(instances) - 2
        image_ok = 1
        for detected, colour_ok, iou in instances:
            value = iou if (detected and colour_ok) or not detected else 0.0
            image_ok *= int(detected and colour_ok)
            miou[level] += value
            miou_count[level] += 1
            inst_count[level] += 1
            inst[level] += int(detected and colour_ok)
        sr[level] += image_ok
        sr_count[level] += 1
    return ({f"L{i + 2}": (inst[i] / inst_count[i], sr[i] / sr_count[i], miou[i] / miou_count[i]) for i in range(5)},
            (sum(inst) / sum(inst_count), sum(sr) / sum(sr_count), sum(miou) / sum(miou_count)))


def test_levels_and_rates_equal_the_protocols_accumulators_on_800_layouts():
    rng = np.random.default_rng(7)
    outcomes, rows = [], []
    for index in range(800):  # MIG-Bench's size: 160 layouts per level L2-L6
        instances = []
        for _ in range(2 + index % 5):
            iou = float(rng.uniform(0, 1))
            detected = iou >= 0.5
            colour_ok = detected and bool(rng.uniform() < 0.7)
            instances.append((detected, colour_ok, iou))
            rows.append({"layout": index, "level": 2 + index % 5, "success": colour_ok,
                         "miou": iou if colour_ok or not detected else 0.0})
        outcomes.append(instances)
    levels, overall = _protocol_accumulators(outcomes)
    summary = cocomig.summarise(rows)
    for name, (isr, sr, miou) in levels.items():
        assert summary[name]["images"] == 160
        assert (summary[name]["isr"], summary[name]["sr"], summary[name]["miou"]) == pytest.approx(
            (isr * 100, sr * 100, miou * 100), abs=1e-9)
    assert (summary["all"]["isr"], summary["all"]["sr"], summary["all"]["miou"]) == pytest.approx(
        tuple(v * 100 for v in overall), abs=1e-9)


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam"))


def test_sam_through_transformers_gives_the_best_of_three_masks(tiny_sam):
    import torch

    from eligen.evals.segment import SamSegmenter

    sam = SamSegmenter(str(tiny_sam), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    mask = sam.segment(image, (10, 20, 300, 400))
    assert mask.shape == (512, 512) and mask.dtype == bool and not sam.is_vit_h
    inputs = sam.processor(images=image, input_boxes=[[[10.0, 20.0, 300.0, 400.0]]], return_tensors="pt")
    inputs["input_boxes"] = inputs["input_boxes"].float()
    with torch.no_grad():
        out = sam.model(**inputs, multimask_output=True)
    masks = sam.processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert np.array_equal(mask, masks[0][0, int(out.iou_scores[0, 0].argmax())].numpy())


# ---------------------------------------------------------------------------------------------------------- LayoutSAM


def test_layoutsam_questions_are_the_protocols_words():
    assert layoutsam.presence_question("a cat/dog") == (
        'Is the subject "a catdog" present in the image? Strictly answer with "Yes" or "No", without any irrelevant '
        'words.')
    assert layoutsam.attribute_question("colour", "a cat", "a grey/white cat") == (
        'Is the subject in "a cat" in the image consistent with the color described in the detailed description: '
        '"a greywhite cat"? Strictly answer with "Yes" or "No", without any irrelevant words. If the color is not '
        'mentioned in the detailed description, the answer is "Yes".')
    assert "consistent with the texture described" in layoutsam.attribute_question("texture", "a", "b")
    assert "If the shape is not mentioned" in layoutsam.attribute_question("shape", "a", "b")


def test_layoutsam_crops_as_the_protocol_and_judges_the_jpeg():
    # 0.1234 -> 0.123 (float32 0.12300000339746475) * 512 = 62.976 -> 62; 0.5 * 512 = 256; 0.9996 -> 1.0 -> 512
    assert layoutsam.protocol_crop((0.1234, 0.5, 0.9996, 0.75), 512, 512) == (62, 256, 512, 384)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    seen = []

    class Judge:
        def ask(self, prompt, image=None):
            seen.append(np.asarray(image))
            return "Yes"

    entity = BenchEntity("a cat", (0.0, 0.0, 0.5, 0.5), "cat", "a cat")
    layout = BenchLayout(index=0, key="k", prompt="p", entities=(entity,))
    (row,) = layoutsam.score_layout(Judge(), image, layout, [(0, 0, 32, 32)])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))[:32, :32]
    assert row["crop"] == [0, 0, 32, 32] and len(seen) == 4 and np.array_equal(seen[0], expected)


def test_the_judge_decodes_as_the_protocol_unless_told_greedy():
    judge = ServedJudge("http://127.0.0.1:9/v1", "openbmb/MiniCPM-V-2_6", MINICPM_CHAT)
    body = judge.request([{"role": "user", "content": [Image.new("RGB", (4, 4)), "question"]}])
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed")} == {
        "temperature": 0.7, "top_p": 0.8, "top_k": 100, "repetition_penalty": 1.05, "max_tokens": 2048, "seed": 42}
    assert [c["type"] for c in body["messages"][0]["content"]] == ["image_url", "text"]  # the crop, then the question
    assert ServedJudge("http://x/v1", "m", GREEDY).request([])["temperature"] == 0.0
    served = ServedJudge("http://x/v1", "m", MODEL_DEFAULTS).request([])
    assert "temperature" not in served and served["max_tokens"] == 1024  # the model's own generation config
    config = LayoutSamConfig(data="d", out="o", judge_decoding="greedy")
    assert config.decoding(MINICPM_CHAT).sample is False and config.decoding(MINICPM_CHAT).max_tokens == 2048


def test_a_missing_judge_name_names_the_judge_flag(tmp_path, capsys):
    from eligen.cli import main

    (tmp_path / "rows.jsonl").write_text(json.dumps({
        "global_caption": "x", "bbox_list": "[[0, 0, 10, 10]]", "region_captions": "['a']",
        "detail_region_captions": "['a b']", "width": 10, "height": 10}) + "\n")
    (tmp_path / "out" / "images").mkdir(parents=True)
    assert main(["bench", "layoutsam", "--data", str(tmp_path / "rows.jsonl"), "-o", str(tmp_path / "out"),
                 "--stage", "score"]) == 0  # nothing rendered: the judge is never needed
    image = Image.new("RGB", (16, 16))
    from eligen.generate import save_png

    record = {"key": "000000", "width": 16, "height": 16, "entities": [{"prompt": "a b", "box": [0, 0, 16, 16]}]}
    save_png(image, tmp_path / "out" / "images" / "000000.png", record)
    for vlm in ("openai", "transformers"):
        assert main(["bench", "layoutsam", "--data", str(tmp_path / "rows.jsonl"), "-o", str(tmp_path / "out"),
                     "--stage", "score", "--vlm", vlm]) == 2
        err = capsys.readouterr().err
        assert f"--vlm-model is required with --vlm {vlm}" in err and "--model is required" not in err


def test_indices_files_in_every_form(tmp_path):
    (tmp_path / "a.json").write_text("[3, 1, 3]")
    (tmp_path / "b.json").write_text(json.dumps([{"index": 5, "global_caption": "x"}, {"index": 2}]))
    (tmp_path / "c.txt").write_text("# the subset\n7\n4\n")
    assert read_indices(tmp_path / "a.json") == [1, 3] and read_indices(tmp_path / "b.json") == [2, 5]
    assert read_indices(tmp_path / "c.txt") == [4, 7]
    (tmp_path / "bad.txt").write_text("1\nseven\n")
    with pytest.raises(ValueError, match="entry 1"):
        read_indices(tmp_path / "bad.txt")


# ------------------------------------------------------------------------------------------------------- generation


def test_the_benches_default_to_elgens_reference_settings(tiny_pipeline_dir):
    """A model that declares nothing runs its family's reference: 50 steps, true CFG 3, guidance 3.5 and the
    reference's negative prompt; a flag given wins."""
    config = resolve_settings(LayoutSamConfig(data="d", out="o", model=str(tiny_pipeline_dir)))
    assert (config.steps, config.true_cfg, config.guidance, config.cfg_mode) == (50, 3.0, 3.5, "plain")
    assert config.negative_prompt.startswith("worst quality, low quality")
    given = resolve_settings(LayoutSamConfig(data="d", out="o", model=str(tiny_pipeline_dir), negative_prompt="",
                                             steps=28))
    assert (given.steps, given.negative_prompt) == (28, "")


# ------------------------------------------------------------------------------------------------------ OverLayBench

ANNOTATION = {
    "caption": "two cats on a sofa",
    "annotations": {"cat_1": {"category": "cat", "bbox": [0, 0, 400, 400], "local_prompt": "a grey cat"},
                    "cat_2": {"category": "cat", "bbox": [200, 200, 600, 600], "local_prompt": "a black cat"},
                    "sofa_1": {"category": "sofa", "bbox": [0, 500, 1024, 1024], "local_prompt": "a red sofa"}},
    "relations": {"(cat_1, cat_2)": "cat_1 is next to cat_2", "(cat_2, sofa_1)": "cat_2 sits on sofa_1"},
    "valid_overlap": [{"overlap_box": [0, 1]}, {"overlap_box": [1, 2]}]}


def test_overlaybench_reads_its_rows_and_asks_its_prompts():
    layout = overlaybench_layout(0, {"image_id": "00000007", "annotation": repr(ANNOTATION)}, "row 0")
    assert layout.key == "00000007" and layout.prompt == "two cats on a sofa"
    second = layout.entities[1]
    assert (second.name, second.prompt, second.box) == ("cat_2", "a black cat", (200 / 1024, 200 / 1024, 600 / 1024,
                                                                                 600 / 1024))
    asked = overlaybench.questions(ANNOTATION, 512, 512)
    assert "the following categories ['cat', 'sofa'] in the image.Response in json format:{'category_1'" in asked[
        "boxes"]
    assert "'cat_2': {'category': 'cat', 'bbox': [100, 100, 300, 300], 'local_prompt': 'a black cat'}" in asked[
        "entities"]  # boxes halved for a 512-pixel image, as the toolkit does
    assert ("{'(cat_1, cat_2)': 'cat_1 is next to cat_2', '(cat_2, sofa_1)': 'cat_2 sits on sofa_1'}Please follow"
            in asked["relations"])
    chat = overlaybench.messages(asked["boxes"], Image.new("RGB", (4, 4)))
    assert chat[0]["content"] == ["You are Qwen-VL, created by Alibaba Cloud. You are a helpful assistant."]
    assert isinstance(chat[1]["content"][1], Image.Image)  # the text, then the image


def test_overlaybench_metrics_worked_by_hand():
    predicted = {"cat": [[0, 0, 200, 200], [200, 200, 600, 600]], "sofa": "none"}  # at 512 pixels
    miou, omiou = overlaybench.box_scores(ANNOTATION, predicted, 512, 512)
    # at 1024: cat_1 takes [0, 0, 400, 400] (IoU 1, the best pair); cat_2's best, IoU 1/7, is taken, so it gets
    # [400, 400, 1200, 1200] (IoU 40000 / (160000 + 640000 - 40000) = 1/19); the sofa has no box (0)
    assert miou == pytest.approx((1 + 1 / 19) / 3)
    # overlap (cat_1, cat_2): truth [200, 200, 400, 400], predicted [400, 400, 400, 400] (empty) -> 0;
    # (cat_2, sofa): the sofa's prediction is [0, 0, 0, 0] -> 0
    assert omiou == 0.0
    perfect = {"cat": [[0, 0, 200, 200], [100, 100, 300, 300]], "sofa": [[0, 250, 512, 512]]}
    assert overlaybench.box_scores(ANNOTATION, perfect, 512, 512) == (1.0, 1.0)
    assert overlaybench.extract_json('sure ```json\n{"cat_1": "Yes"}\n``` done') == {"cat_1": "Yes"}
    assert overlaybench.extract_json('{"a": 1}') == {"a": 1} and overlaybench.extract_json("no json") == {}
    answers = {"cat_1": "YES", "cat_2": "Yes.", "sofa_1": True}
    assert overlaybench.yes_count(["cat_1", "cat_2", "sofa_1"], answers) == 1  # only the whole word, any case
    rows = [{"miou": 0.5, "omiou": 0.25, "entity_yes": 1, "entity_total": 3, "relation_yes": 2, "relation_total": 2},
            {"miou": 1.0, "omiou": None, "entity_yes": 3, "entity_total": 3, "relation_yes": 0, "relation_total": 2}]
    assert overlaybench.summarise(rows) == {"miou": 75.0, "omiou": 25.0, "sr_e": pytest.approx(400 / 6),
                                            "sr_r": 50.0, "images": 2}


def test_a_local_qwen_judge_takes_the_protocols_messages_and_decoding(tmp_path):
    """The transformers judge (a tiny random Qwen2.5-VL): system message, text then image, as OverLayBench asks; the
    protocol's sampling seeded (the same answer twice), greedy on request; a model that is not Qwen is refused."""
    from eligen.data.tiny_qwen2vl import save_tiny_qwen2_5_vl
    from eligen.evals.judges import load_local_judge

    folder = save_tiny_qwen2_5_vl(tmp_path / "qwen25")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8))
    sampled = load_local_judge(str(folder), dataclasses.replace(MINICPM_CHAT, max_tokens=6))
    chat = overlaybench.messages("You are required to detect all the instances", image)
    first = sampled.chat(chat)
    assert isinstance(first, str) and sampled.chat(chat) == first
    assert sampled.decoding.generate_kwargs() == {"max_new_tokens": 6, "do_sample": True, "temperature": 0.7,
                                                  "top_p": 0.8, "top_k": 100, "repetition_penalty": 1.05}
    greedy = load_local_judge(str(folder), dataclasses.replace(GREEDY, max_tokens=4))
    assert greedy.ask("Is the subject there?", image) == greedy.ask("Is the subject there?", image)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model type 'bert'"):
        load_local_judge(str(tmp_path / "other"), GREEDY)

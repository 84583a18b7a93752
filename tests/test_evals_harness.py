"""The benchmark harness end to end on the tiny random FLUX pipeline: fixture files in each benchmark's format,
`eligen bench layoutsam` judged by the fake OpenAI-compatible server, `eligen bench cocomig` by a tiny random
Grounding DINO built from config and loaded from disk; sharding, resuming, the resolution rule, the reports."""

from __future__ import annotations

import dataclasses
import json
import threading
import types
import typing
from http.server import BaseHTTPRequestHandler

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from eligen.cli import main
from eligen.evals import cocomig
from eligen.evals.generation import image_path
from eligen.evals.harness import CocoMigConfig, LayoutSamConfig, run_benchmark
from eligen.generate import read_metadata, save_png
from test_annotate import QuietServer, serve

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "blue", "black", "apple", "cat", "dog", "bus"]
SIZE = ["--height", "32", "--width", "48"]  # non-square: boxes must follow each axis
FAST = ["--steps", "2", "--max-sequence-length", "16", "--no-progress", "--sheet", "2"]


# ---------------------------------------------------------------------------------------------------------- fixtures


def write_layoutsam(folder, count=3):
    """A parquet file in LayoutSAM-eval's columns (list fields stored as text, as in the dataset)."""
    rows = [{"file_name": f"{i}.jpg", "global_caption": f"a picture number {i}", "width": 640, "height": 480,
             "bbox_list": str([[0, 0, 320, 240], [320, 120, 640, 480]][: 1 + i % 2]),
             "region_captions": str(["a cat", "a dog"][: 1 + i % 2]),
             "detail_region_captions": ["a fluffy black cat", "a small brown dog"][: 1 + i % 2],
             "image": b"not read"} for i in range(count)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "test-00000-of-00001.parquet")
    return folder


def write_mig(folder):
    """MIG-Bench's mig_bench_anno.yaml and mig_bench.txt (levels 2 and 3)."""
    anno = {"a photo of a red apple and a blue bus": {"a red apple": [[0.0, 0.0, 0.5, 0.5]],
                                                      "a blue bus": [[0.5, 0.25, 1.0, 1.0]], "coco_id": "11"},
            "a photo of a black cat and a black cat and a red bus": {
                "a black cat": [[0.0, 0.0, 0.3, 0.4], [0.3, 0.0, 0.6, 0.4]], "a red bus": [[0.0, 0.5, 1.0, 1.0]],
                "coco_id": "12"}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mig_bench_anno.yaml").write_text(yaml.safe_dump(anno))
    (folder / "mig_bench.txt").write_text("\n".join(reversed(list(anno))) + "\n")
    return folder


class JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: "Yes" to presence, then the configured answers to each attribute question."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = next(p for p in body["messages"][0]["content"] if p["type"] == "text")["text"]
        kind = next((k for k in ("color", "texture", "shape") if f"with the {k} described" in text), "spatial")
        with self.server.lock:
            self.server.asked.append(kind)
        answer = self.server.answers[kind]
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def judge_server():
    httpd = QuietServer(("127.0.0.1", 0), JudgeHandler)
    httpd.lock, httpd.asked = threading.Lock(), []
    httpd.answers = {"spatial": "Yes.", "color": "yes, it is", "texture": "No.", "shape": "**Yes**"}
    yield from serve(httpd)


@pytest.fixture(scope="module")
def tiny_grounding_dino(tmp_path_factory):
    """A random Grounding DINO (tiny Swin backbone, tiny BERT, a tokenizer from a small vocab) saved like a user's
    local copy."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    folder = tmp_path_factory.mktemp("grounding-dino")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                          patch_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, num_queries=10,
                                 encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                 encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=3,
                                 encoder_n_points=2, decoder_n_points=2, max_text_len=32)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 64}), tokenizer=BertTokenizer(str(folder / "vocab.txt")))
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam"))


def save_tiny_sam(folder):
    """A random SAM (a 64-pixel ViT with one block) saved like a user's local copy."""
    import torch
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    vision = SamVisionConfig(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                             image_size=64, patch_size=16, global_attn_indexes=[0], window_size=2, mlp_dim=16,
                             num_pos_feats=4)
    prompt = SamPromptEncoderConfig(hidden_size=8, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, mlp_dim=16,
                                   iou_head_hidden_dim=8)
    torch.manual_seed(0)
    SamModel(SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())).save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessorPil(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16})).save_pretrained(folder)
    return folder


def layoutsam_args(data, out, server, model, *extra):
    return ["bench", "layoutsam", "--data", str(data), "-o", str(out), "--model", str(model), "--vlm-model", "fake",
            "--base-url", server.base_url, *SIZE, *FAST, *extra]


# ---------------------------------------------------------------------------------------------------------- LayoutSAM


def test_layoutsam_whole_path(tmp_path, judge_server, tiny_pipeline_dir, capsys):
    data, out = write_layoutsam(tmp_path / "LayoutSAM-eval" / "data"), tmp_path / "run"
    assert main(layoutsam_args(tmp_path / "LayoutSAM-eval", out, judge_server, tiny_pipeline_dir)) == 0
    printed = capsys.readouterr().out
    assert "| this run (3/3 layouts) | 100.00 | 100.00 | 0.00 | 100.00 | 4 |" in printed
    assert "| 94.05 | 83.84 | 87.31 | 87.01 |" in printed
    record = json.loads((out / "layoutsam.json").read_text())
    assert record["scored_layouts"] == 3 and len(record["entities"]) == 4
    assert judge_server.asked.count("spatial") == 4 and len(judge_server.asked) == 16
    first = read_metadata(image_path(out, 1))
    assert (first["width"], first["height"]) == (48, 32)
    assert first["entities"][1]["box"] == [24.0, 8.0, 48.0, 32.0]  # (320,120,640,480) of 640x480 -> 48x32
    assert [e["box"] for e in record["entities"] if e["layout"] == 1] == [[0, 0, 24, 16], [24, 8, 48, 32]]
    assert Image.open(out / "contact_sheet.png").width > 0 and (out / "table.md").read_text().startswith("| Layout")
    # a rerun after a kill: only what is missing is redone
    image_path(out, 2).unlink()
    (out / "scores" / "000000.json").unlink()
    judge_server.answers["spatial"] = "No"
    config = LayoutSamConfig(data=data, out=out, model=str(tiny_pipeline_dir), vlm_model="fake",
                             base_url=judge_server.base_url, height=32, width=48, steps=2, max_sequence_length=16,
                             progress=False, sheet=0)
    result = run_benchmark("layoutsam", config)
    assert (result.generated, result.reported) == (1, 3)
    # layout 0 is scored again; layout 2 too, unless it came back byte for byte (same seed, same machine)
    rescored = 2 if result.scored == 2 else 1
    assert result.scored in (1, 2) and result.summary["spatial"] == pytest.approx(100 * (4 - rescored) / 4)
    image_path(out, 1).write_bytes(image_path(out, 0).read_bytes())  # another image under layout 1's name
    with pytest.raises(ValueError, match="rendered for another layout"):
        run_benchmark("layoutsam", dataclasses.replace(config, stage="score"))


def test_layoutsam_shards_and_resolution_rule(tmp_path, judge_server, tiny_pipeline_dir, capsys):
    data, out = write_layoutsam(tmp_path / "data", count=4), tmp_path / "run"
    for shard in ("1/2", "0/2"):
        assert main(layoutsam_args(data, out, judge_server, tiny_pipeline_dir, "--shard", shard,
                                   "--limit", "3")) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert "(3/3 layouts)" in capsys.readouterr().out
    # the same image at twice the size: scored with its boxes rescaled, not with the 48x32 ones
    path = image_path(out, 1)
    meta = read_metadata(path)
    save_png(Image.open(path).resize((96, 64)), path, meta)
    assert main(layoutsam_args(data, out, judge_server, tiny_pipeline_dir, "--stage", "score", "--limit", "3")) == 0
    scores = json.loads((out / "scores" / "000001.json").read_text())["entities"]
    assert [s["box"] for s in scores] == [[0, 0, 48, 32], [48, 16, 96, 64]]
    # another aspect ratio: refused, naming the file
    save_png(Image.open(path).resize((64, 64)), path, meta)
    assert main(layoutsam_args(data, out, judge_server, tiny_pipeline_dir, "--stage", "score", "--limit", "3")) == 2
    assert "000001.png" in capsys.readouterr().err


def test_bad_data_is_one_clear_line(tmp_path, judge_server, tiny_pipeline_dir, capsys):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"global_caption": "x", "bbox_list": "[[0, 0, 1, 1]]"}) + "\n")
    assert main(layoutsam_args(tmp_path / "rows.jsonl", tmp_path / "o", judge_server, tiny_pipeline_dir)) == 2
    assert "row 0: missing field(s) region_captions" in capsys.readouterr().err
    assert main(["bench", "cocomig", "--data", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")]) == 2
    assert "mig_bench_anno.yaml" in capsys.readouterr().err
    assert main(["bench", "cocomig", "--data", str(tmp_path), "-o", str(tmp_path / "o"), "--box-threshold", "2"]) == 2
    assert "--box-threshold must be in [0, 1]" in capsys.readouterr().err


def test_an_unreachable_judge_keeps_the_images(tmp_path, tiny_pipeline_dir, capsys):
    data, out = write_layoutsam(tmp_path / "data", count=1), tmp_path / "run"
    gone = types.SimpleNamespace(base_url="http://127.0.0.1:9/v1")  # nothing listens on the discard port
    assert main(layoutsam_args(data, out, gone, tiny_pipeline_dir, "--timeout", "2")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("eligen: error: ") and "the judge failed" in last and "rerun to go on" in last
    assert image_path(out, 0).is_file() and not (out / "scores").exists()


# ---------------------------------------------------------------------------------------------------------- COCO-MIG


def test_cocomig_whole_path(tmp_path, tiny_pipeline_dir, tiny_grounding_dino, tiny_sam, capsys):
    data, out = write_mig(tmp_path / "MIG"), tmp_path / "run"
    args = ["bench", "cocomig", "--data", str(data), "-o", str(out), "--model", str(tiny_pipeline_dir),
            "--detector", str(tiny_grounding_dino), "--sam", str(tiny_sam), "--box-threshold", "0",
            "--text-threshold", "0", *SIZE, *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| EliGen, published | 64.12 | 26.00 | 59.23 | - | - |" in printed
    assert "| ContextGen, released model | 64.91 | 28.00 | 60.25 | - | - |" in printed
    assert "Published rows: EliGen, published: ContextGen (ICLR 2026)" in printed
    assert "**Not comparable with the published numbers**" in printed and "--box-threshold 0.0" in printed
    assert "is not ViT-H" in printed and "generation settings differ from EliGen's reference: steps 2" in printed
    record = json.loads((out / "cocomig.json").read_text())
    rows = record["entities"]
    assert [r["level"] for r in rows] == [3, 3, 3, 2, 2]  # mig_bench.txt's order
    assert read_metadata(image_path(out, 0))["prompt"].startswith("a photo of a black cat")
    for row in rows:
        assert 0 <= row["iou"] <= 1 and row["detections"] >= 1
        assert row["success"] == (row["iou"] >= 0.5 and row["colour_ok"])
    # the summary from the rows, recomputed here
    level3 = [r for r in rows if r["level"] == 3]
    assert record["summary"]["L3"]["isr"] == pytest.approx(100 * sum(r["success"] for r in level3) / 3)
    assert record["summary"]["all"]["miou"] == pytest.approx(100 * sum(r["miou"] for r in rows) / 5)
    assert record["summary"]["all"]["sr"] == pytest.approx(
        100 * sum(all(r["success"] for r in rows if r["layout"] == i) for i in (0, 1)) / 2)
    assert set(record["summary"]) == {"all", *(f"L{n}" for n in cocomig.LEVELS)}
    assert Image.open(out / "contact_sheet.png").height > 0 and "I-SR" in (out / "table.md").read_text()
    # everything is done: a rerun renders nothing and never loads the detector
    config = CocoMigConfig(data=data, out=out, model=str(tiny_pipeline_dir), detector="/nonexistent",
                           sam="/nonexistent", box_threshold=0, text_threshold=0, height=32, width=48, steps=2,
                           max_sequence_length=16, progress=False, sheet=0)
    result = run_benchmark("cocomig", config)
    assert (result.generated, result.scored, result.reported) == (0, 0, 2)


def test_layoutsam_indices_and_seeds(tmp_path, judge_server, tiny_pipeline_dir, capsys):
    """--indices keeps the benchmark's own numbering; --seeds N makes N runs in OUT/seed_S and a table with the
    spread; the report says what keeps it from being comparable."""
    data, out = write_layoutsam(tmp_path / "data", count=3), tmp_path / "run"
    (tmp_path / "subset.json").write_text(json.dumps([{"index": 2}, {"index": 1}]))
    assert main(layoutsam_args(data, out, judge_server, tiny_pipeline_dir, "--indices", str(tmp_path / "subset.json"),
                               "--seeds", "2")) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "seed_42" / "images").iterdir()) == ["000001.png", "000002.png"]
    assert read_metadata(image_path(out / "seed_43", 1))["seed"] == 43
    assert "| seed 42 | 100.00 | 100.00 | 0.00 | 100.00 | 3 |" in printed
    assert ("| **mean ± std over 2 seeds** | 100.00 ± 0.00 | 100.00 ± 0.00 | 0.00 ± 0.00 | 100.00 ± 0.00 | - |"
            in printed)
    table = (out / "seed_42" / "table.md").read_text()
    assert "2 of the benchmark's 3 layouts" in table and "'fake', not the protocol's MiniCPM-V-2_6" in table
    assert "ContextGen, released model (its subset) | 94.13 |" in table
    assert json.loads((out / "layoutsam.json").read_text())["runs"][1]["run"] == "seed 43"


# ------------------------------------------------------------------------------------------------------ OverLayBench

OVERLAY_ANNOTATION = {
    "caption": "two cats on a sofa",
    "annotations": {"cat_1": {"category": "cat", "bbox": [0, 0, 400, 400], "local_prompt": "a grey cat"},
                    "cat_2": {"category": "cat", "bbox": [200, 200, 600, 600], "local_prompt": "a black cat"},
                    "sofa_1": {"category": "sofa", "bbox": [0, 500, 1024, 1024], "local_prompt": "a red sofa"}},
    "relations": {"(cat_1, cat_2)": "cat_1 is next to cat_2", "(cat_2, sofa_1)": "cat_2 sits on sofa_1"},
    "valid_overlap": [{"overlap_box": [0, 1]}, {"overlap_box": [1, 2]}]}


def write_overlaybench(folder):
    """OverLayBench's evaluation set: data/{split}-*.parquet with image_id, annotation (a dict's text) and image."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split in ("simple", "medium", "hard"):
        rows = [{"image": {"bytes": b"not read"}, "annotation": str(OVERLAY_ANNOTATION), "image_id": f"0000000{i}"}
                for i in range(2)]
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


class OverlayJudgeHandler(JudgeHandler):
    """Qwen2.5-VL as the toolkit asks it: boxes exact at 64 pixels, 2 of 3 entities and 1 of 2 relations right."""

    ANSWERS: typing.ClassVar[dict[str, str]] = {
        "to detect": '```json\n{"cat": [[0, 0, 25, 25], [12.5, 12.5, 37.5, 37.5]], "sofa": [[0, 31.25, 64, 64]]}\n```',
        "relationship between": '```json\n{"(cat_1, cat_2)": "Yes", "(cat_2, sofa_1)": "No"}\n```',
        "whether the instances": '{"cat_1": "Yes", "cat_2": "No", "sofa_1": "yes"}'}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["messages"][0]["role"] == "system" and "temperature" not in body
        text = body["messages"][1]["content"][0]["text"]
        answer = next(a for k, a in self.ANSWERS.items() if k in text)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_overlaybench_whole_path(tmp_path, tiny_pipeline_dir, capsys):
    httpd = QuietServer(("127.0.0.1", 0), OverlayJudgeHandler)
    server = next(serve(httpd))
    data, out = write_overlaybench(tmp_path / "OverLayBench_Eval"), tmp_path / "run"
    args = ["bench", "overlaybench", "--data", str(data), "-o", str(out), "--model", str(tiny_pipeline_dir),
            "--vlm-model", "Qwen/Qwen2.5-VL-32B-Instruct", "--base-url", server.base_url, "--height", "64",
            "--width", "64", *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for split in ("simple", "medium", "hard"):
        assert f"| {split} seed 42 | 100.00 | 100.00 | 66.67 | 50.00 | 2 |" in printed
        assert (out / split / "images" / "000001.png").is_file()
    assert "| EliGen, public leaderboard | 68.17 | 43.72 | - | - | - |" in printed
    table = (out / "simple" / "table.md").read_text()
    assert "the toolkit's CLIP scores and FID are not computed" in table and "not the protocol's" not in table
    record = json.loads((out / "simple" / "overlaybench.json").read_text())
    assert record["entities"][0]["instances"][1] == {"name": "cat_2", "box": [12.5, 12.5, 37.5, 37.5],
                                                     "answer": "No"}
    assert read_metadata(image_path(out / "hard", 0))["prompt"] == "two cats on a sofa"
    assert main([*args, "--split", "medium", "--vlm-model", "other"]) == 0  # done: nothing is asked again
    assert "the judge is 'other', not the protocol's Qwen2.5-VL-32B-Instruct" in capsys.readouterr().out

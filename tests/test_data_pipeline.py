"""The dataset pipeline end to end: FLUX images -> VLM annotations -> `eligen train`, and the local VLM path."""

from __future__ import annotations

import pytest

from eligen.cli import main
from eligen.data.annotate import AnnotateConfig, annotate
from eligen.data.plan import PlanConfig, plan_layout
from eligen.data.tiny_qwen2vl import save_tiny_qwen2_vl
from eligen.train.trainer import TrainConfig, train
from test_annotate import config_for, make_folder, server  # noqa: F401 - the fake server fixture and helpers


def test_generated_and_annotated_data_trains(server, tmp_path, tiny_pipeline_dir):  # noqa: F811
    captions = tmp_path / "captions.txt"
    captions.write_text("a red square\na blue circle\n")
    out = tmp_path / "data"
    assert main(["data", "generate", str(captions), "--model", str(tiny_pipeline_dir), "--out", str(out),
                 "--height", "84", "--width", "56", "--steps", "2", "--max-sequence-length", "16",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["000000.png", "000001.png"]
    # the fake VLM answers by image colour; the generated images get the "garbage" answer, so annotate a
    # folder the fake understands for the training half, and check the generated one is handled too
    result = annotate(config_for(server, out, retries=0))
    assert result.done + result.failed == 2
    folder, _ = make_folder(tmp_path / "annotated", ["json", "json", "flaky", "json"])
    result = annotate(config_for(server, folder))
    assert result.done == 4 and result.failed == 0
    run = train(TrainConfig(model=str(tiny_pipeline_dir), dataset=result.jsonl, output_dir=tmp_path / "run",
                            resolution=32, rank=2, max_steps=2, batch_size=2, max_sequence_length=16))
    assert run.steps == 2 and (tmp_path / "run" / "eligen_lora.safetensors").exists()


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2-vl")


def test_annotate_and_plan_with_the_local_transformers_backend(tmp_path, tiny_qwen):
    """A random tiny Qwen2-VL answers nonsense: every image is retried and recorded as failed, nothing crashes."""
    folder, _ = make_folder(tmp_path / "local", ["json", "json"])
    result = annotate(AnnotateConfig(folder, vlm="transformers", model=str(tiny_qwen), retries=1, progress=False))
    assert (result.done, result.failed) == (0, 2)
    failures = sorted((folder / "annotations").glob("*.failed.json"))
    assert len(failures) == 2 and all('"attempts": 2' in f.read_text() for f in failures)
    with pytest.raises(ValueError, match="no usable plan"):
        plan_layout(PlanConfig("a cat", output=tmp_path / "l.json", vlm="transformers", model=str(tiny_qwen),
                               retries=0))

"""Training never loses or mixes work: checks up front, the LoRA before validation, no silent resume of another
run, changed options named, a corrupt checkpoint skipped, the text cache keyed by what made it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eligen.cli import main
from eligen.entities import LayoutError
from eligen.tiny.toy_data import write_box_dataset
from eligen.train.trainer import TextCache, TrainConfig, Trainer, checkpoints, train
from training import lora_tensors, small_config


def config(tmp_path, model, data, **overrides) -> TrainConfig:
    return small_config(tmp_path, model, data, **{"max_steps": 2, "checkpoint_every": 1, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_box_dataset(tmp_path_factory.mktemp("toy-safety"), 6, 32, 32, seed=3)


def test_a_bad_validation_layout_fails_before_the_first_step(tmp_path, tiny_pipeline_dir, dataset):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prompt": "x", "width": 32, "height": 32,
                               "entities": [{"prompt": "", "box": [0, 0, 8, 8]}]}))
    with pytest.raises(LayoutError, match="prompt"):
        train(config(tmp_path, tiny_pipeline_dir, dataset, validation_layouts=[str(bad)]))
    assert not checkpoints(tmp_path / "out")


def test_the_lora_is_written_even_if_validation_fails(tmp_path, tiny_pipeline_dir, dataset, monkeypatch):
    def broken(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Trainer, "validate", broken)
    with pytest.raises(ValueError, match=r"validation render failed.*LoRA is saved"):
        train(config(tmp_path, tiny_pipeline_dir, dataset))
    assert (tmp_path / "out" / "eligen_lora.safetensors").exists()


def test_a_fresh_run_refuses_another_runs_checkpoints(tmp_path, tiny_pipeline_dir, dataset):
    train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=3))
    assert [p.name for p in checkpoints(tmp_path / "out")] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    with pytest.raises(ValueError, match=r"--resume.*--overwrite"):
        train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=1))
    result = train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=1, overwrite=True))
    assert result.steps == 1 and [p.name for p in checkpoints(tmp_path / "out")] == ["checkpoint-1"]


def test_resume_names_changed_options_and_applies_the_run_length(tmp_path, tiny_pipeline_dir, dataset):
    train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=2))
    with pytest.raises(ValueError, match="learning_rate, rank"):
        train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=3, resume=True, learning_rate=5e-4, rank=8))
    resumed = train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=3, resume=True))
    assert resumed.steps == 3 and len(resumed.losses) == 1


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_pipeline_dir, dataset, capsys):
    straight = train(config(tmp_path / "a", tiny_pipeline_dir, dataset, max_steps=3))
    train(config(tmp_path / "b", tiny_pipeline_dir, dataset, max_steps=2))
    latest = checkpoints(tmp_path / "b" / "out")[-1]
    (latest / "lora_adapter.safetensors").write_bytes(b"cut short")
    resumed = train(config(tmp_path / "b", tiny_pipeline_dir, dataset, max_steps=3, resume=True))
    assert "skipping checkpoint-2" in capsys.readouterr().err
    assert resumed.losses == straight.losses[1:]  # continued from checkpoint-1, exactly


def test_the_text_cache_is_keyed_by_what_made_it(tmp_path, tiny_pipe):
    path = tmp_path / "text_cache.pt"
    cache = TextCache(tiny_pipe, 16, path, model="a")
    cache.encode(["a red circle"], pooled=True)
    cache.save()
    assert "a red circle" in TextCache(tiny_pipe, 16, path, model="a").sequences
    assert TextCache(tiny_pipe, 8, path, model="a").sequences == {}  # another token length
    assert TextCache(tiny_pipe, 16, path, model="b").sequences == {}  # another model
    assert torch.load(path, weights_only=True)["key"]["max_sequence_length"] == 16


def test_train_no_progress(tmp_path, tiny_pipeline_dir, dataset, capsys):
    args = ["train", "--model", str(tiny_pipeline_dir), "--dataset", str(dataset), "--output-dir",
            str(tmp_path / "out"), "--resolution", "32", "--rank", "4", "--max-steps", "1", "--batch-size", "2",
            "--max-sequence-length", "16"]
    assert main([*args, "--no-progress"]) == 0
    assert "train:" not in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert "train:" in capsys.readouterr().err


def test_resuming_at_epoch_boundaries_ends_in_the_uninterrupted_lora(tmp_path, tiny_pipeline_dir, dataset):
    # 6 records at batch 2: 3 batches an epoch, so stops after steps 3 and 6 leave checkpoints at epoch boundaries;
    # each resumed run must record its data position in the new epoch (else later resumes are refused)
    straight = train(config(tmp_path / "a", tiny_pipeline_dir, dataset, max_steps=8))
    losses = []
    for stop in (3, 5, 6, 8):
        run = train(config(tmp_path / "b", tiny_pipeline_dir, dataset, max_steps=stop, resume=stop > 3))
        losses += run.losses
        for path in checkpoints(tmp_path / "b" / "out"):
            sampler = torch.load(path / "eligen_state_0.pt", weights_only=False)["sampler"]
            assert 0 <= sampler["position"] <= 3, (path.name, sampler)
    assert losses == straight.losses
    a, b = lora_tensors(tmp_path / "a" / "out"), lora_tensors(tmp_path / "b" / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_moved_run_resumes_and_a_users_checkpoint_folder_is_left_alone(tmp_path, tiny_pipeline_dir, monkeypatch):
    import shutil

    first = tmp_path / "first"
    data = write_box_dataset(first / "data", 6, 32, 32, seed=3)
    straight = train(config(tmp_path / "straight", tiny_pipeline_dir, data, max_steps=3))
    monkeypatch.chdir(first)  # relative paths, as typed in the run's folder
    train(config(Path("."), tiny_pipeline_dir, Path("data") / data.name, max_steps=2))
    (first / "out" / "checkpoint-best").mkdir()  # the user's own folder beside ours
    shutil.move(first, tmp_path / "moved")
    monkeypatch.chdir(tmp_path)  # another working directory, the run's folder moved
    moved = tmp_path / "moved"
    resumed = train(config(moved, tiny_pipeline_dir, moved / "data" / data.name, max_steps=3, resume=True))
    assert resumed.losses == straight.losses[2:]
    assert (moved / "out" / "checkpoint-best").is_dir()

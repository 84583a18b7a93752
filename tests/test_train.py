"""`eligen train` on the tiny random pipeline with small synthetic datasets made here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from eligen.cli import main
from eligen.tiny.toy_data import write_box_dataset
from eligen.train.trainer import Trainer, checkpoints, train
from training import lora_tensors
from training import small_config as config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_box_dataset(tmp_path_factory.mktemp("toy"), 8, 32, 32, seed=1)


def test_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path, tiny_pipeline_dir, dataset):
    straight = train(config(tmp_path / "a", tiny_pipeline_dir, dataset, max_steps=6, checkpoint_every=3,
                            warmup_steps=2))
    first = train(config(tmp_path / "b", tiny_pipeline_dir, dataset, max_steps=3, checkpoint_every=3,
                         warmup_steps=2))
    resumed = train(config(tmp_path / "b", tiny_pipeline_dir, dataset, max_steps=6, checkpoint_every=3,
                           warmup_steps=2, resume=True))
    assert first.losses == straight.losses[:3] and resumed.losses == straight.losses[3:]
    a, b = lora_tensors(tmp_path / "a" / "out"), lora_tensors(tmp_path / "b" / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_with_per_process_noise_is_refused_by_name(tmp_path, tiny_pipeline_dir, dataset):
    """Checkpoints of an older eligen (one noise stream per process, no ``random_draws`` in trainer.json) cannot
    continue bit for bit under the per-batch draws: resume names the checkpoint and the way out."""
    old = tmp_path / "out" / "checkpoint-2"
    old.mkdir(parents=True)
    (old / "trainer.json").write_text(json.dumps({"step": 2, "config": {}, "dataset_sha256": ""}))
    with pytest.raises(ValueError, match=r"checkpoint-2 was written by an older eligen .* --overwrite"):
        train(config(tmp_path, tiny_pipeline_dir, dataset, resume=True))


def test_overfitting_a_fixed_batch_halves_the_loss(tmp_path, tiny_pipeline_dir, dataset):
    trainer = Trainer(config(tmp_path, tiny_pipeline_dir, dataset, rank=8, learning_rate=5e-3, drop_entities=0.0))
    batch = next(trainer.batches())
    losses = []
    for _ in range(40):
        trainer.generator.manual_seed(0)  # the same noise and noise level every step: a fixed regression target
        loss, _, _ = trainer.loss(batch)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_outputs_checkpoints_logs_and_validation(tmp_path, tiny_pipeline_dir, dataset, capsys):
    layout = tmp_path / "val.json"
    layout.write_text(json.dumps({"prompt": "a red square on a gray background", "width": 32, "height": 32,
                                  "entities": [{"prompt": "a red square", "box": [4, 4, 20, 20]}]}))
    result = train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=4, checkpoint_every=1, keep_checkpoints=2,
                          validate_every=2, validation_layouts=[str(layout)], validation_steps=2))
    out = tmp_path / "out"
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]  # only the last 2 kept
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert Image.open(out / "validation" / "step-000004.png").width >= 512  # an overlay, enlarged to be read
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and (out / "text_cache.pt").exists()
    assert set(result.lora_files) == {"diffusers", "diffsynth", "kohya"}
    assert "4/4" in capsys.readouterr().err  # the progress bar


def test_exported_lora_in_every_format_is_the_same_and_changes_generation(tmp_path, tiny_pipeline_dir, dataset):
    from eligen import EliGenPipeline
    from eligen.generate import read_metadata

    result = train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=3, learning_rate=5e-2, alpha=2.0))
    kohya = load_file(str(result.lora_files["kohya"]))
    for key, alpha in kohya.items():  # alpha 2 kept; fused q/k/v(+mlp) get block-diagonal B with alpha folded in
        if key.endswith(".alpha"):
            rank = kohya[key.replace(".alpha", ".lora_down.weight")].shape[0]
            assert alpha.item() == (2.0 if rank == 4 else rank)
    outputs = []
    for fmt in ("diffusers", "diffsynth", "kohya"):
        pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.load_eligen_lora(result.lora_files[fmt]) == fmt
        outputs.append(pipe(prompt="a red square", height=32, width=32, num_inference_steps=2,
                            max_sequence_length=16, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).images)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[2], outputs[0], atol=1e-5, rtol=1e-5)

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": "a red square", "width": 32, "height": 32, "seed": 1,
                                  "entities": [{"prompt": "a red square", "box": [0, 0, 16, 16]}]}))
    fast = ["--model", str(tiny_pipeline_dir), "--steps", "2", "--max-sequence-length", "16"]
    assert main(["generate", str(layout), "-o", str(tmp_path / "plain.png"), *fast]) == 0
    assert main(["generate", str(layout), "-o", str(tmp_path / "lora.png"), *fast, "--lora",
                 str(result.lora_files["diffsynth"])]) == 0
    plain, tuned = (np.asarray(Image.open(tmp_path / n)) for n in ("plain.png", "lora.png"))
    assert not np.array_equal(plain, tuned)
    assert read_metadata(tmp_path / "lora.png")["params"]["lora"] == [str(result.lora_files["diffsynth"])]


def test_interrupt_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_pipeline_dir, dataset, monkeypatch):
    calls = {"n": 0}
    original = Trainer.loss

    def interrupting(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "loss", interrupting)
    result = train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=5))
    assert result.interrupted and result.steps == 2
    assert [p.name for p in checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert not (tmp_path / "out" / "eligen_lora.safetensors").exists()
    monkeypatch.setattr(Trainer, "loss", original)
    done = train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=5, resume=True))
    assert done.steps == 5 and len(done.losses) == 3 and (tmp_path / "out" / "eligen_lora.safetensors").exists()


def test_reference_metadata_json_and_mixed_entity_counts(tmp_path, tiny_pipeline_dir):
    folder = tmp_path / "ref"
    folder.mkdir()
    records = []
    for i, n in enumerate([0, 1, 3, 2]):
        pixels = np.full((32, 32, 3), 128, dtype=np.uint8)
        masks = []
        for j in range(n):
            pixels[j * 8:j * 8 + 8, :16] = (200, 30, 30)
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[j * 8:j * 8 + 8, :16] = 255
            Image.fromarray(mask).save(folder / f"m{i}_{j}.png")
            masks.append(f"m{i}_{j}.png")
        Image.fromarray(pixels).save(folder / f"i{i}.png")
        records.append({"image": f"i{i}.png", "prompt": "red bars", "eligen_entity_prompts": ["a red bar"] * n,
                        "eligen_entity_masks": masks})
    (folder / "metadata.json").write_text(json.dumps(records))
    trainer = Trainer(config(tmp_path, tiny_pipeline_dir, folder / "metadata.json", batch_size=4, drop_entities=0.0))
    batch = next(trainer.batches())
    assert sorted(batch["entity_counts"]) == [0, 1, 2, 3]
    x0, _, branch, _ = trainer.encode_batch(batch)
    context, mask = branch.context, branch.attention_mask
    n_img = x0.shape[1]
    assert context.shape[1] == 4 * 16 and mask.shape == (4, 1, 4 * 16 + n_img, 4 * 16 + n_img)
    for b, count in enumerate(batch["entity_counts"]):
        for slot in range(count, 3):  # padded entities see nothing of the image and the image does not see them
            assert not mask[b, 0, slot * 16:(slot + 1) * 16, 64:].any()
            assert not mask[b, 0, 64:, slot * 16:(slot + 1) * 16].any()
    loss, _, _ = trainer.loss(batch)
    assert torch.isfinite(loss)


def test_bad_records_are_counted_and_reported(tmp_path, tiny_pipeline_dir, dataset, capsys):
    lines = dataset.read_text().splitlines()
    bad = [json.dumps({"image": "images/missing.png", "prompt": "x", "entities": []}), "{not json"]
    data = dataset.parent / "with_bad.jsonl"
    data.write_text("\n".join([*lines, *bad]) + "\n")
    trainer = Trainer(config(tmp_path, tiny_pipeline_dir, data, max_bad_fraction=0.3))
    assert trainer.dataset.stats.bad == 2 and len(trainer.dataset) == 8
    with pytest.raises(ValueError, match="2"):
        Trainer(config(tmp_path, tiny_pipeline_dir, data, max_bad_fraction=0.1))


OPTION_CHANGES = {
    "rank": 8, "alpha": 16.0, "learning_rate": 1e-2, "warmup_steps": 3, "batch_size": 4, "gradient_accumulation": 2,
    "timestep_sampling": "logit_normal", "guidance": 3.5, "max_sequence_length": 12, "drop_entities": 1.0,
    "max_entities": 1, "seed": 7, "resolution": 48, "gradient_checkpointing": True, "mixed_precision": "bf16",
    "num_workers": 2,
}


@pytest.mark.parametrize(("option", "value"), list(OPTION_CHANGES.items()))
def test_every_training_option_changes_the_run(tmp_path, tiny_pipeline_dir, dataset, option, value):
    base = train(config(tmp_path / "base", tiny_pipeline_dir, dataset, max_steps=3)).losses
    if option in ("gradient_checkpointing", "num_workers"):  # same maths (recomputed / loaded elsewhere)
        assert train(config(tmp_path / "x", tiny_pipeline_dir, dataset, max_steps=3, **{option: value})).losses == \
            pytest.approx(base, rel=1e-5)
        return
    changed = train(config(tmp_path / "x", tiny_pipeline_dir, dataset, max_steps=3, **{option: value})).losses
    assert changed != base


def test_cli_train_with_yaml_and_flags(tmp_path, tiny_pipeline_dir, dataset, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_pipeline_dir), "dataset": str(dataset), "output_dir": "run",
                                   "resolution": 32, "rank": 4, "max_steps": 50, "batch_size": 2,
                                   "max_sequence_length": 16, "cache_text_embeddings": False}))
    assert main(["train", str(cfg), "--max-steps", "2", "--no-buckets"]) == 0
    out = capsys.readouterr().out
    assert "lora (kohya)" in out and (tmp_path / "run" / "eligen_lora_kohya.safetensors").exists()
    assert not (tmp_path / "run" / "text_cache.pt").exists()
    assert main(["train", str(cfg), "--rank", "0"]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(["train", "--max-steps", "2"]) == 2
    assert "missing dataset, output_dir" in capsys.readouterr().err


def _torchrun_train(tmp_path: Path, name: str, settings: dict) -> None:
    """``torchrun --nproc_per_node 2 -m eligen.cli train`` on the CPU (gloo) with the YAML ``settings``."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    # accelerate's multi-CPU path: torchrun processes with ACCELERATE_USE_CPU (accelerate launch --cpu starts one)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher), "--standalone", "--nproc_per_node", "2", "-m", "eligen.cli", "train", str(cfg)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def logged_losses(run: Path) -> dict[int, float]:
    """The ``loss`` scalars of a run's TensorBoard log, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for events in (run / "logs").rglob("events.out.tfevents.*"):
        log = EventAccumulator(str(events))
        log.Reload()
        losses.update({e.step: e.value for e in log.Scalars("loss")} if "loss" in log.Tags()["scalars"] else {})
    return losses


def test_two_cpu_processes_with_accelerate(tmp_path, tiny_pipeline_dir, dataset):
    """The multi-process path as far as this machine allows: accelerate, 2 CPU processes, gloo (DDP). The run takes
    the steps of one process with gradient accumulation 2 (same logged losses, same LoRA: the draws are per global
    batch, the logged loss the mean over processes); a run resumed from its step-1 checkpoint on 2 processes ends
    with the uninterrupted run's losses and LoRA."""
    settings = {"model": str(tiny_pipeline_dir), "dataset": str(dataset), "output_dir": "run", "resolution": 32,
                "rank": 4, "max_steps": 3, "batch_size": 2, "max_sequence_length": 16, "checkpoint_every": 1,
                "learning_rate": 1e-3, "log_every": 1}
    _torchrun_train(tmp_path, "train", settings)
    run = tmp_path / "run"
    assert (run / "eligen_lora.safetensors").exists()
    assert [p.name for p in checkpoints(run)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert {p.name for p in (run / "checkpoint-3").glob("eligen_state_*.pt")} == {"eligen_state_0.pt",
                                                                                   "eligen_state_1.pt"}
    # one process, gradient accumulation 2: the same global batches (4 per epoch: 3 steps cross an epoch) and draws
    single = train(config(tmp_path / "one", tiny_pipeline_dir, dataset, max_steps=3, gradient_accumulation=2))
    curve = logged_losses(run)
    assert sorted(curve) == [1, 2, 3]
    assert [curve[step] for step in (1, 2, 3)] == pytest.approx(single.losses, rel=1e-5)
    straight, one = lora_tensors(run), lora_tensors(tmp_path / "one" / "out")
    assert straight.keys() == one.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], one[key], rtol=1e-5, atol=1e-6)
    # the same run stopped after step 1: its checkpoint-1 only, then resumed on 2 processes
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / "checkpoint-1", resumed / "checkpoint-1")
    written = (resumed / "checkpoint-1" / "trainer.json").stat().st_mtime_ns
    _torchrun_train(tmp_path, "resume", {**settings, "output_dir": "resumed", "resume": True})
    # it continued from checkpoint-1 (a fresh start would have written checkpoint-1 again)
    assert (resumed / "checkpoint-1" / "trainer.json").stat().st_mtime_ns == written
    assert [p.name for p in checkpoints(resumed)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert logged_losses(resumed) == {2: curve[2], 3: curve[3]}
    again = lora_tensors(resumed)
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=1e-5, atol=1e-6)
    # the later updates are there (the LoRA up matrices start at zero): equal ends are not two untrained adapters
    assert any(straight[key].abs().max() > 0 for key in straight if "lora_B" in key or "lora_up" in key)


def test_sigint_finishes_the_step_and_saves(tmp_path, tiny_pipeline_dir, dataset, monkeypatch):
    import signal

    calls = {"n": 0}
    original = Trainer.loss

    def signalling(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 2
        return original(self, batch)

    monkeypatch.setattr(Trainer, "loss", signalling)
    result = train(config(tmp_path, tiny_pipeline_dir, dataset, max_steps=5))
    assert result.interrupted and result.steps == 2  # step 2 completed, then stopped
    assert [p.name for p in checkpoints(tmp_path / "out")] == ["checkpoint-2"]


def test_paths_in_a_training_yaml_are_relative_to_the_file(tmp_path, monkeypatch):
    from eligen.train.config import load_train_config

    folder = tmp_path / "project"
    (folder / "models" / "base").mkdir(parents=True)
    (folder / "train.yaml").write_text(yaml.safe_dump({
        "dataset": "data/annotations.jsonl", "output_dir": "runs/one", "model": "models/base",
        "validation_layouts": ["layouts/a.json", "/abs/b.json"]}))
    monkeypatch.chdir(tmp_path)  # another working directory than the file's
    config = load_train_config({"config": "project/train.yaml"})
    assert config.dataset.absolute() == folder / "data" / "annotations.jsonl"
    assert config.output_dir.absolute() == folder / "runs" / "one"
    assert Path(config.model).absolute() == folder / "models" / "base"
    assert [Path(p).absolute() for p in config.validation_layouts] == [folder / "layouts" / "a.json",
                                                                       Path("/abs/b.json")]
    (folder / "bad.yaml").write_text(yaml.safe_dump({"validation_layouts": "layouts/a.json"}))
    with pytest.raises(ValueError, match="option 'validation_layouts' must be a list"):
        load_train_config({"config": str(folder / "bad.yaml")})

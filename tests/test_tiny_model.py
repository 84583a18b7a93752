"""The embedded default model: the shipped eligen-tiny, its defaults, `make demo`'s job, ShapesBench, the build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eligen import EliGenPipeline
from eligen import models as shipped
from eligen.cli import main
from eligen.generate import overlay_path_for, read_metadata
from eligen.tiny.build import TinyBuildConfig, build

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_shipped_model_loads_by_name_and_is_small():
    assert sum(p.stat().st_size for p in shipped.TINY_MODEL_DIR.rglob("*") if p.is_file()) < 30 * 2**20
    pipe = EliGenPipeline.from_pretrained("eligen-tiny")
    assert pipe.vae_scale_factor == 2 and not pipe.transformer.config.guidance_embeds
    defaults = shipped.model_defaults("eligen-tiny")
    assert defaults["max_sequence_length"] == 32 and Path(defaults["lora"][0]).is_file()


@pytest.mark.parametrize("example", ["tiny_two_shapes.json", "tiny_blob_mask.json", "tiny_polygon.json"])
def test_demo_job_on_the_default_model(tmp_path, example, capsys):
    out = tmp_path / "demo.png"
    assert main(["generate", str(EXAMPLES / example), "-o", str(out), "--overlay", "--no-progress"]) == 0
    assert out.exists() and overlay_path_for(out).exists()
    params = read_metadata(out)["params"]
    assert params["model"] == "eligen-tiny" and params["steps"] == 20 and params["max_sequence_length"] == 32
    assert params["lora"] == [] and params["seed"] is not None  # no path of this machine: the model's own LoRA
    assert str(out) in capsys.readouterr().out
    explicit = tmp_path / "explicit.png"  # the model's own LoRA is what ran
    assert main(["generate", str(EXAMPLES / example), "-o", str(explicit), "--no-progress", "--seed",
                 str(params["seed"]), "--lora", shipped.model_loras("eligen-tiny")[0]]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(explicit)))


def test_flags_override_the_model_defaults(tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", str(EXAMPLES / "tiny_two_shapes.json"), "-o", str(out), "--steps", "3",
                 "--no-progress"]) == 0
    assert read_metadata(out)["params"]["steps"] == 3


def test_shapes_bench_on_the_shipped_model(tmp_path, capsys):
    """4 held-out layouts at the model's settings: the shipped LoRA must put entities in their masks (on these
    layouts the shipped model scores about 0.50 mIoU with the LoRA and 0.02 without)."""
    assert main(["bench", "shapes", "--n", "4", "-o", str(tmp_path), "--no-progress"]) == 0
    record = json.loads((tmp_path / "shapesbench.json").read_text())
    summary = record["summary"]
    assert set(summary) == {"base", "train-free", "eligen"} and summary["eligen"]["n"] == 9
    assert record["resolved"]["max_sequence_length"] == 32 and record["resolved"]["lora"]
    assert summary["eligen"]["miou"] > 0.35 and summary["eligen"]["miou"] > summary["base"]["miou"] + 0.25
    assert "| eligen |" in capsys.readouterr().out


def test_missing_shipped_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "TINY_MODEL_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="eligen tiny build"):
        EliGenPipeline.from_pretrained("eligen-tiny")


TINY_BUILD = dict(vae_steps=2, base_steps=2, lora_steps=2, vae_batch_size=2, batch_size=2, lora_batch_size=2,
                  lora_samples=4, lora_rank=2, progress=False)
BASE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def tiny_build(root: Path, name: str, **changes) -> Path:
    return build(TinyBuildConfig(out=root / name / "model", **{**TINY_BUILD, **changes}))


def weights(model_dir: Path, part: str) -> dict[str, torch.Tensor]:
    if part == "lora":
        return load_file(str(model_dir / "eligen_lora.safetensors"))
    return load_file(str(next((model_dir / part).glob("*.safetensors"))))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_is_deterministic(tmp_path):
    a, b = tiny_build(tmp_path, "a"), tiny_build(tmp_path, "b")
    for part in (*BASE_PARTS, "lora"):
        assert same(weights(a, part), weights(b, part)), part
    assert (a / "eligen_defaults.json").read_text() == (b / "eligen_defaults.json").read_text()


@pytest.mark.parametrize(("change", "changed_base"), [
    ({"base_learning_rate": 3e-3}, True),
    ({"base_samples": 1}, True),  # 1 encoded image instead of steps x batch = 4
    ({"lora_learning_rate": 3e-3}, False),
])
def test_build_options_are_read(tmp_path, change, changed_base):
    reference, changed = tiny_build(tmp_path, "reference"), tiny_build(tmp_path, "changed", **change)
    assert same(weights(reference, "vae"), weights(changed, "vae"))
    assert same(weights(reference, "transformer"), weights(changed, "transformer")) != changed_base
    assert not same(weights(reference, "lora"), weights(changed, "lora"))


@pytest.mark.parametrize(("change", "message"), [({"base_samples": 0}, "base_samples"),
                                                 ({"lora_learning_rate": 0.0}, "learning rates")])
def test_build_config_is_validated(change, message):
    with pytest.raises(ValueError, match=message):
        TinyBuildConfig(**change)


def test_the_base_stage_uses_the_trainers_loss(tmp_path, monkeypatch):
    """The tiny build's base stage regresses the velocity with the trainer's loss, not a copy of it."""
    import eligen.tiny.build as build_module

    calls = []
    original = build_module.per_sample_loss

    def counting(prediction, x0, noise):
        calls.append(prediction.shape[0])
        return original(prediction, x0, noise)

    monkeypatch.setattr(build_module, "per_sample_loss", counting)
    tiny_build(tmp_path, "loss", lora_steps=1)
    assert len(calls) == TINY_BUILD["base_steps"]

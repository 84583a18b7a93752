"""Which family a checkpoint is: read from its model_index.json without torch; clear errors otherwise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eligen.families import UnknownFamilyError, get_family, model_family


def test_family_of_the_shipped_and_the_test_checkpoints(tiny_pipeline_dir, tiny_qwen_dir):
    assert model_family("eligen-tiny") == "flux"
    assert model_family(tiny_pipeline_dir) == "flux"
    assert model_family(tiny_qwen_dir) == "qwen_image"
    assert get_family("qwen_image").name == "qwen_image" and get_family("flux").name == "flux"


def test_unknown_checkpoints_are_named(tmp_path):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UnknownFamilyError, match=r"StableDiffusionPipeline checkpoint; eligen runs") as caught:
        model_family(tmp_path / "sd")
    stock = ["FluxPipeline", "QwenImagePipeline", "QwenImage21Pipeline", "Flux2Pipeline", "Flux2KleinPipeline",
             "ZImagePipeline", "Krea2Pipeline"]
    assert all(name in str(caught.value) for name in stock)  # every family's diffusers pipelines are named
    with pytest.raises(UnknownFamilyError, match=r"no model_index\.json"):
        model_family(tmp_path)
    with pytest.raises(UnknownFamilyError, match="unknown model family"):
        get_family("sdxl")


def test_uncached_hub_ids_are_read_by_name():
    assert model_family("Qwen/Qwen-Image") == "qwen_image"
    assert model_family("black-forest-labs/FLUX.1-dev") == "flux"


def test_reading_the_family_imports_no_torch(tiny_qwen_dir):
    code = f"import sys; from eligen.families import model_family; print(model_family({str(tiny_qwen_dir)!r})); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["qwen_image", "False"]

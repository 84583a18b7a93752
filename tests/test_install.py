"""A lean core install: inference pulls only what inference needs; training says how to get its extra."""

from __future__ import annotations

import importlib.metadata
import re

import pytest


def requirements(extra: str | None = None) -> set[str]:
    names = set()
    for line in importlib.metadata.requires("eligen") or []:
        marker = re.search(r'extra == "([^"]+)"', line)
        if (marker.group(1) if marker else None) == extra:
            names.add(re.split(r"[<>=!\[ ;]", line, maxsplit=1)[0].lower())
    return names


def test_the_core_install_is_inference_only():
    core = requirements()
    assert {"torch", "diffusers", "transformers", "peft", "safetensors", "pillow"} <= core
    assert not core & {"tensorboard", "deepspeed", "pyyaml", "pytest", "gradio"}
    assert {"tensorboard", "pyyaml"} <= requirements("train")
    assert "deepspeed" in requirements("deepspeed")
    assert "eligen" in requirements("dev")  # dev pulls the train extra: the tests train


def test_training_without_its_extra_names_the_fix(monkeypatch, tmp_path):
    import importlib.util

    from eligen.train.trainer import require_training_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'eligen\[train\]'"):
        require_training_extra()


def test_the_web_app_without_its_extra_names_the_fix(monkeypatch, capsys):
    import importlib.util

    from eligen.cli import main

    assert {"starlette", "uvicorn"} <= requirements("ui") and "eligen" in requirements("dev")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["ui", "--port", "0"]) == 2
    assert "pip install 'eligen[ui]'" in capsys.readouterr().err

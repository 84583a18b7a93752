"""`eligen plan` through the fake OpenAI-compatible server of test_annotate, and its layout into `eligen generate`."""

from __future__ import annotations

import json

import pytest

from eligen import load_layout
from eligen.cli import main
from eligen.data.plan import PlanConfig, plan_layout
from test_annotate import server  # noqa: F401 - the fake server fixture

PLAN = json.dumps({"caption": "a cat and a dog on a red sofa",
                   "entities": [{"label": "a ginger cat", "bbox_2d": [10, 20, 200, 300]},
                                {"label": "a small dog", "bbox_2d": [220, 60, 500, 330]},
                                {"label": "", "bbox_2d": [0, 0, 5, 5]}]})


def test_plan_writes_a_layout_that_generates(server, tmp_path, tiny_pipeline_dir, capsys):  # noqa: F811
    server.fake.text_answers = ["no idea {", PLAN]  # a malformed answer first: retried
    out = tmp_path / "layout.json"
    code = main(["plan", "a cat and a dog on a sofa", "-o", str(out), "--base-url", server.base_url, "--model", "m",
                 "--width", "512", "--height", "384", "--seed", "3"])
    assert code == 0
    layout = load_layout(out)
    assert layout.prompt == "a cat and a dog on a red sofa" and (layout.width, layout.height) == (512, 384)
    assert [e.prompt for e in layout.entities] == ["a ginger cat", "a small dog"]  # the empty label was dropped
    assert list(layout.entities[1].box) == [220.0, 60.0, 500.0, 330.0] and layout.seed == 3
    question = server.fake.bodies[-1]["messages"][0]["content"]
    assert [p["type"] for p in question] == ["text"] and "a cat and a dog on a sofa" in question[0]["text"]
    assert "512x384" in question[0]["text"]
    image = tmp_path / "image.png"
    assert main(["generate", str(out), "-o", str(image), "--model", str(tiny_pipeline_dir), "--steps", "2",
                 "--max-sequence-length", "16", "--height", "32", "--width", "24"]) == 0
    assert image.exists()


def test_plan_gives_up_after_the_retries(server, tmp_path):  # noqa: F811
    server.fake.text_answers = ["nope", "still nope", "never"]
    config = PlanConfig("a cat", output=tmp_path / "l.json", base_url=server.base_url, model="m", retries=1)
    with pytest.raises(ValueError, match="no usable plan after 2 attempts"):
        plan_layout(config)
    assert not (tmp_path / "l.json").exists() and server.fake.text_answers == ["never"]


def test_plan_bad_arguments(tmp_path, capsys):
    assert main(["plan", "a cat", "-o", str(tmp_path / "l.json")]) == 2
    assert "--base-url" in capsys.readouterr().err
    assert main(["plan", "  ", "-o", str(tmp_path / "l.json"), "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "description" in capsys.readouterr().err
    with pytest.raises(ValueError, match="-o"):
        plan_layout(PlanConfig("a cat", base_url="http://127.0.0.1:9/v1"))


def test_cli_plan_exits_non_zero_when_no_plan_came(server, tmp_path, capsys):  # noqa: F811
    server.fake.text_answers = ["nope"]
    assert main(["plan", "a cat", "-o", str(tmp_path / "l.json"), "--base-url", server.base_url, "--model", "m",
                 "--retries", "0"]) == 2
    assert "no usable plan" in capsys.readouterr().err and not (tmp_path / "l.json").exists()


def test_the_layout_size_is_the_target_models(tmp_path):
    # README's planner example renders with FLUX.1-dev: its layout is 1024x1024, not the shipped model's 64x64
    assert (PlanConfig("a cat", for_model="black-forest-labs/FLUX.1-dev").width,
            PlanConfig("a cat", for_model="black-forest-labs/FLUX.1-dev").height) == (1024, 1024)
    assert (PlanConfig("a cat").width, PlanConfig("a cat").height) == (64, 64)  # eligen-tiny, the default model
    assert PlanConfig("a cat", for_model="eligen-tiny", width=96).width == 96

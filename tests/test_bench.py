"""ShapesBench end to end on the tiny random pipeline (the trained tiny model is not shipped yet)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from eligen.cli import main
from eligen.tiny.bench import entity_colour, mask_kind
from eligen.tiny.world import sample_layout


def test_shapes_bench_cli_writes_table_json_and_sheet(tmp_path, tiny_pipeline_dir, random_lora_file, capsys):
    lora = random_lora_file
    out = tmp_path / "bench"
    code = main(["bench", "shapes", "--model", str(tiny_pipeline_dir), "--lora", str(lora), "--n", "4", "--steps",
                 "2", "--size", "32", "-o", str(out), "--sheet", "2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    for variant in ("base", "train-free", "eligen"):
        assert f"| {variant} |" in printed
    record = json.loads((out / "shapesbench.json").read_text())
    assert record["config"]["n"] == 4 and record["config"]["size"] == 32 and record["config"]["steps"] == 2  # numbers
    n_entities = sum(len(sample_layout(1_000_000 + i, 32).entities) for i in range(4))
    for variant, summary in record["summary"].items():
        assert summary["n"] == n_entities and 0 <= summary["miou"] <= 1 and 0 <= summary["recall"] <= 1
        assert set(summary["by_kind"]) <= {"box", "ellipse", "irregular"}
        assert len(record["scores"][variant]) == n_entities
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > sheet.height  # 3 variant columns, 2 layout rows


def test_kind_and_colour_helpers():
    layout = sample_layout(5, 64, kinds=("box",))
    assert {mask_kind(e.mask) for e in layout.entities} == {"box"}
    assert entity_colour("a red circle") == "red"
    with pytest.raises(ValueError, match="palette colour"):
        entity_colour("a circle")

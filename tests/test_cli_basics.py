"""CLI basics people expect: prompt overrides, several images, the random seed printed, the format from the
extension (the record inside a PNG, beside a JPEG), the user's umask, outputs checked before any work."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from eligen.cli import main
from eligen.files import current_umask
from eligen.generate import read_metadata

LAYOUT = "examples/tiny_two_shapes.json"
FAST = ["--steps", "2", "--no-progress"]


def test_prompt_overrides_and_several_images(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["generate", LAYOUT, "-o", str(out), *FAST, "--prompt", "a green star on a white background",
                 "--negative-prompt", "blurry", "--num-images", "2", "--seed", "10"]) == 0
    printed = capsys.readouterr().out
    first, second = tmp_path / "out_0.png", tmp_path / "out_1.png"
    assert f"image: {first}" in printed and f"image: {second}" in printed and not out.exists()
    a, b = read_metadata(first), read_metadata(second)
    assert (a["params"]["seed"], b["params"]["seed"]) == (10, 11)
    assert a["layout"]["prompt"] == "a green star on a white background" and a["layout"]["negative_prompt"] == "blurry"
    assert main(["generate", "--from", str(second), "-o", str(tmp_path / "again.png"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(second)), np.asarray(Image.open(tmp_path / "again.png")))


def test_a_random_seed_is_printed_and_recorded(tmp_path, capsys):
    layout = json.loads(open(LAYOUT).read())
    layout.pop("seed")
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    assert main(["generate", str(path), "-o", str(tmp_path / "a.png"), *FAST]) == 0
    err = capsys.readouterr().err
    seed = read_metadata(tmp_path / "a.png")["params"]["seed"]
    assert f"seed: {seed} (random; --seed {seed} renders it again)" in err


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_other_formats_carry_their_record_beside_them(tmp_path, suffix):
    out = tmp_path / f"out{suffix}"
    assert main(["generate", LAYOUT, "-o", str(out), *FAST]) == 0
    assert Image.open(out).format == {".jpg": "JPEG", ".webp": "WEBP"}[suffix]
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert read_metadata(out) == record and record["params"]["steps"] == 2
    assert main(["generate", "--from", str(out), "-o", str(tmp_path / "again.png"), "--no-progress"]) == 0
    assert read_metadata(tmp_path / "again.png")["layout"] == record["layout"]


def test_files_follow_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert main(["generate", LAYOUT, "-o", str(tmp_path / "a.png"), *FAST, "--overlay"]) == 0
    finally:
        os.umask(previous)
    for name in ("a.png", "a_overlay.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640


@pytest.mark.parametrize(("output", "message"), [("{tmp}", "is a folder"), ("{tmp}/out.gif", "extension names"),
                                                 ("{tmp}/out", "extension names")])
def test_bad_outputs_are_refused_before_any_work(tmp_path, capsys, output, message, monkeypatch):
    import eligen.generate as generate_module

    monkeypatch.setattr(generate_module, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["generate", LAYOUT, "-o", output.format(tmp=tmp_path), *FAST]) == 2
    assert message in capsys.readouterr().err


def test_an_overlay_path_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import eligen.generate as generate_module

    (tmp_path / "out_overlay.png").mkdir()
    monkeypatch.setattr(generate_module, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["generate", LAYOUT, "-o", str(tmp_path / "out.png"), *FAST, "--overlay"]) == 2
    assert "is a folder" in capsys.readouterr().err

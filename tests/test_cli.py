"""End-to-end CLI tests on the tiny saved pipeline: `eligen generate`, metadata, --from, overlay, flags."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from eligen.cli import build_parser, main
from eligen.generate import GenerateConfig, overlay_path_for, read_metadata

FAST = ["--steps", "2", "--max-sequence-length", "16"]


@pytest.fixture()
def layout_file(tmp_path: Path) -> Path:
    """A 32x32 layout mixing a PNG mask (at another resolution), a box and a polygon."""
    (tmp_path / "masks").mkdir()
    mask = Image.new("L", (100, 100), 0)
    ImageDraw.Draw(mask).ellipse((5, 5, 55, 55), fill=255)
    mask.save(tmp_path / "masks" / "circle.png")
    layout = {
        "prompt": "a red circle and a blue square on a gray background",
        "negative_prompt": "blurry",
        "width": 32,
        "height": 32,
        "seed": 7,
        "entities": [
            {"prompt": "a red circle", "mask": "masks/circle.png"},
            {"prompt": "a blue square", "box": [16, 16, 32, 32]},
            {"prompt": "a green triangle", "polygon": [[0, 31], [8, 18], [15, 31]]},
        ],
    }
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def run(*args: str) -> int:
    return main([str(a) for a in args])


def test_help_for_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--lora", "--steps", "--true-cfg", "--guidance", "--seed", "--height", "--width",
                 "--device", "--dtype", "--overlay", "--from"):
        assert flag in out
    assert main([]) == 2  # no command: help and a usage exit code


def test_console_script_installed():
    result = subprocess.run([sys.executable, "-m", "eligen.cli", "--version"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.startswith("eligen ")


def test_every_config_field_is_a_flag():
    parser = build_parser()
    generate_parser = parser._subparsers._group_actions[0].choices["generate"]
    dests = {action.dest for action in generate_parser._actions}
    for field in dataclasses.fields(GenerateConfig):
        assert field.name in dests, field.name


def test_generate_end_to_end_and_reproduce(tmp_path, layout_file, tiny_pipeline_dir, capsys):
    out = tmp_path / "out" / "image.png"
    assert run("generate", layout_file, "-o", out, "--model", tiny_pipeline_dir, "--overlay", *FAST) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and str(overlay_path_for(out)) in printed
    assert out.exists() and overlay_path_for(out).exists()
    with Image.open(out) as image:
        assert image.size == (32, 32)

    record = read_metadata(out)
    assert record["params"]["seed"] == 7 and record["params"]["steps"] == 2
    assert record["params"]["model"] == str(tiny_pipeline_dir)
    assert [e["prompt"] for e in record["layout"]["entities"]] == ["a red circle", "a blue square",
                                                                  "a green triangle"]
    assert record["layout"]["entities"][0]["mask"].startswith("data:image/png;base64,")
    assert record["layout"]["entities"][1]["box"] == [16.0, 16.0, 32.0, 32.0]

    # --from reproduces the image bit for bit, with no layout file and no flags.
    layout_file.unlink()
    (layout_file.parent / "masks" / "circle.png").unlink()
    again = tmp_path / "again.png"
    assert run("generate", "--from", out, "-o", again) == 0
    assert np.array_equal(pixels(out), pixels(again))
    assert read_metadata(again)["layout"] == record["layout"]

    # a flag given with --from overrides the stored value
    changed = tmp_path / "changed.png"
    assert run("generate", "--from", out, "-o", changed, "--seed", "8") == 0
    assert read_metadata(changed)["params"]["seed"] == 8
    assert not np.array_equal(pixels(out), pixels(changed))


def test_overlay_outlines_each_mask_and_keeps_its_colours(tmp_path, layout_file, tiny_pipeline_dir):
    out = tmp_path / "image.png"
    assert run("generate", layout_file, "-o", out, "--model", tiny_pipeline_dir, "--overlay", *FAST) == 0
    overlay = pixels(overlay_path_for(out))
    assert overlay.shape[0] >= 512  # small images are enlarged so labels are readable
    scale = overlay.shape[0] // 32
    image = np.repeat(np.repeat(pixels(out), scale, 0), scale, 1).astype(int)
    inside_box = (slice(20 * scale, 30 * scale), slice(20 * scale, 30 * scale))
    outside = (slice(2 * scale, 4 * scale), slice(28 * scale, 30 * scale))
    assert np.array_equal(overlay[inside_box], image[inside_box])  # the colour drawn, not tinted
    assert np.array_equal(overlay[outside], image[outside])
    from eligen.overlay import entity_colour

    assert tuple(overlay[28 * scale, 16 * scale]) == entity_colour(1)  # the box's left edge, outlined
    assert "eligen" in Image.open(overlay_path_for(out)).text


def test_flags_reach_the_generation(tmp_path, layout_file, tiny_pipeline_dir):
    def render(name: str, *flags: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        assert run("generate", layout_file, "-o", out, "--model", tiny_pipeline_dir, *FAST, *flags) == 0
        return pixels(out)

    base = render("base")
    assert not np.array_equal(base, render("guidance", "--guidance", "1.0"))
    assert not np.array_equal(base, render("cfg", "--true-cfg", "1"))
    assert not np.array_equal(base, render("neg", "--entities-on-negative"))
    assert not np.array_equal(base, render("steps", "--steps", "3"))
    assert np.array_equal(base, render("same", "--device", "cpu", "--dtype", "float32", "--no-progress"))
    assert not np.array_equal(base, render("trim", "--entity-tokens", "trim"))
    assert read_metadata(tmp_path / "trim.png")["params"]["entity_tokens"] == "trim"
    resized = render("size", "--width", "48", "--height", "40")
    assert resized.shape == (40, 48, 3)
    record = read_metadata(tmp_path / "size.png")
    assert record["layout"]["entities"][1]["box"] == [24.0, 20.0, 48.0, 40.0]  # boxes scale with the size


def test_speed_flags_reach_the_pipeline(tmp_path, layout_file, tiny_pipeline_dir, monkeypatch):
    from eligen import EliGenPipeline

    calls, compiled = [], []
    original = EliGenPipeline.__call__

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EliGenPipeline, "__call__", recording)
    monkeypatch.setattr(EliGenPipeline, "compile_transformer", lambda self, **kw: compiled.append(self))
    images = {}
    for attention in ("dense", "segmented"):
        out = tmp_path / f"{attention}.png"
        assert run("generate", layout_file, "-o", out, "--model", tiny_pipeline_dir, *FAST, "--attention",
                   attention, "--compile") == 0
        assert (calls[-1]["attention"], calls[-1]["compile"]) == (attention, True)
        assert read_metadata(out)["environment"]["attention"] == attention
        images[attention] = pixels(out).astype(int)
    assert len(compiled) == 2  # the pipeline was asked to compile, once per call
    assert np.abs(images["dense"] - images["segmented"]).max() <= 1  # exact modes: the same image
    assert run("generate", layout_file, "-o", tmp_path / "auto.png", "--model", tiny_pipeline_dir, *FAST) == 0
    assert (calls[-1]["attention"], calls[-1]["compile"]) == ("auto", False)
    assert "attention" not in read_metadata(tmp_path / "auto.png")["params"]  # a run choice, not read by --from


def test_progress_bar_shown_by_default(tmp_path, layout_file, tiny_pipeline_dir, capsys):
    assert run("generate", layout_file, "-o", tmp_path / "a.png", "--model", tiny_pipeline_dir, *FAST) == 0
    assert "2/2" in capsys.readouterr().err
    assert run("generate", layout_file, "-o", tmp_path / "b.png", "--model", tiny_pipeline_dir, *FAST,
               "--no-progress") == 0
    assert "2/2" not in capsys.readouterr().err


def test_random_seed_is_recorded(tmp_path, tiny_pipeline_dir):
    layout = {"prompt": "a cat", "width": 16, "height": 16, "entities": [{"prompt": "a dog", "box": [0, 0, 8, 8]}]}
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    out = tmp_path / "x.png"
    assert run("generate", path, "-o", out, "--model", tiny_pipeline_dir, *FAST) == 0
    seed = read_metadata(out)["params"]["seed"]
    assert isinstance(seed, int)
    again = tmp_path / "y.png"
    assert run("generate", "--from", out, "-o", again) == 0
    assert np.array_equal(pixels(out), pixels(again))


def test_lora_flag_changes_the_image(tmp_path, layout_file, tiny_pipeline_dir, random_lora_file):
    lora_file = random_lora_file

    plain, with_lora = tmp_path / "plain.png", tmp_path / "lora.png"
    assert run("generate", layout_file, "-o", plain, "--model", tiny_pipeline_dir, *FAST) == 0
    assert run("generate", layout_file, "-o", with_lora, "--model", tiny_pipeline_dir, "--lora", lora_file,
               *FAST) == 0
    assert not np.array_equal(pixels(plain), pixels(with_lora))
    assert read_metadata(with_lora)["params"]["lora"] == [str(lora_file)]
    again = tmp_path / "again.png"
    assert run("generate", "--from", with_lora, "-o", again) == 0
    assert np.array_equal(pixels(with_lora), pixels(again))


@pytest.mark.parametrize(
    ("entity", "expected"),
    [
        ({"prompt": "", "box": [0, 0, 8, 8]}, "field 'prompt'"),
        ({"prompt": "x", "box": [8, 8, 4, 12]}, "field 'box'"),
        ({"prompt": "x", "box": [0, 0, 8, 8], "polygon": [[0, 0], [1, 0], [0, 1]]}, "mask/box/polygon"),
        ({"prompt": "x", "mask": "missing.png"}, "field 'mask'"),
        ({"prompt": "x", "colour": "red", "box": [0, 0, 8, 8]}, "field 'colour'"),
    ],
)
def test_bad_layout_is_a_clear_error(tmp_path, tiny_pipeline_dir, capsys, entity, expected):
    layout = {"prompt": "p", "width": 32, "height": 32,
              "entities": [{"prompt": "fine", "box": [0, 0, 16, 16]}, entity]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(layout))
    out = tmp_path / "never.png"
    assert run("generate", path, "-o", out, "--model", tiny_pipeline_dir, *FAST) == 2
    err = capsys.readouterr().err
    assert "entity 1" in err and expected in err and "Traceback" not in err
    assert not out.exists()


def test_entity_too_small_for_the_latent_grid(tmp_path, tiny_pipeline_dir, capsys):
    layout = {"prompt": "p", "width": 32, "height": 32, "entities": [{"prompt": "speck", "box": [1.2, 1.2, 1.4, 1.4]}]}
    path = tmp_path / "speck.json"
    path.write_text(json.dumps(layout))
    assert run("generate", path, "-o", tmp_path / "o.png", "--model", tiny_pipeline_dir, *FAST) == 2
    err = capsys.readouterr().err
    assert "entity 0" in err and "field 'box'" in err and "latent grid" in err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--steps", "0"], "--steps"),
        (["--true-cfg", "0.5"], "--true-cfg"),
        (["--max-sequence-length", "600"], "--max-sequence-length"),
        (["--width", "-3"], "--width"),
    ],
)
def test_bad_flags(tmp_path, layout_file, tiny_pipeline_dir, capsys, flags, expected):
    assert run("generate", layout_file, "-o", tmp_path / "o.png", "--model", tiny_pipeline_dir, *flags) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--attention", "sparse"), ("--entity-tokens", "short")])
def test_bad_choice_flags(tmp_path, layout_file, capsys, flag, value):
    from eligen.generate import GenerateConfig

    with pytest.raises(SystemExit) as exit_info:
        run("generate", layout_file, "-o", tmp_path / "o.png", flag, value)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(ValueError, match=flag):  # the config itself checks too (e.g. values read from a PNG)
        GenerateConfig(**{flag[2:].replace("-", "_"): value})


def test_missing_inputs(tmp_path, layout_file, capsys):
    assert run("generate", layout_file, "-o", tmp_path / "o.png", "--model", "") == 2
    assert "--model" in capsys.readouterr().err
    assert run("generate", layout_file, "--model", "x") == 2
    assert "-o" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert run("generate", "--from", plain, "-o", tmp_path / "o.png") == 2
    assert "no eligen metadata" in capsys.readouterr().err
    assert run("generate", layout_file, "--from", plain, "-o", tmp_path / "o.png") == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["inpaint"], ["train"], ["lora"], ["lora", "info"], ["lora", "convert"]])
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: eligen " + " ".join(command) in capsys.readouterr().out


@pytest.mark.parametrize(("command", "shown"), [
    (["generate"], ["runs 20 on eligen-tiny", "runs 32 on eligen-tiny", "runs 3.0 on eligen-tiny"]),
    (["data", "generate"], ["runs 20 on eligen-tiny", "runs 3.0 on eligen-tiny"]),
])
def test_help_says_what_runs_on_the_default_model(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(s in text for s in shown), text


@pytest.mark.parametrize("argv", [["--verbose", "lora", "info", "x"], ["lora", "info", "x", "--verbose"],
                                  ["generate", "l.json", "--verbose", "-o", "o.png"]])
def test_verbose_goes_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).verbose is True

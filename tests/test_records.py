"""Records that travel: what an image's record stores reproduces it on another machine or checkout (the shipped
model and its LoRA by name, inputs by content), `--from` reads PNGs, JPEG/WebP sidecars and layout JSON alike, and
no output ever replaces an input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eligen
from eligen.cli import main
from eligen.generate import read_metadata
from eligen.models import TINY_MODEL_DIR

FAST = ["--steps", "2", "--max-sequence-length", "16", "--no-progress"]
LAYOUT = {"prompt": "a red circle on a gray background", "width": 32, "height": 32, "seed": 3,
          "entities": [{"prompt": "a red circle", "box": [4, 4, 20, 20]}]}


def run(*args) -> int:
    return main([str(a) for a in args])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


@pytest.fixture()
def scene(tmp_path) -> Path:
    path = tmp_path / "scene.json"
    path.write_text(json.dumps(LAYOUT))
    return path


def test_a_jpeg_record_never_replaces_its_layout_and_from_reads_every_form(tmp_path, scene, tiny_pipeline_dir):
    before = scene.read_bytes()
    out = tmp_path / "scene.jpg"
    assert run("generate", scene, "-o", out, "--model", tiny_pipeline_dir, *FAST) == 0
    assert scene.read_bytes() == before  # the layout is untouched; the record is beside the image
    sidecar = tmp_path / "scene.jpg.json"
    assert read_metadata(out) == json.loads(sidecar.read_text())
    png = tmp_path / "png.png"
    assert run("generate", scene, "-o", png, "--model", tiny_pipeline_dir, *FAST) == 0
    for source in (out, sidecar, png, scene):  # the image, its sidecar, a PNG, the layout itself
        again = tmp_path / f"again-{source.name}.png"
        flags = ["--model", tiny_pipeline_dir, *FAST] if source == scene else ["--no-progress"]
        assert run("generate", "--from", source, "-o", again, *flags) == 0, source
        assert np.array_equal(pixels(again), pixels(png)), source


def test_an_output_that_would_replace_an_input_is_refused_before_any_work(tmp_path, scene, capsys, monkeypatch):
    import eligen.generate as generate_module

    monkeypatch.setattr(generate_module, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(photo)
    before = photo.read_bytes()
    assert run("inpaint", photo, scene, "-o", photo, *FAST) == 2
    assert "would replace the input" in capsys.readouterr().err and photo.read_bytes() == before
    sidecar_clash = tmp_path / "x.jpg"
    (tmp_path / "x.jpg.json").write_text(json.dumps(LAYOUT))
    assert run("generate", tmp_path / "x.jpg.json", "-o", sidecar_clash, *FAST) == 2
    assert "would replace the input" in capsys.readouterr().err


def test_inpaint_from_finds_its_input_by_content_anywhere(tmp_path, scene, tiny_pipeline_dir, capsys, monkeypatch):
    made = tmp_path / "made"
    made.mkdir()
    photo = made / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)).save(photo)
    out = made / "out.png"
    monkeypatch.chdir(made)
    assert run("inpaint", "photo.png", scene, "-o", "out.png", "--model", tiny_pipeline_dir, *FAST) == 0
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    shutil.copy(out, elsewhere / "out.png")
    shutil.copy(photo, elsewhere / "photo.png")
    monkeypatch.chdir(tmp_path)  # another working directory: the relative path recorded does not resolve
    again = tmp_path / "again.png"
    assert run("inpaint", "--from", elsewhere / "out.png", "-o", again, "--no-progress") == 0
    assert np.array_equal(pixels(again), pixels(out))
    Image.new("RGB", (32, 32)).save(elsewhere / "photo.png")  # same name, other content
    assert run("inpaint", "--from", elsewhere / "out.png", "-o", again, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "photo.png (sha256 " in err and "holds another image" in err and "Traceback" not in err
    (elsewhere / "photo.png").unlink()
    assert run("inpaint", "--from", elsewhere / "out.png", "-o", again, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "photo.png" in err and "eligen inpaint IMAGE --from" in err and "Errno" not in err
    assert run("inpaint", photo, "--from", elsewhere / "out.png", "-o", again, "--no-progress") == 0  # given: used
    assert np.array_equal(pixels(again), pixels(out))


def test_a_missing_inpaint_input_is_named(tmp_path, scene, capsys):
    assert run("inpaint", tmp_path / "nowhere.png", scene, "-o", tmp_path / "o.png", *FAST) == 2
    err = capsys.readouterr().err
    assert "nowhere.png does not exist" in err and "Errno" not in err


def test_the_shipped_model_and_its_files_have_portable_names():
    from eligen.models import portable_name, resolve_file

    lora = TINY_MODEL_DIR / "eligen_lora.safetensors"
    assert portable_name(str(TINY_MODEL_DIR)) == "eligen-tiny"
    assert portable_name(str(lora)) == "eligen-tiny/eligen_lora.safetensors"
    assert Path(resolve_file("eligen-tiny/eligen_lora.safetensors")) == lora
    assert portable_name("some/hub-id") == "some/hub-id" and resolve_file("x.safetensors") == "x.safetensors"


def _clone(root: Path) -> Path:
    """A checkout of the package alone (its sources and the shipped model), as another clone would have it."""
    shutil.copytree(Path(eligen.__file__).parent, root / "src" / "eligen",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _eligen(clone: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(clone / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "eligen.cli", *map(str, args)], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=600)


def test_from_reproduces_an_image_of_another_checkout_byte_for_byte(tmp_path):
    # clone A renders with its shipped LoRA named by its own path; clone B, once A is gone, reproduces the PNG
    a, b = _clone(tmp_path / "a"), _clone(tmp_path / "b")
    shutil.copy(Path(__file__).parents[1] / "examples" / "tiny_two_shapes.json", a / "layout.json")
    made = _eligen(a, "generate", "layout.json", "-o", "a.png", "--steps", "2", "--no-progress",
                   "--lora", a / "src" / "eligen" / "tiny" / "model" / "eligen_lora.safetensors")
    assert made.returncode == 0, made.stderr
    assert read_metadata(a / "a.png")["params"]["lora"] == ["eligen-tiny/eligen_lora.safetensors"]
    shutil.move(a / "a.png", tmp_path / "a.png")
    shutil.rmtree(a)
    again = _eligen(b, "generate", "--from", tmp_path / "a.png", "-o", "b.png", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert (b / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()

"""What a person sees: start-up without torch, no library noise unless --verbose, one warning-free LoRA stack."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
    ENV.pop(name, None)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["generate", "--help"], ["train", "--help"],
                                  ["ui", "--help"],
                                  ["generate", "examples/tiny_two_shapes.json", "-o", "x.png", "--steps", "0"]])
def test_help_version_and_validation_import_no_torch(argv):
    code = ("import sys\nfrom eligen.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nheavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.__stdout__)\nsys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=ENV)
    assert "HEAVY []" in result.stdout
    if argv[-1] == "0":  # a bad value: a clear message and a non-zero exit, before anything loads
        assert result.returncode == 2 and "--steps must be >= 1" in result.stderr
    else:
        assert result.returncode == 0 and result.stderr == ""


def test_libraries_stay_quiet_unless_verbose(tmp_path):
    # the shipped default model at the layout's size, its native one (no size warning is due)
    args = ["generate", "examples/tiny_two_shapes.json", "--steps", "1", "--no-progress"]
    quiet = subprocess.run([sys.executable, "-m", "eligen.cli", *args, "-o", str(tmp_path / "a.png")],
                           capture_output=True, text=True, env=ENV)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "eligen.cli", "--verbose", *args, "-o", str(tmp_path / "b.png")],
                          capture_output=True, text=True, env=ENV)
    assert loud.returncode == 0 and "Loading pipeline components" in loud.stderr


def test_stacking_loras_does_not_warn(tiny_pipeline_dir, random_lora_file):
    from eligen import EliGenPipeline

    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_eligen_lora(random_lora_file, adapter_name="one")
        pipe.load_eligen_lora(random_lora_file, adapter_name="two")
    assert set(pipe.get_active_adapters()) == {"one", "two"}

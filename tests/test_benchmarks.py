"""The benchmark scripts run end to end on the CPU at tiny sizes, and their exact rows agree with the dense mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import diffsynth_reference  # noqa: E402


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_gpu_check_script_runs_the_benchmarks(tmp_path):
    """The one-command GPU check at CPU sizes, each benchmark script end to end through it (one run of each, for the
    script's wiring and the benchmarks' own checks): logs and JSON in $OUT, the exact rows agreeing with the dense
    mask, the accelerators' errors against the exact image, the per-family rows."""
    env = {**os.environ, "OUT": str(tmp_path), "WHEELS": str(tmp_path / "no-wheels"), "SIZE": "tiny",
           "ENTITIES": "0,2", "VARIANTS": "dense,reference,segmented", "RAARGS": "--warmup 0 --iters 1",
           "OPARGS": "--device cpu --heads 2 --side 8 --segment 16 --entities 3 --iters 1",
           "E2EARGS": "--steps 3 --warmup 0 --iters 1 --entities 0,2 --accel-entities 2 --variants plain,exact,"
           "reference,fbc-0,fbc-100,fp8,entity-steps-1,mask-every-2,model-offload,sequential-offload",
           "QWEN": "1", "QWEN_E2EARGS": "--steps 3 --iters 0 --entities 2 --accel-entities 2 --variants plain,exact,"
           "reference,fbc-0,fbc-100,fp8,entity-steps-1,mask-every-2,model-offload",
           "FAMILIES": "1", "FAMILY_ARGS": "--families z_image --steps 2 --warmup 0 --iters 1", "CP_ARGS": "--steps 1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3: this one
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"attention_op.json", "attention_op.log",
                                                    "regional_attention.json", "regional_attention.log",
                                                    "generate_e2e.json", "generate_e2e.log",
                                                    "generate_e2e_qwen.json", "generate_e2e_qwen.log",
                                                    "family_overhead.json", "family_overhead.log",
                                                    "context_parallel.json", "context_parallel.log"}
    # no GPU here: 2 gloo ranks at the tiny size, said in the log, and the image equal to the single-device one
    assert "2 ranks need 2 devices" in (tmp_path / "context_parallel.log").read_text()
    cp = json.loads((tmp_path / "context_parallel.json").read_text())
    assert cp["world_size"] == 2 and cp["device"] == "cpu" and cp["max_abs_diff"] <= 1e-4 * cp["max_abs"]
    check_attention_op(json.loads((tmp_path / "attention_op.json").read_text()),
                       (tmp_path / "attention_op.log").read_text())
    check_regional_attention(json.loads((tmp_path / "regional_attention.json").read_text()),
                             (tmp_path / "regional_attention.log").read_text())
    check_generate_e2e(json.loads((tmp_path / "generate_e2e.json").read_text()),
                       (tmp_path / "generate_e2e.log").read_text())
    check_generate_e2e_qwen(json.loads((tmp_path / "generate_e2e_qwen.json").read_text()),
                            (tmp_path / "generate_e2e_qwen.log").read_text())
    check_family_overhead(json.loads((tmp_path / "family_overhead.json").read_text()),
                          (tmp_path / "family_overhead.log").read_text())


def check_attention_op(report: dict, stdout: str) -> None:
    assert report["device"] == "CPU" and report["entities"] == 3 and report["length"] == 4 * 16 + 64
    assert set(report["ms"]) == {"plain", "dense-bool", "reference-float", "segmented", "segmented-compiled"}
    errors = report["max_abs_diff_from_dense"]
    assert errors["plain"] is None and max(errors[row] for row in report["ms"] if row != "plain") < 1e-5
    assert "| segmented-compiled |" in stdout and "FlexAttention rows: CUDA only" in stdout


def check_regional_attention(report: list, stdout: str) -> None:
    rows = {(row["variant"], row["entities"]): row for row in report}
    assert set(rows) == {("plain", 0), ("dense", 2), ("reference", 2), ("segmented", 2)}
    assert rows["reference", 2]["ratio_to_reference"] == 1.0 and rows["plain", 0]["ratio_to_plain"] == 1.0
    assert all(row["forward_ms"] > 0 for row in rows.values())
    line = next(line for line in stdout.splitlines() if "max |segmented - dense| at N=2" in line)
    assert float(line.rsplit(":", 1)[1]) < 1e-5


def check_family_overhead(report: dict, stdout: str) -> None:
    """Per-family cost on one family's tiny pipeline: stock, zero entities (bit-identical to stock), two entities in
    each attention form, every image of the forms equal to the dense one to float rounding."""
    rows = {row["variant"]: row for row in report["rows"]}
    assert report["shapes"] == "tiny" and list(rows) == ["stock", "eligen", "dense", "flex", "segmented"]
    assert {row["family"] for row in rows.values()} == {"Z-Image"} and rows["stock"]["ratio_to_stock"] == 1.0
    assert rows["eligen"]["exact"] is True and rows["eligen"]["entities"] == 0
    assert all(rows[form]["entities"] == 2 and rows[form]["max_abs_diff_from_dense"] < 1e-5
               for form in ("dense", "flex", "segmented"))
    assert all(row["ms"] > 0 and row["image_tokens"] >= 16 for row in rows.values())
    assert "| Z-Image | eligen | 0 |" in stdout and "exact" in stdout


def check_generate_e2e(report: dict, stdout: str) -> None:
    """Whole images on the CPU: plain FluxPipeline, the exact mode and one row per accelerator, errors against the
    exact image (the exact ones: offloading equal, and the first-block cache skipping nothing)."""
    assert report["size"] == "tiny" and report["steps"] == 3
    rows = {(row["variant"], row["entities"]): row for row in report["rows"]}
    assert set(rows) == {("plain", 0), ("exact", 0), ("exact", 2), ("fbc-0", 2), ("fbc-100", 2), ("fp8", 2),
                         ("entity-steps-1", 2), ("mask-every-2", 2), ("model-offload", 2)}
    assert all(row["seconds"] > 0 for row in rows.values()) and rows["plain", 0]["ratio_to_plain"] == 1.0
    # 3 steps x 2 CFG branches: an infinite threshold runs the whole network once per branch, a zero one always
    assert rows["fbc-0", 2]["cache_skipped"] == 0 and rows["fbc-100", 2]["cache_skipped"] == round(1 - 2 / 6, 3)
    assert rows["fbc-0", 2]["psnr_vs_exact"] == float("inf")  # skipping nothing is exact
    assert rows["model-offload", 2]["psnr_vs_exact"] >= 100  # float rounding (tests/test_offload.py)
    assert not rows["fbc-0", 2]["approximate"] and not rows["model-offload", 2]["approximate"]
    for approximate in ("fbc-100", "fp8", "entity-steps-1", "mask-every-2"):
        assert rows[approximate, 2]["approximate"] and 5 < rows[approximate, 2]["psnr_vs_exact"] < float("inf")
    assert "sequential-offload: CUDA only" in stdout and "| exact | 2 |" in stdout
    assert "reference: needs FLUX.1's widths" in stdout or "reference: diffsynth is not importable" in stdout


def check_generate_e2e_qwen(report: dict, stdout: str) -> None:
    """The same rows on the tiny random Qwen-Image pipeline (stock QwenImagePipeline as the plain row)."""
    rows = {(row["variant"], row["entities"]): row for row in report["rows"]}
    assert report["size"] == "qwen-tiny" and set(rows) == {
        ("plain", 0), ("exact", 2), ("fbc-0", 2), ("fbc-100", 2), ("fp8", 2), ("entity-steps-1", 2),
        ("mask-every-2", 2), ("model-offload", 2)}
    assert rows["fbc-0", 2]["cache_skipped"] == 0 and rows["fbc-100", 2]["cache_skipped"] == round(1 - 2 / 6, 3)
    assert rows["fbc-0", 2]["psnr_vs_exact"] == float("inf") and rows["model-offload", 2]["psnr_vs_exact"] >= 100
    for approximate in ("fbc-100", "fp8", "entity-steps-1", "mask-every-2"):
        assert rows[approximate, 2]["approximate"] and 5 < rows[approximate, 2]["psnr_vs_exact"] < float("inf")
    assert "reference: needs Qwen-Image's widths" in stdout or "reference: diffsynth is not importable" in stdout


def test_every_family_gives_its_released_transformers_shapes():
    """``family_overhead.py --shapes real`` reads each family's released transformer config from its testing module:
    one per diffusers pipeline the family serves, constructible (on the meta device) at 1-40B parameters, its block
    lists capped by ``layers``."""
    import diffusers
    import torch

    from eligen.families import cards
    from eligen.families.card import load

    seen = []
    for card in [c for main in cards().values() for c in (main, *main.variants)]:
        shapes = load(card.tiny_pipeline.rpartition(":")[0] + ":real_shapes")(card.pipelines[0])
        assert shapes, card.title
        for shape in shapes:
            with torch.device("meta"):
                model = getattr(diffusers, card.transformers[0])(**shape.config)
                one_block = getattr(diffusers, card.transformers[0])(**shape.capped(1))
            params = sum(p.numel() for p in model.parameters())
            assert 1e9 < params < 4e10 and sum(p.numel() for p in one_block.parameters()) < params, shape.name
            assert shape.source and shape.text_tokens >= 128
            seen.append(shape.name)
    assert {"FLUX.2 [dev]", "FLUX.2 [klein] 4B", "FLUX.2 [klein] 9B", "Z-Image (6B)", "Krea 2",
            "Qwen-Image 2.1"} <= set(seen)


def test_family_overhead_refuses_an_unknown_family(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "family_overhead.py"), "--families", "sdxl",
                           "--json", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown family sdxl; known: flux," in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not (diffsynth_reference.available() and diffsynth_reference.qwen_available()),
                    reason="the reference package diffsynth is not importable")
@pytest.mark.parametrize("size", ["flux-1block", "qwen-1block"])
def test_generate_e2e_reference_loop_draws_the_exact_image(tmp_path, size):
    """The released models' widths with one block: the reference's own true-CFG loop (its forward, its mask
    builder, two steps so the shifted schedule counts) decodes to the image of the exact mode with entities (without
    them the forward equals the reference in tests/test_diffsynth_reference.py)."""
    out = tmp_path / "e2e.json"
    run_script("generate_e2e.py", "--size", size, "--steps", "2", "--iters", "0", "--entities", "2",
               "--accel-entities", "2", "--variants", "exact,reference", "--json", str(out))
    rows = {(row["variant"], row["entities"]): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("exact", 2), ("reference", 2)}
    assert rows["reference", 2]["psnr_vs_exact"] >= 90, rows["reference", 2]  # float rounding only
    assert rows["reference", 2]["ratio_to_exact"] is not None


def test_train_throughput_runs_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import tempfile

    import train_throughput

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--steps", "1", "--batch-size", "2", "--resolution", "32",
                                      "--rank", "2"])
    train_throughput.main()  # the timed steps go on from the warm-up's checkpoint instead of refusing them
    out = capsys.readouterr().out
    assert "with entities" in out and "entities cost:" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("eligen-throughput-")]

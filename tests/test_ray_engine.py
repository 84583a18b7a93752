"""`--engine ray`: the batch commands' items on a pool of Ray actors (one local Ray, CPU actors, for the session).

The same files as the in-process loop, byte for byte; a killed driver or actor loses nothing and duplicates
nothing; an item that always fails is retried, then named, and the others finish; the VLM server pool spreads
requests and fails over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eligen.cli import main
from eligen.data.annotate import AnnotateConfig, annotate
from eligen.data.generate import DataGenerateConfig, generate_images
from eligen.data.vlm import PoolBackend, VLMError, make_backend
from eligen.scale.ray_engine import EXIT_ONCE_HOOK, FAIL_HOOK
from test_annotate import QuietServer, serve
from test_annotate import server as vlm_server  # noqa: F401 - the fake OpenAI-compatible server fixture

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")  # one local Ray per run: these tests share one pytest-xdist worker

CAPTIONS = ["a red cat", "a blue dog", "a green tree", "a yellow sun"]
SMALL = {"steps": 2, "height": 32, "width": 32, "max_sequence_length": 16, "progress": False}
SRC = str(Path(__file__).parents[1] / "src")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray (2 CPUs, no dashboard) for every test of the session; its address for subprocess drivers.
    Its workers inherit this environment: the source tree goes on their PYTHONPATH for the session."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, before]))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if before is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = before


@pytest.fixture
def captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    return path


def pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def local_images(tmp_path_factory, tiny_pipeline_dir) -> dict[str, bytes]:
    """The in-process engine's images of CAPTIONS three times (12 items): what every Ray run must reproduce byte
    for byte."""
    root = tmp_path_factory.mktemp("local")
    (root / "captions.txt").write_text("\n".join(CAPTIONS * 3) + "\n", encoding="utf-8")
    generate_images(DataGenerateConfig(captions=root / "captions.txt", model=str(tiny_pipeline_dir), out=root / "out",
                                       **SMALL))
    return pngs(root / "out")


def test_a_killed_actor_is_restarted_and_a_failing_item_is_retried_named_and_alone(
        ray_cluster, tiny_pipeline_dir, captions, tmp_path, local_images, monkeypatch, capsys):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    monkeypatch.setenv(EXIT_ONCE_HOOK, f"{hooks}:000002")  # the actor dies the first time it starts item 2
    monkeypatch.setenv(FAIL_HOOK, f"{hooks}:000001")  # item 1 raises on every attempt
    out = tmp_path / "out"
    code = main(["data", "generate", str(captions), "-o", str(out), "--model", str(tiny_pipeline_dir), "--steps",
                 "2", "--height", "32", "--width", "32", "--max-sequence-length", "16", "--no-progress",
                 "--engine", "ray", "--num-gpus", "0", "--retries", "2"])
    captured = capsys.readouterr()
    assert code == 1
    assert "failed: 000001: RuntimeError: test hook: item 000001 always fails (after 3 attempt(s))" in captured.err
    assert "1 item(s) failed" in captured.err and "3 new" in captured.out
    assert (hooks / "attempts-000001").read_text().count("attempt") == 3  # 1 + --retries, then given up
    assert (hooks / "exited-000002").exists()  # the actor did die
    done = pngs(out)
    assert sorted(done) == ["000000.png", "000002.png", "000003.png"]
    assert all(done[name] == local_images[name] for name in done)


def test_a_killed_driver_loses_nothing_and_a_rerun_on_two_actors_does_each_item_once_with_the_local_bytes(
        ray_cluster, tiny_pipeline_dir, tmp_path, local_images):
    many = tmp_path / "captions.txt"
    many.write_text("\n".join(CAPTIONS * 3) + "\n", encoding="utf-8")  # 12 items: the kill comes part-way
    out = tmp_path / "out"
    command = [sys.executable, "-m", "eligen.cli", "data", "generate", str(many), "-o", str(out), "--model",
               str(tiny_pipeline_dir), "--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length",
               "16", "--no-progress", "--engine", "ray", "--num-gpus", "0", "--ray-address", ray_cluster]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((out / "images").glob("*.png")) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    first = pngs(out)
    assert 1 <= len(first) < 12, "the driver was not killed part-way"
    result = generate_images(DataGenerateConfig(captions=many, model=str(tiny_pipeline_dir), out=out, **SMALL,
                                                engine="ray", actors=2, num_gpus=0))
    assert result.skipped >= len(first) and result.done + result.skipped == 12 and not result.failed
    assert pngs(out) == local_images  # every item once, nothing else, nothing corrupt: the in-process bytes
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(12))
    again = generate_images(DataGenerateConfig(captions=many, model=str(tiny_pipeline_dir), out=out, **SMALL,
                                               engine="ray", num_gpus=0))
    assert (again.done, again.skipped) == (0, 12)  # finished items are skipped before Ray is asked


def test_bench_shapes_on_ray_gives_the_local_results(ray_cluster, tiny_pipeline_dir, random_lora_file, tmp_path,
                                                     capsys):
    args = ["bench", "shapes", "--model", str(tiny_pipeline_dir), "--lora", str(random_lora_file), "--n", "2",
            "--steps", "2", "--size", "32", "--sheet", "2", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "local")]) == 0
    assert main([*args, "-o", str(tmp_path / "ray"), "--engine", "ray", "--num-gpus", "0"]) == 0
    local, on_ray = (json.loads((tmp_path / name / "shapesbench.json").read_text()) for name in ("local", "ray"))
    assert on_ray["scores"] == local["scores"] and on_ray["summary"] == local["summary"]
    assert on_ray["resolved"] == local["resolved"]
    assert {k: v for k, v in on_ray["config"].items() if k not in ("engine", "actors", "num_gpus", "output_dir")} == \
        {k: v for k, v in local["config"].items() if k not in ("engine", "actors", "num_gpus", "output_dir")}
    assert (tmp_path / "ray" / "contact_sheet.png").read_bytes() == \
        (tmp_path / "local" / "contact_sheet.png").read_bytes()


def _annotation_files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((folder / "annotations").glob("*.json"))}


def test_annotate_on_ray_over_a_server_pool_writes_the_local_files(ray_cluster, vlm_server, tmp_path):  # noqa: F811
    from test_annotate import make_folder

    dead = QuietServer(("127.0.0.1", 0), None)
    dead_url = f"http://127.0.0.1:{dead.server_address[1]}/v1"
    dead.server_close()  # nothing listens there: every request to it fails at once
    local, _ = make_folder(tmp_path / "local", ["json"] * 4)
    pooled, _ = make_folder(tmp_path / "ray", ["json"] * 4)
    common = {"model": "fake-vl", "progress": False, "sheet": 2, "timeout": 5.0, "concurrency": 2}
    annotate(AnnotateConfig(folder=local, base_url=vlm_server.base_url, **common))
    result = annotate(AnnotateConfig(folder=pooled, vlm_url=[dead_url, vlm_server.base_url], engine="ray",
                                     num_gpus=0, **common))
    assert (result.done, result.failed, result.errors) == (4, 0, [])
    assert _annotation_files(pooled) == _annotation_files(local) and len(_annotation_files(local)) == 4
    assert (pooled / "annotations.jsonl").read_text() == (local / "annotations.jsonl").read_text()


@pytest.fixture
def second_server():
    from test_annotate import FakeVLM, Handler

    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.fake = FakeVLM()
    yield from serve(httpd)


def test_the_pool_spreads_requests_round_robin_and_fails_over(vlm_server, second_server, tmp_path):  # noqa: F811
    from test_annotate import make_folder

    folder, _ = make_folder(tmp_path / "data", ["json"] * 6)
    config = AnnotateConfig(folder=folder, model="fake-vl", base_url=vlm_server.base_url,
                            vlm_url=[second_server.base_url], progress=False, concurrency=1, sheet=0, timeout=5.0)
    assert annotate(config).done == 6
    assert len(vlm_server.fake.bodies) == len(second_server.fake.bodies) == 3  # spread evenly
    backend = make_backend("openai", "fake-vl", [vlm_server.base_url, second_server.base_url], "NO_KEY_HERE", 5.0)
    assert isinstance(backend, PoolBackend)
    second_server.fake.raw_body = b"not json"  # the second server now fails every request
    before = len(vlm_server.fake.bodies)
    answers = [backend.ask("hello") for _ in range(4)]  # turns 0..3: the failing server's turns go to the first
    assert answers == ["text only: hello"] * 4 and len(vlm_server.fake.bodies) == before + 4
    vlm_server.fake.raw_body = b"not json either"
    with pytest.raises(VLMError, match=r"all 2 servers of the pool failed: .*choices"):
        backend.ask("hello")


def test_the_engine_options_are_checked_and_ray_is_imported_only_when_asked(tmp_path, captions, monkeypatch,
                                                                            capsys):
    for bad, message in [({"engine": "spark"}, "--engine must be one of local, ray"),
                         ({"actors": 0}, "--actors must be an integer >= 1"),
                         ({"retries": -1}, "--retries must be an integer >= 0"),
                         ({"num_gpus": -1.0}, "--num-gpus must be a number >= 0")]:
        with pytest.raises(ValueError, match=message):
            DataGenerateConfig(captions=captions, out=tmp_path, **bad)
    code = subprocess.run([sys.executable, "-c", "import sys; import eligen.cli, eligen.data.generate, "
                           "eligen.data.annotate, eligen.tiny.bench; assert 'ray' not in sys.modules"],
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])})
    assert code.returncode == 0
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["data", "generate", str(captions), "-o", str(tmp_path / "o"), "--engine", "ray"]) == 2
    assert 'needs Ray Data: pip install "eligen[ray]"' in capsys.readouterr().err


def test_a_benchmarks_generation_stage_on_ray_writes_the_local_images(ray_cluster, tiny_pipeline_dir, tmp_path):
    from test_evals_harness import write_mig

    data = write_mig(tmp_path / "mig")
    args = ["bench", "cocomig", "--data", str(data), "--model", str(tiny_pipeline_dir), "--stage", "generate",
            "--steps", "2", "--width", "32", "--height", "32", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "local")]) == 0
    assert main([*args, "-o", str(tmp_path / "ray"), "--engine", "ray", "--num-gpus", "0"]) == 0
    assert pngs(tmp_path / "ray") == pngs(tmp_path / "local") and len(pngs(tmp_path / "local")) == 2


def test_an_actor_that_dies_more_than_the_retries_stops_the_run_with_one_line(
        ray_cluster, tiny_pipeline_dir, captions, tmp_path, monkeypatch, capsys):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    monkeypatch.setenv(EXIT_ONCE_HOOK, f"{hooks}:000000")
    code = main(["data", "generate", str(captions), "-o", str(tmp_path / "out"), "--model", str(tiny_pipeline_dir),
                 "--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length", "16", "--no-progress",
                 "--engine", "ray", "--num-gpus", "0", "--retries", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "eligen: error: the Ray run stopped (" in err and "every finished item is kept: rerun" in err


def test_where_ray_runs_and_how_many_gpus_an_actor_gets(monkeypatch):
    from eligen.scale import ray_engine

    class FakeRay:
        def __init__(self, initialized):
            self.initialized, self.calls = initialized, []

        def is_initialized(self):
            return self.initialized

        def init(self, **kwargs):
            self.calls.append(kwargs)

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    fake = FakeRay(False)
    assert ray_engine._connect(fake, None) is True and fake.calls[0]["address"] == "ray://head:10001"
    assert ray_engine._connect(fake, "head:6379") is True and fake.calls[1]["address"] == "head:6379"  # the flag wins
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_engine._connect(fake, None) is True and fake.calls[2]["address"] is None  # a local Ray
    running = FakeRay(True)
    assert ray_engine._connect(running, "head:6379") is False and not running.calls  # reused, never shut down
    assert ray_engine.default_num_gpus("cuda:1") == 1.0 and ray_engine.default_num_gpus("cpu") == 0.0

"""Annotating an image folder through a fake OpenAI-compatible VLM server on 127.0.0.1 (no real model, no network)."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
import types
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from eligen.data import annotate as annotate_module
from eligen.data.annotate import AnnotateConfig, annotate, model_view_size, parse_shard
from eligen.data.vlm import OpenAIBackend, VLMBackend, VLMError

W, H = 84, 56  # multiples of 28 above Qwen's minimum area: the image is sent unchanged, boxes stay in pixels
KINDS = {"json": 10, "qwen2": 20, "flaky": 30, "bad": 40, "slow": 50, "http500": 60, "garbage": 70}
CODES = {code: kind for kind, code in KINDS.items()}
SLOW_S = 1.0
TIMEOUT_S = 0.3


def json_answer(idx: int) -> str:
    entities = [{"label": f"object {idx}", "bbox_2d": [2 + idx, 3, 40 + idx, 50]},
                {"label": "the background", "bbox_2d": [0, 0, W, H]}]
    return "Sure!\n```json\n" + json.dumps({"caption": f"image number {idx}", "entities": entities}) + "\n```"


def json_record(idx: int, name: str) -> dict:
    return {"image": f"images/{name}", "prompt": f"image number {idx}",
            "entities": [{"prompt": f"object {idx}", "box": [2.0 + idx, 3.0, 40.0 + idx, 50.0]},
                         {"prompt": "the background", "box": [0.0, 0.0, float(W), float(H)]}]}


QWEN2_ANSWER = ("Caption: a red square on grey\n"
                "<|object_ref_start|>a red square<|object_ref_end|><|box_start|>(100,100),(500,900)<|box_end|>")


class FakeVLM:
    """What the fake server answers, and what it was asked (per image, found from the image's colour)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.hits: Counter[tuple[str, int]] = Counter()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.require_key: str | None = None
        self.fixed = False  # once True, "bad" images get good answers
        self.raw_body: bytes | None = None  # sent verbatim instead of a chat response
        self.text_answers: list[str] = []  # answers to text-only requests (layout planning), in order

    def answer(self, kind: str, idx: int, count: int) -> tuple[int, str]:
        if kind == "json" or (kind == "flaky" and count > 1) or (kind == "bad" and self.fixed):
            return 200, json_answer(idx)
        if kind == "qwen2":
            return 200, QWEN2_ANSWER
        if kind == "slow":
            time.sleep(SLOW_S)
            return 200, json_answer(idx)
        if kind == "http500":
            return 500, "internal error: out of memory"
        return 200, "I cannot see any objects, sorry. {not json"


def _image_of(body: dict) -> tuple[str, int] | None:
    for part in body["messages"][0]["content"]:
        if part["type"] == "image_url":
            data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            red, green, _ = Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
            return CODES[red], green // 4
    return None


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        fake: FakeVLM = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions"
        image = _image_of(body)
        with fake.lock:
            fake.bodies.append(body)
            fake.headers.append(dict(self.headers))
            if image is not None:
                fake.hits[image] += 1
            count = fake.hits[image]
        if fake.require_key and self.headers.get("Authorization") != f"Bearer {fake.require_key}":
            return self._send(401, b'{"error": "missing or wrong API key"}')
        if fake.raw_body is not None:
            return self._send(200, fake.raw_body)
        if image is None and fake.text_answers:
            with fake.lock:
                status, text = 200, fake.text_answers.pop(0)
        elif image is None:
            status, text = 200, "text only: " + body["messages"][0]["content"][0]["text"]
        else:
            status, text = fake.answer(image[0], image[1], count)
        if status != 200:
            return self._send(status, text.encode())
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that timed out close early: not a failure
        pass


def serve(httpd: QuietServer):
    """Run ``httpd`` on a thread for a test (a generator for a fixture to yield from): ``httpd.base_url`` is its
    OpenAI-style /v1 address; shut down after."""
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.fake = FakeVLM()
    yield from serve(httpd)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(annotate_module, "RETRY_BACKOFF_S", 0.0)


def make_folder(root, kinds: list[str]):
    """``root/images/img_XX.png`` in solid colours that tell the server which answer to give."""
    (root / "images").mkdir(parents=True)
    names = []
    for idx, kind in enumerate(kinds):
        name = f"img_{idx:02d}.png"
        Image.new("RGB", (W, H), (KINDS[kind], idx * 4, 200)).save(root / "images" / name)
        names.append(name)
    return root, names


def config_for(server, folder, **kw) -> AnnotateConfig:
    kw = {"model": "fake-vl", "base_url": server.base_url, "progress": False, "concurrency": 1, "sheet": 4,
          "timeout": 5.0, **kw}
    return AnnotateConfig(folder=folder, **kw)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------


def test_annotate_writes_dataset(server, tmp_path):
    from eligen.train.data import EntityDataset

    folder, names = make_folder(tmp_path / "ds", ["json", "json", "flaky", "bad", "http500", "garbage"])
    server.fake.raw_body = None
    result = annotate(config_for(server, folder, retries=2))
    assert (result.done, result.failed, result.skipped) == (3, 3, 0)
    assert result.jsonl == folder / "annotations.jsonl"
    assert read_jsonl(result.jsonl) == [json_record(0, names[0]), json_record(1, names[1]), json_record(2, names[2])]
    hits = server.fake.hits
    assert [hits[(k, i)] for i, k in enumerate(["json", "json", "flaky", "bad", "http500", "garbage"])] == \
        [1, 1, 2, 3, 3, 3]

    done = json.loads((folder / "annotations" / "img_02.json").read_text())
    assert done["attempts"] == 2 and done["raw"] == json_answer(2) and (done["width"], done["height"]) == (W, H)
    bad = json.loads((folder / "annotations" / "img_03.failed.json").read_text())
    assert bad["attempts"] == 3 and "unusable answer" in bad["reason"] and "cannot see" in bad["answer"]
    http = json.loads((folder / "annotations" / "img_04.failed.json").read_text())
    assert "HTTP 500" in http["reason"] and "out of memory" in http["reason"]

    # the request: an image part then the JSON instructions, for the configured model
    body = server.fake.bodies[0]
    assert body["model"] == "fake-vl"
    parts = body["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1]["type"] == "text" and '"bbox_2d"' in parts[1]["text"] and "up to 8" in parts[1]["text"]

    dataset = EntityDataset(result.jsonl, resolution=32, multiple=16)
    assert len(dataset) == 3 and dataset.stats.bad == 0
    assert result.sheet == folder / "annotations_sheet.png"
    with Image.open(result.sheet) as sheet:
        assert sheet.width > W and sheet.height > H


def test_concurrency_gives_identical_output(server, tmp_path):
    kinds = ["json", "flaky", "json", "bad", "json", "json", "flaky", "json", "json", "json", "json", "json"]
    serial, _ = make_folder(tmp_path / "serial", kinds)
    parallel, _ = make_folder(tmp_path / "parallel", kinds)
    annotate(config_for(server, serial, retries=1))
    result = annotate(config_for(server, parallel, retries=1, concurrency=6))
    assert (result.done, result.failed) == (11, 1)
    assert (parallel / "annotations.jsonl").read_bytes() == (serial / "annotations.jsonl").read_bytes()


def test_shards_make_the_same_file_as_one_run(server, tmp_path):
    kinds = ["json"] * 7
    full, names = make_folder(tmp_path / "full", kinds)
    sharded, _ = make_folder(tmp_path / "sharded", kinds)
    annotate(config_for(server, full))
    first = annotate(config_for(server, sharded, shard="0/2"))
    assert first.done == 4 and [r["image"] for r in read_jsonl(first.jsonl)] == [f"images/{n}" for n in names[::2]]
    second = annotate(config_for(server, sharded, shard="1/2", concurrency=3))
    assert (second.done, second.skipped) == (3, 0)
    assert (sharded / "annotations.jsonl").read_bytes() == (full / "annotations.jsonl").read_bytes()
    assert all(count == 2 for count in server.fake.hits.values())  # once per folder


class Interrupting:
    """Passes ``limit`` questions to ``inner``, then acts like Ctrl-C."""

    def __init__(self, inner: VLMBackend, limit: int):
        self.inner, self.limit, self.calls = inner, limit, 0
        self.convention = inner.convention
        self.lock = threading.Lock()

    def ask(self, prompt, image=None):
        with self.lock:
            self.calls += 1
            if self.calls > self.limit:
                raise KeyboardInterrupt
        return self.inner.ask(prompt, image)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_resume_after_a_kill(server, tmp_path, concurrency):
    kinds = ["json"] * 9
    clean, _ = make_folder(tmp_path / "clean", kinds)
    killed, _ = make_folder(tmp_path / "killed", kinds)
    annotate(config_for(server, clean))
    server.fake.hits.clear()

    config = config_for(server, killed, concurrency=concurrency)
    backend = OpenAIBackend(server.base_url, "fake-vl", timeout=5.0)
    with pytest.raises(KeyboardInterrupt):
        annotate(config, Interrupting(backend, 4))
    finished = len(list((killed / "annotations").glob("*.json")))
    assert finished == 4 and not list((killed / "annotations").glob(".*"))  # no temporary files left

    result = annotate(config)
    assert (result.done, result.skipped, result.failed) == (5, 4, 0)
    assert sum(server.fake.hits.values()) == 9 and set(server.fake.hits.values()) == {1}  # nothing asked twice
    assert (killed / "annotations.jsonl").read_bytes() == (clean / "annotations.jsonl").read_bytes()
    again = annotate(config)
    assert (again.done, again.skipped) == (0, 9) and sum(server.fake.hits.values()) == 9


def test_retry_failed(server, tmp_path):
    folder, names = make_folder(tmp_path / "ds", ["json", "bad"])
    first = annotate(config_for(server, folder, retries=0))
    assert (first.done, first.failed) == (1, 1)
    server.fake.fixed = True
    rerun = annotate(config_for(server, folder, retries=0))
    assert (rerun.done, rerun.failed, rerun.skipped) == (0, 0, 2) and server.fake.hits[("bad", 1)] == 1
    retried = annotate(config_for(server, folder, retries=0, retry_failed=True))
    assert (retried.done, retried.failed, retried.skipped) == (1, 0, 1) and server.fake.hits[("bad", 1)] == 2
    assert not (folder / "annotations" / "img_01.failed.json").exists()
    assert read_jsonl(retried.jsonl) == [json_record(0, names[0]), json_record(1, names[1])]


def test_slow_answers_time_out_and_fail(server, tmp_path):
    folder, _ = make_folder(tmp_path / "ds", ["json", "slow"])
    start = time.perf_counter()
    result = annotate(config_for(server, folder, retries=1, timeout=TIMEOUT_S, concurrency=2))
    assert time.perf_counter() - start < 2 * SLOW_S + 1
    assert (result.done, result.failed) == (1, 1)
    failure = json.loads((folder / "annotations" / "img_01.failed.json").read_text())
    assert failure["attempts"] == 2 and "did not answer within 0.3 s" in failure["reason"]
    assert server.fake.hits[("slow", 1)] == 2


def test_api_key_from_the_environment(server, tmp_path, monkeypatch):
    server.fake.require_key = "sekrit"
    folder, _ = make_folder(tmp_path / "ds", ["json", "json"])
    monkeypatch.delenv("ELIGEN_TEST_KEY", raising=False)
    config = config_for(server, folder, api_key_env="ELIGEN_TEST_KEY", retries=0)
    result = annotate(config)
    assert result.failed == 2 and "HTTP 401" in json.loads((folder / "annotations" / "img_00.failed.json")
                                                           .read_text())["reason"]
    assert all("Authorization" not in h for h in server.fake.headers)
    monkeypatch.setenv("ELIGEN_TEST_KEY", "sekrit")
    assert "sekrit" not in repr(config)
    result = annotate(config_for(server, folder, api_key_env="ELIGEN_TEST_KEY", retry_failed=True))
    assert result.done == 2 and server.fake.headers[-1]["Authorization"] == "Bearer sekrit"


def test_qwen2_convention(server, tmp_path):
    folder, _ = make_folder(tmp_path / "ds", ["qwen2"])
    result = annotate(config_for(server, folder, convention="qwen2"))
    assert result.done == 1
    assert "<|object_ref_start|>" in server.fake.bodies[0]["messages"][0]["content"][1]["text"]
    (record,) = read_jsonl(result.jsonl)
    assert record["prompt"] == "a red square on grey"
    assert record["entities"][0]["prompt"] == "a red square"
    assert record["entities"][0]["box"] == pytest.approx([0.1 * W, 0.1 * H, 0.5 * W, 0.9 * H])


def test_transformers_backend_is_loaded_lazily(tmp_path, monkeypatch):
    made, instances = [], []

    class FakeTransformersBackend:
        def __init__(self, model, convention="auto"):
            made.append((model, convention))
            instances.append(self)
            self.convention = "qwen25"
            self.threads = set()

        def ask(self, prompt, image=None):
            self.threads.add(threading.get_ident())
            return json_answer(0)

    module = types.ModuleType("eligen.data.transformers_backend")
    module.TransformersBackend = FakeTransformersBackend
    monkeypatch.setitem(sys.modules, "eligen.data.transformers_backend", module)
    folder, _ = make_folder(tmp_path / "ds", ["json"] * 3)
    config = AnnotateConfig(folder=folder, vlm="transformers", model="/models/qwen", progress=False, concurrency=8)
    result = annotate(config)
    assert result.done == 3 and made == [("/models/qwen", "auto")]
    assert len(instances[0].threads) == 1  # a local model is asked from one thread only


def test_bad_configs(tmp_path, server):
    for shard in ["2/2", "x", "1/0", "-1/2", "1/2/3", ""]:
        with pytest.raises(ValueError, match="shard"):
            AnnotateConfig(folder=tmp_path, shard=shard)
    for bad in [{"concurrency": 0}, {"retries": -1}, {"max_entities": 0}, {"timeout": 0}, {"vlm": "gpt"},
                {"convention": "qwen3"}, {"sheet": -1}]:
        with pytest.raises(ValueError):
            AnnotateConfig(folder=tmp_path, **bad)
    with pytest.raises(ValueError, match="folder"):
        AnnotateConfig(folder=None)
    folder, _ = make_folder(tmp_path / "ds", ["json"])
    with pytest.raises(ValueError, match="base-url"):
        annotate(AnnotateConfig(folder=folder, model="m", progress=False))
    with pytest.raises(ValueError, match="model"):
        annotate(AnnotateConfig(folder=folder, base_url=server.base_url, progress=False))
    with pytest.raises(FileNotFoundError):
        annotate(AnnotateConfig(folder=tmp_path / "missing", progress=False))
    assert parse_shard("3/4") == (3, 4)


def test_duplicate_stems_are_refused(tmp_path, server):
    folder, _ = make_folder(tmp_path / "ds", ["json"])
    Image.new("RGB", (W, H)).save(folder / "images" / "img_00.jpg")
    with pytest.raises(ValueError, match="stem"):
        annotate(config_for(server, folder))


def test_model_view_size():
    assert model_view_size(W, H) == (W, H)
    assert model_view_size(1000, 700) == (1008, 700)
    width, height = model_view_size(4000, 3000)
    assert width % 28 == 0 and height % 28 == 0 and width * height <= 1280 * 28 * 28
    width, height = model_view_size(20, 10)
    assert width % 28 == 0 and height % 28 == 0 and width * height >= 56 * 56


def test_resized_images_map_boxes_back(server, tmp_path):
    """A 48x32 image is sent enlarged; pixel boxes about the sent image come back in original pixels."""
    (tmp_path / "ds" / "images").mkdir(parents=True)
    Image.new("RGB", (48, 32), (KINDS["json"], 0, 200)).save(tmp_path / "ds" / "images" / "small.png")
    result = annotate(config_for(server, tmp_path / "ds"))
    sent = server.fake.bodies[0]["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1]
    sent_w, sent_h = Image.open(io.BytesIO(base64.b64decode(sent))).size
    assert (sent_w, sent_h) == model_view_size(48, 32) != (48, 32)
    (record,) = read_jsonl(result.jsonl)
    x0, y0, x1, y1 = record["entities"][0]["box"]
    assert (x0, x1) == pytest.approx((2 * 48 / sent_w, 40 * 48 / sent_w))
    assert (y0, y1) == pytest.approx((3 * 32 / sent_h, 50 * 32 / sent_h))


# ----------------------------------------------------------------------------------------------------------
# OpenAIBackend on its own
# ----------------------------------------------------------------------------------------------------------


def test_backend_text_only_and_errors(server):
    backend = OpenAIBackend(server.base_url + "/", "fake-vl", api_key="k", timeout=5.0)
    assert isinstance(backend, VLMBackend)
    assert backend.ask("hello") == "text only: hello"
    assert server.fake.bodies[-1]["messages"][0]["content"] == [{"type": "text", "text": "hello"}]
    assert server.fake.headers[-1]["Authorization"] == "Bearer k"
    assert "'k'" not in repr(backend)

    server.fake.raw_body = b'{"choices": []}'
    with pytest.raises(VLMError, match=r"choices\[0\]\.message\.content"):
        backend.ask("hello")
    server.fake.raw_body = b"<html>not json</html>"
    with pytest.raises(VLMError, match="not json"):
        backend.ask("hello")
    server.fake.raw_body = None

    image = Image.new("RGB", (W, H), (KINDS["http500"], 0, 0))
    with pytest.raises(VLMError, match="HTTP 500"):
        backend.ask("hello", image)


def test_backend_connection_refused():
    probe = QuietServer(("127.0.0.1", 0), Handler)
    port = probe.server_address[1]
    probe.server_close()
    with pytest.raises(VLMError, match="cannot reach"):
        OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", timeout=2.0).ask("hi")
    with pytest.raises(ValueError):
        OpenAIBackend("", "m")


def test_cli_exits_non_zero_when_nothing_was_annotated(tmp_path, server, capsys):
    from eligen.cli import main

    folder, _ = make_folder(tmp_path / "ds", ["bad", "bad"])
    argv = ["data", "annotate", str(folder), "--model", "fake-vl", "--base-url", server.base_url, "--no-progress",
            "--concurrency", "1", "--retries", "0", "--timeout", "5"]
    assert main(argv) == 1
    assert "no image was annotated" in capsys.readouterr().err
    good, _ = make_folder(tmp_path / "ok", ["json", "bad"])
    assert main([*argv[:2], str(good), *argv[3:]]) == 0  # one success is a run that did something


def _cut(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


RERUN_DAMAGE = [
    # (case, what is done to a finished folder of two annotated images, records kept, annotation files left out)
    ("a truncated annotated image", lambda f: _cut(f / "images" / "img_00.png"), 2, 0),
    ("a deleted annotated image", lambda f: (f / "images" / "img_00.png").unlink(), 1, 1),
    ("an annotation file holding a list", lambda f: (f / "annotations" / "img_00.json").write_text("[1, 2]"), 2, 0),
    ("an annotation file without its image", lambda f: (f / "annotations" / "img_00.json").write_text(
        '{"prompt": "x", "entities": []}'), 2, 0),
    ("a corrupt annotation file", lambda f: (f / "annotations" / "img_00.json").write_text('{"image": '), 2, 0),
    ("an annotation file of an image no longer there", lambda f: (f / "annotations" / "gone.json").write_text(
        '{"image": "images/gone.png", "prompt": "x", "entities": []}'), 2, 1),
]


@pytest.mark.parametrize(("damage", "kept", "left_out"), [pytest.param(d, k, n, id=c) for c, d, k, n in RERUN_DAMAGE])
def test_a_rerun_on_a_damaged_folder_goes_on_and_names_what_it_left_out(tmp_path, server, caplog, damage, kept,
                                                                        left_out):
    folder, _ = make_folder(tmp_path / "ds", ["json", "json"])
    annotate(config_for(server, folder))
    damage(folder)
    result = annotate(config_for(server, folder))
    records = read_jsonl(result.jsonl)
    assert len(records) == kept and result.left_out == left_out
    assert all((folder / r["image"]).is_file() for r in records)
    if left_out:
        assert "left out of annotations.jsonl" in caplog.text


def test_a_truncated_image_is_a_counted_named_failure_and_the_run_goes_on(tmp_path, server):
    folder, names = make_folder(tmp_path / "ds", ["json", "json"])
    _cut(folder / "images" / names[0])
    result = annotate(config_for(server, folder))
    assert (result.done, result.failed) == (1, 1)
    failure = json.loads((folder / "annotations" / "img_00.failed.json").read_text())
    assert "cannot read the image" in failure["reason"] and "img_00.png" in failure["reason"]
    assert [r["image"] for r in read_jsonl(result.jsonl)] == [f"images/{names[1]}"]

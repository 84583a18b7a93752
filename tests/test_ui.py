"""`eligen ui`'s server through its HTTP API (the page itself: tests/test_ui_browser.py): the app renders exactly what
the CLI renders, one job at a time with visible queue positions, every layout checked by the CLI's code with errors
naming the entity and the field, and nothing a client sends reaching a file outside the app's folder."""

from __future__ import annotations

import io
import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eligen.ui
from eligen.cli import main
from eligen.entities import DATA_URI_PREFIX, binarize_mask, mask_to_png_data_uri
from eligen.generate import read_metadata
from eligen.ui.config import UIConfig
from eligen.ui.server import make_app, make_server
from test_annotate import server as vlm_server  # noqa: F401 - the fake OpenAI-compatible server fixture
from test_plan import PLAN

SIZE = 64  # the shipped tiny model's native size


def box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def page_layout(prompts=("a red circle", "a blue square"), masks=None) -> dict:
    masks = masks if masks is not None else [box_mask(4, 6, 30, 32), box_mask(34, 30, 60, 58)]
    return {"prompt": "a red circle and a blue square on a gray background", "width": SIZE, "height": SIZE,
            "entities": [{"prompt": p, "mask": mask_to_png_data_uri(m)} for p, m in zip(prompts, masks, strict=True)]}


class Client:
    def __init__(self, base: str):
        self.base = base

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(self.base + path, data=body, method=method,
                                         headers={"Content-Type": content_type} if body is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def json(self, method: str, path: str, data=None):
        status, raw = self.request(method, path, None if data is None else json.dumps(data).encode())
        return status, json.loads(raw)

    def wait(self, job_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.json("GET", f"/api/jobs/{job_id}")
            assert status == 200
            if job["state"] in ("done", "error"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ui")
    config = UIConfig(port=0, max_upload_mb=1, max_pixels=512 * 512)
    app = make_app(config, workdir)
    httpd = make_server(app)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield app, Client(f"http://127.0.0.1:{httpd.server_address[1]}"), workdir
    app.jobs.close()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def client(app_server) -> Client:
    return app_server[1]


def test_the_app_listens_on_loopback_unless_told_and_refuses_bad_flags(capsys):
    assert UIConfig().host == "127.0.0.1" and UIConfig().port == 7860
    for argv, says in ([["ui", "--host", "my laptop"], "not an IP address"], [["ui", "--port", "70000"], "--port"],
                       [["ui", "--plan-vlm", "openai"], "--plan-base-url"], [["ui", "--max-upload-mb", "0"], ">"]):
        assert main(argv) == 2
        assert says in capsys.readouterr().err


def test_info_fills_in_the_models_defaults(client):
    status, info = client.json("GET", "/api/info")
    assert status == 200
    assert info["native_size"] == [SIZE, SIZE] and info["defaults"]["steps"] == 20  # eligen_defaults.json
    assert info["defaults"]["true_cfg"] == 3.0 and info["loras"] == ["eligen_lora.safetensors"]
    assert info["token_pixels"] == 4 and info["max_entities"] >= 8 and info["plan"] is False
    status, page = client.request("GET", "/")
    assert status == 200 and b'id="canvas"' in page


def test_the_preview_names_entity_and_field_and_shows_the_token_grid(client):
    layout = page_layout(prompts=("a red circle", "  "), masks=[box_mask(4, 6, 30, 32), box_mask(40, 40, 41, 41)])
    status, answer = client.json("POST", "/api/check", {"layout": layout})
    assert status == 200
    fields = {(e["entity"], e["field"]) for e in answer["errors"]}
    assert fields == {(1, "prompt")}, answer["errors"]  # one pixel still covers one 4x4-pixel token
    assert "entity 1, field 'prompt'" in answer["errors"][0]["message"]
    grid = answer["grid"]
    assert (grid["rows"], grid["cols"], grid["token_pixels"]) == (16, 16, 4)
    cover = np.array(grid["covers"][0]).reshape(16, 16).astype(bool)
    expected = np.zeros((16, 16), bool)
    expected[6 // 4: (32 + 3) // 4, 4 // 4: (30 + 3) // 4] = True  # any covered pixel covers its token
    assert (cover == expected).all()
    empty = page_layout(masks=[box_mask(4, 6, 30, 32), np.zeros((SIZE, SIZE), bool)])
    empty["prompt"] = ""
    _, answer = client.json("POST", "/api/check", {"layout": empty})
    assert {(e["entity"], e["field"]) for e in answer["errors"]} == {(None, "prompt"), (1, "mask")}
    assert any("covers no token" in e["message"] for e in answer["errors"])


def test_a_generation_equals_the_cli_and_carries_its_record(client, tmp_path):
    layout = page_layout()
    status, job = client.json("POST", "/api/jobs", {"layout": layout, "params": {"seed": 7, "steps": 3}})
    assert status == 200, job
    done = client.wait(job["id"])
    assert done["state"] == "done", done
    status, png = client.request("GET", done["result"]["image"])
    assert status == 200
    app_png = tmp_path / "app.png"
    app_png.write_bytes(png)
    record = read_metadata(app_png)
    assert record["params"]["seed"] == 7 and record["params"]["steps"] == 3 and len(record["layout"]["entities"]) == 2
    assert record["params"]["lora"] == []  # the model's own LoRA: named by leaving it out, so the PNG travels
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    assert main(["generate", str(tmp_path / "layout.json"), "-o", str(tmp_path / "cli.png"), "--seed", "7",
                 "--steps", "3", "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(app_png)), np.asarray(Image.open(tmp_path / "cli.png")))
    assert main(["generate", "--from", str(app_png), "-o", str(tmp_path / "again.png"), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(app_png)), np.asarray(Image.open(tmp_path / "again.png")))
    status, saved = client.json("GET", done["result"]["layout"])
    assert [e["prompt"] for e in saved["entities"]] == ["a red circle", "a blue square"]
    assert (binarize_mask(saved["entities"][1]["mask"]) == box_mask(34, 30, 60, 58)).all()
    status, overlay = client.request("GET", done["result"]["overlay"])
    assert status == 200 and Image.open(io.BytesIO(overlay)).size[0] >= 512  # enlarged, labelled


def test_one_job_runs_at_a_time_and_the_queue_position_shows(app_server, client):
    app = app_server[0]
    gate, started = threading.Event(), threading.Event()
    original = app.pipe.__class__.__call__
    active, most = [0], [0]

    def slow_call(pipe, *args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        started.set()
        gate.wait(30)
        try:
            return original(pipe, *args, **kwargs)
        finally:
            active[0] -= 1

    app.pipe.__class__.__call__ = slow_call
    try:
        ids = []
        for seed in (1, 2, 3):
            status, job = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"seed": seed,
                                                                                              "steps": 2}})
            assert status == 200 and job["position"] == seed - 1
            ids.append(job["id"])
        assert started.wait(30)
        states = [client.json("GET", f"/api/jobs/{i}")[1] for i in ids]
        assert [s["state"] for s in states] == ["running", "queued", "queued"]
        assert [s["position"] for s in states[1:]] == [1, 2]
        gate.set()
        finished = [client.wait(i) for i in ids]
    finally:
        app.pipe.__class__.__call__ = original
        gate.set()
    assert [f["state"] for f in finished] == ["done"] * 3 and most[0] == 1
    assert [f["result"]["seed"] for f in finished] == [1, 2, 3]


def test_bad_layouts_and_options_are_refused_naming_the_problem(client):
    cases = [
        ({"layout": page_layout(prompts=("a red circle", ""))}, (1, "prompt")),
        ({"layout": {**page_layout(), "width": 10**5}}, (None, "width")),
        ({"layout": page_layout(prompts=["a"] * 17, masks=[box_mask(0, 0, 8, 8)] * 17)}, (None, "entities")),
        ({"layout": page_layout(), "params": {"steps": 0}}, (None, None)),
        ({"layout": page_layout(), "params": {"output": "/tmp/x.png"}}, (None, "output")),
        ({"layout": page_layout(), "params": {"fusion": "paper"}}, (None, "fusion")),  # not an inpainting job
        ({"layout": page_layout(), "mode": "inpaint"}, (None, "image")),  # no input chosen
        ({"layout": page_layout(), "mode": "inpaint", "background": "upload:../../etc/passwd"}, (None, "image")),
    ]
    for body, (entity, field) in cases:
        status, answer = client.json("POST", "/api/jobs", body)
        assert status == 400, (body.get("params"), answer)
        error = answer["errors"][0]
        assert (error["entity"], error["field"]) == (entity, field), error
    status, answer = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"steps": 0}})
    assert "--steps must be >= 1" in answer["errors"][0]["message"]


def test_nothing_a_client_sends_reaches_a_server_file(client, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("L", (SIZE, SIZE), 255).save(secret)
    layout = page_layout()
    layout["entities"][0]["mask"] = str(secret)  # a path the server could read
    for route in ("/api/check", "/api/jobs"):
        status, answer = client.json("POST", route, {"layout": layout})
        error = answer["errors"][0]
        assert (error["entity"], error["field"]) == (0, "mask") and "never file paths" in error["message"]
    layout["entities"][0] = {"prompt": "x", "mask": "mask.png", "image": "/etc/hostname"}
    _, answer = client.json("POST", "/api/check", {"layout": layout})
    assert answer["errors"][0]["field"] == "image"  # keys beyond the page's own are refused
    for path in ("/api/jobs/../../../../etc/passwd", "/api/uploads/..%2F..%2Fetc%2Fpasswd.png", "/../README.md",
                 "/api/jobs/0123456789abcdef/image.png", "/static/../server.py"):
        status, _ = client.request("GET", path)
        assert status == 404, path


def test_uploads_are_capped_by_bytes_and_pixels(client):
    big = b"\0" * (2 * 2**20)  # the fixture's cap is 1 MiB
    status, raw = client.request("POST", "/api/upload", big, "image/png")
    assert status == 413 and "above this app's limit of 1 MiB" in json.loads(raw)["errors"][0]["message"]
    bomb = io.BytesIO()
    Image.new("L", (600, 600)).save(bomb, format="PNG")  # 360000 pixels, above the fixture's 512x512
    status, raw = client.request("POST", "/api/upload", bomb.getvalue(), "image/png")
    assert status == 400 and "--max-pixels" in json.loads(raw)["errors"][0]["message"]
    status, raw = client.request("POST", "/api/upload", b"not an image at all", "image/png")
    assert status == 400 and json.loads(raw)["errors"][0]["field"] == "image"


def test_inpainting_an_upload_keeps_the_background(client):
    photo = np.zeros((SIZE, SIZE, 3), np.uint8)
    photo[..., 1] = 200
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    status, raw = client.request("POST", "/api/upload", buffer.getvalue(), "image/png")
    assert status == 200
    upload = json.loads(raw)
    assert upload["id"].startswith("upload:") and (upload["width"], upload["height"]) == (SIZE, SIZE)
    layout = page_layout(prompts=("a red circle",), masks=[box_mask(8, 8, 40, 40)])
    status, job = client.json("POST", "/api/jobs", {"layout": layout, "mode": "inpaint", "background": upload["id"],
                                                   "params": {"steps": 2, "seed": 1}})
    assert status == 200, job
    done = client.wait(job["id"])
    assert done["state"] == "done", done
    _, png = client.request("GET", done["result"]["image"])
    out = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    outside = ~box_mask(8, 8, 40, 40)
    assert (out[outside] == photo[outside]).all()  # paste-back: untouched outside the entity
    record = json.loads(Image.open(io.BytesIO(png)).text["eligen"])
    assert record["command"] == "inpaint" and record["params"]["image"] == "uploaded image"  # no server path
    assert record["inputs"]["image"]["path"] == "uploaded image" and len(record["inputs"]["image"]["sha256"]) == 64
    status, again = client.json("POST", "/api/jobs", {"layout": layout, "mode": "inpaint",
                                                     "background": f"job:{job['id']}", "params": {"steps": 2}})
    assert status == 200 and client.wait(again["id"])["state"] == "done"


def test_loading_a_png_or_a_layout_restores_it(client, tmp_path):
    status, job = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"seed": 11, "steps": 2,
                                                                                       "true_cfg": 2.0}})
    done = client.wait(job["id"])
    _, png = client.request("GET", done["result"]["image"])
    status, raw = client.request("POST", "/api/load", png, "image/png")
    assert status == 200
    loaded = json.loads(raw)
    assert loaded["params"]["seed"] == 11 and loaded["params"]["true_cfg"] == 2.0
    assert [e["prompt"] for e in loaded["layout"]["entities"]] == ["a red circle", "a blue square"]
    assert (binarize_mask(loaded["layout"]["entities"][0]["mask"]) == box_mask(4, 6, 30, 32)).all()
    boxes = {"prompt": "p", "width": 64, "height": 48, "entities": [{"prompt": "a", "box": [0, 0, 16, 8]}]}
    status, raw = client.request("POST", "/api/load", json.dumps(boxes).encode())
    entity = json.loads(raw)["layout"]["entities"][0]
    assert entity["mask"].startswith(DATA_URI_PREFIX)  # the page edits masks: a box arrives as one
    mask = binarize_mask(entity["mask"])
    assert mask.shape == (48, 64) and mask[:8, :16].all() and mask.sum() == 16 * 8
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    status, raw = client.request("POST", "/api/load", plain.getvalue(), "image/png")
    assert status == 400 and "no eligen record" in json.loads(raw)["errors"][0]["message"]
    status, raw = client.request("POST", "/api/load", b'{"prompt": "p", "width": 8, "height": 8, "entities": '
                                 b'[{"prompt": "a", "mask": "/etc/passwd"}]}')
    assert status == 400 and json.loads(raw)["errors"][0]["field"] == "mask"


def test_the_planner_fills_the_editor(vlm_server, tmp_path):  # noqa: F811
    config = UIConfig(port=0, plan_vlm="openai", plan_base_url=vlm_server.base_url, plan_model="m")
    app = make_app(config, tmp_path)
    vlm_server.fake.text_answers = [PLAN]
    answer = app.plan({"text": "a cat and a dog on a sofa", "width": 512, "height": 384})
    layout = answer["layout"]
    assert [e["prompt"] for e in layout["entities"]] == ["a ginger cat", "a small dog"]
    masks = [binarize_mask(e["mask"]) for e in layout["entities"]]
    assert masks[1].shape == (384, 512) and masks[1][60:330, 220:500].all() and masks[1].sum() == 270 * 280
    assert app.info()["plan"] is True
    app.jobs.close()


def test_the_page_script_is_served_and_names_every_control(client):
    _, page = client.request("GET", "/")
    _, script = client.request("GET", "/app.js")
    ids = set(re.findall(rb'\$\("([a-z-]+)"\)', script))
    missing = [i.decode() for i in ids if b'id="' + i + b'"' not in page]
    assert not missing, f"app.js uses ids the page lacks: {missing}"


def test_static_files_ship_with_the_package():
    static = Path(eligen.ui.__file__).with_name("static")
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "app.css"}


def test_sigterm_removes_the_temporary_folder(tmp_path, monkeypatch):
    import os
    import signal
    import tempfile
    import threading

    from eligen.ui import server as server_module
    from eligen.ui.config import UIConfig

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(signal, "signal", signal.signal)  # restored afterwards with pytest's own SIGTERM handler
    previous = signal.getsignal(signal.SIGTERM)
    listening = threading.Event()
    real = server_module.make_server

    def make_server(app):
        listening.set()
        return real(app)

    monkeypatch.setattr(server_module, "make_server", make_server)
    handled = []

    def stop():  # SIGTERM once serving, if serve() handles it; else Ctrl-C's SIGINT (the default would kill pytest)
        listening.wait(120)
        handled.append(signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None))
        os.kill(os.getpid(), signal.SIGTERM if handled[0] else signal.SIGINT)

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=stop, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            server_module.serve(UIConfig(port=0))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert handled == [True] and not [p for p in tmp_path.iterdir() if p.name.startswith("eligen-ui-")]

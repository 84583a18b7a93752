"""`eligen ui`'s server through its HTTP API, with Starlette's TestClient (the page itself: tests/test_ui_browser.py;
the security checks: tests/test_ui_security.py): the app renders exactly what the CLI renders, one job at a time with
visible queue positions, every layout checked by the CLI's code with every problem listed in the page's words,
cancellable jobs, a history of results, and limits on steps, pixels, entities and the queue."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eligen.ui
from eligen.cli import main
from eligen.entities import DATA_URI_PREFIX, binarize_mask, mask_to_png_data_uri
from eligen.generate import read_metadata
from eligen.ui.app import App, make_app
from eligen.ui.config import UIConfig
from eligen.ui.server import make_asgi
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


def file_body(raw: bytes, kind: str = "image/png", name: str = "file.png") -> dict:
    """A file as the page sends it: its bytes as a data URI inside JSON."""
    return {"name": name, "data": f"data:{kind};base64," + base64.b64encode(raw).decode()}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Client:
    """The app's API as the page uses it (JSON in, JSON out), through Starlette's TestClient."""

    def __init__(self, test_client):
        self.http = test_client

    def json(self, method: str, path: str, data=None, **kwargs):
        response = self.http.request(method, path, json=data, **kwargs)
        return response.status_code, response.json()

    def get(self, path: str):
        response = self.http.get(path)
        return response.status_code, response.content

    def wait(self, job_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.json("GET", f"/api/jobs/{job_id}")
            assert status == 200
            if job["state"] in ("done", "error", "cancelled"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    config = UIConfig(port=0, max_upload_mb=1, max_pixels=512 * 512, max_steps=60, max_queue=4)
    app = make_app(config, tmp_path_factory.mktemp("ui"))
    yield app
    app.jobs.close()


@pytest.fixture(scope="module")
def client(app) -> Client:
    from starlette.testclient import TestClient

    with TestClient(make_asgi(app, {"testserver"})) as test_client:
        yield Client(test_client)


class Gate:
    """Holds the pipeline at its first step until opened (the app's own step callback runs after the gate)."""

    def __init__(self, app: App, monkeypatch):
        self.started, self.opened, self.active, self.most = threading.Event(), threading.Event(), 0, 0
        original = type(app.pipe).__call__

        def held(pipe, *args, callback_on_step_end=None, **kwargs):
            self.active += 1
            self.most = max(self.most, self.active)

            def step(pipe_, i, t, tensors):
                self.started.set()
                self.opened.wait(30)
                return callback_on_step_end(pipe_, i, t, tensors) if callback_on_step_end else {}

            try:
                return original(pipe, *args, callback_on_step_end=step, **kwargs)
            finally:
                self.active -= 1

        monkeypatch.setattr(type(app.pipe), "__call__", held)


def test_the_app_listens_on_loopback_unless_told_and_refuses_bad_flags(capsys):
    assert UIConfig().host == "127.0.0.1" and UIConfig().port == 7860
    for argv, says in ([["ui", "--host", "my laptop"], "not an IP address"], [["ui", "--port", "70000"], "--port"],
                       [["ui", "--plan-vlm", "openai"], "--plan-base-url"], [["ui", "--max-upload-mb", "0"], ">"],
                       [["ui", "--max-steps", "0"], "--max-steps"], [["ui", "--allowed-host", "a.b:80"], "port"]):
        assert main(argv) == 2
        assert says in capsys.readouterr().err


def test_info_fills_in_the_models_defaults_and_limits(client):
    status, info = client.json("GET", "/api/info")
    assert status == 200
    assert info["native_size"] == [SIZE, SIZE] and info["defaults"]["steps"] == 20  # eligen_defaults.json
    assert info["defaults"]["true_cfg"] == 3.0 and info["loras"] == ["eligen_lora.safetensors"]
    assert info["token_pixels"] == 4 and info["max_entities"] == 16 and info["plan"] is False
    assert (info["max_steps"], info["max_pixels"], info["ip_adapter"]) == (60, 512 * 512, False)
    assert {o["name"] for o in info["options"]} >= {"steps", "true_cfg", "fusion", "paste_back"}
    status, page = client.get("/")
    assert status == 200 and b'id="canvas"' in page


def test_the_preview_names_entity_and_field_in_the_pages_words(client):
    layout = page_layout(prompts=("a red circle", "  "), masks=[box_mask(4, 6, 30, 32), box_mask(40, 40, 41, 41)])
    status, answer = client.json("POST", "/api/check", {"layout": layout})
    assert status == 200
    assert [(e["entity"], e["field"], e["todo"]) for e in answer["errors"]] == [(1, "prompt", True)]
    assert answer["errors"][0]["message"].startswith("Entity 2, prompt: ")  # counted from 1, as the page shows
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
    assert all(e["todo"] for e in answer["errors"])  # a fresh page's to-dos, not errors
    no_token = next(e["message"] for e in answer["errors"] if e["field"] == "mask")
    assert "16×16 tokens" in no_token and "latent" not in no_token, no_token


def test_a_generation_equals_the_cli_and_carries_its_record(client, tmp_path):
    layout = page_layout()
    status, job = client.json("POST", "/api/jobs", {"layout": layout, "params": {"seed": 7, "steps": 3}})
    assert status == 200, job
    done = client.wait(job["id"])
    assert done["state"] == "done", done
    status, png = client.get(done["result"]["image"])
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
    status, overlay = client.get(done["result"]["overlay"])
    assert status == 200 and Image.open(io.BytesIO(overlay)).size[0] >= 512  # enlarged, labelled
    _, history = client.json("GET", "/api/jobs")
    assert history["jobs"][0]["id"] == job["id"] and history["jobs"][0]["mode"] == "generate"  # newest first


def test_one_job_runs_at_a_time_and_the_queue_position_shows(app, client, monkeypatch):
    gate = Gate(app, monkeypatch)
    ids = []
    try:
        for seed in (1, 2, 3):
            status, job = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"seed": seed,
                                                                                              "steps": 2}})
            assert status == 200 and job["position"] == seed - 1
            ids.append(job["id"])
        assert gate.started.wait(30)
        states = [client.json("GET", f"/api/jobs/{i}")[1] for i in ids]
        assert [s["state"] for s in states] == ["running", "queued", "queued"]
        assert [s["position"] for s in states[1:]] == [1, 2]
    finally:
        gate.opened.set()
    finished = [client.wait(i) for i in ids]
    assert [f["state"] for f in finished] == ["done"] * 3 and gate.most == 1
    assert [f["result"]["seed"] for f in finished] == [1, 2, 3]


def test_cancel_removes_a_queued_job_and_stops_a_running_one_at_its_next_step(app, client, monkeypatch):
    gate = Gate(app, monkeypatch)
    try:
        _, running = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"steps": 40}})
        _, queued = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"steps": 2}})
        assert gate.started.wait(30)
        status, answer = client.json("POST", f"/api/jobs/{queued['id']}/cancel", {})
        assert status == 200 and answer["state"] == "cancelled"
        status, answer = client.json("POST", f"/api/jobs/{running['id']}/cancel", {})
        assert status == 200 and answer["state"] == "running"  # it stops at its next step
    finally:
        gate.opened.set()
    stopped = client.wait(running["id"])
    assert stopped["state"] == "cancelled" and stopped["step"] == 1 and stopped["result"] is None
    assert client.json("GET", f"/api/jobs/{queued['id']}")[1]["step"] == 0  # never started
    status, job = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"steps": 2}})
    assert status == 200 and client.wait(job["id"])["state"] == "done"  # the queue goes on


def test_the_queue_has_a_limit(app, client, monkeypatch):
    gate = Gate(app, monkeypatch)
    ids = []
    try:
        for _ in range(1 + app.config.max_queue):  # one running, max_queue waiting
            status, job = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"steps": 1}})
            assert status == 200, job
            ids.append(job["id"])
        status, answer = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"steps": 1}})
        assert status == 429 and "already waiting" in answer["errors"][0]["message"]
    finally:
        for job_id in ids[1:]:
            client.json("POST", f"/api/jobs/{job_id}/cancel", {})
        gate.opened.set()
    client.wait(ids[0])


def test_every_problem_of_a_request_is_listed_in_the_pages_words(client):
    body = {"layout": page_layout(prompts=("a red circle", "")), "params": {"steps": 0, "true_cfg": 0.5,
                                                                            "output": "/tmp/x.png"}}
    status, answer = client.json("POST", "/api/jobs", body)
    assert status == 400
    assert {(e["entity"], e["field"]) for e in answer["errors"]} == {(1, "prompt"), (None, "steps"),
                                                                      (None, "true_cfg"), (None, "output")}
    text = " | ".join(e["message"] for e in answer["errors"])
    assert "Steps must be at least 1" in text and "True CFG must be in 1..100" in text and "--" not in text, text


def test_bad_layouts_and_options_are_refused_naming_the_problem(client):
    cases = [
        ({"layout": {**page_layout(), "width": 10**5}}, (None, "width")),
        ({"layout": page_layout(prompts=["a"] * 17, masks=[box_mask(0, 0, 8, 8)] * 17)}, (None, "entities")),
        ({"layout": page_layout(), "params": {"steps": 1_000_000}}, (None, "steps")),  # about 14 hours
        ({"layout": page_layout(), "params": {"fusion": "paper"}}, (None, "fusion")),  # not an inpainting job
        ({"layout": page_layout(), "mode": "inpaint"}, (None, "image")),  # no input chosen
        ({"layout": page_layout(), "mode": "inpaint", "background": "upload:../../etc/passwd"}, (None, "image")),
    ]
    for body, (entity, field) in cases:
        status, answer = client.json("POST", "/api/jobs", body)
        assert status == 400, (body.get("params"), answer)
        error = answer["errors"][0]
        assert (error["entity"], error["field"]) == (entity, field), error
    _, answer = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"steps": 61}})
    assert "at most 60" in answer["errors"][0]["message"]


def test_the_default_pixel_cap_follows_the_model(app, tmp_path):
    """A 1024x1024 layout on the 64x64 tiny model (which the CLI cannot render in this machine's memory) is
    refused before it is queued: the default cap is 16 times the model's native area."""
    default = App(UIConfig(), app.pipe, tmp_path, app.device, app.dtype, app.loras)
    try:
        assert default.limits.max_pixels == 16 * SIZE * SIZE
        big = {**page_layout(masks=[box_mask(0, 0, 8, 8)] * 2), "width": 1024, "height": 1024}
        with pytest.raises(Exception, match="above this app's limit of 65536"):
            default.submit({"layout": big})
    finally:
        default.jobs.close()


def test_inpainting_an_upload_keeps_the_background(client):
    photo = np.zeros((SIZE, SIZE, 3), np.uint8)
    photo[..., 1] = 200
    status, upload = client.json("POST", "/api/upload", file_body(png_bytes(Image.fromarray(photo))))
    assert status == 200
    assert upload["id"].startswith("upload:") and (upload["width"], upload["height"]) == (SIZE, SIZE)
    layout = page_layout(prompts=("a red circle",), masks=[box_mask(8, 8, 40, 40)])
    status, job = client.json("POST", "/api/jobs", {"layout": layout, "mode": "inpaint", "background": upload["id"],
                                                   "params": {"steps": 2, "seed": 1}})
    assert status == 200, job
    done = client.wait(job["id"])
    assert done["state"] == "done", done
    _, png = client.get(done["result"]["image"])
    out = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    outside = ~box_mask(8, 8, 40, 40)
    assert (out[outside] == photo[outside]).all()  # paste-back: untouched outside the entity
    record = json.loads(Image.open(io.BytesIO(png)).text["eligen"])
    assert record["command"] == "inpaint" and record["params"]["image"] == "uploaded image"  # no server path
    assert record["inputs"]["image"]["path"] == "uploaded image" and len(record["inputs"]["image"]["sha256"]) == 64
    assert done["result"]["mode"] == "inpaint"
    status, again = client.json("POST", "/api/jobs", {"layout": layout, "mode": "inpaint",
                                                     "background": f"job:{job['id']}", "params": {"steps": 2}})
    assert status == 200 and client.wait(again["id"])["state"] == "done"


def test_loading_a_png_or_a_layout_restores_it(client):
    status, job = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"seed": 11, "steps": 2,
                                                                                       "true_cfg": 2.0}})
    done = client.wait(job["id"])
    _, png = client.get(done["result"]["image"])
    status, loaded = client.json("POST", "/api/load", file_body(png))
    assert status == 200
    assert loaded["params"]["seed"] == 11 and loaded["params"]["true_cfg"] == 2.0 and loaded["command"] == "generate"
    assert [e["prompt"] for e in loaded["layout"]["entities"]] == ["a red circle", "a blue square"]
    assert (binarize_mask(loaded["layout"]["entities"][0]["mask"]) == box_mask(4, 6, 30, 32)).all()
    boxes = {"prompt": "p", "width": 64, "height": 48, "entities": [{"prompt": "a", "box": [0, 0, 16, 8]}]}
    status, loaded = client.json("POST", "/api/load", file_body(json.dumps(boxes).encode(), "application/json"))
    entity = loaded["layout"]["entities"][0]
    assert entity["mask"].startswith(DATA_URI_PREFIX)  # the page edits masks: a box arrives as one
    mask = binarize_mask(entity["mask"])
    assert mask.shape == (48, 64) and mask[:8, :16].all() and mask.sum() == 16 * 8
    status, answer = client.json("POST", "/api/load", file_body(png_bytes(Image.new("RGB", (8, 8)))))
    assert status == 400 and "no eligen record" in answer["errors"][0]["message"]


EDIT = 32  # the tiny Kontext pipeline's test size
EDIT_FAST = {"steps": 2, "seed": 3, "max_sequence_length": 16, "auto_resize": False}  # the input shown at its size


@pytest.fixture(scope="module")
def edit_client(tiny_kontext_dir, tmp_path_factory) -> Client:
    """The app on an edit model (the tiny FLUX.1 Kontext pipeline)."""
    from starlette.testclient import TestClient

    app = make_app(UIConfig(model=str(tiny_kontext_dir), port=0, max_steps=8), tmp_path_factory.mktemp("ui-edit"))
    try:
        with TestClient(make_asgi(app, {"testserver"})) as test_client:
            yield Client(test_client)
    finally:
        app.jobs.close()


def edit_layout() -> dict:
    boxes = ((2, 2, 14, 10), (16, 12, 30, 30))
    masks = [np.zeros((EDIT, EDIT), bool) for _ in boxes]
    for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        mask[y0:y1, x0:x1] = True
    return {"prompt": "make it brighter", "width": EDIT, "height": EDIT,
            "entities": [{"prompt": p, "mask": mask_to_png_data_uri(m)}
                         for p, m in zip(("a dog", "a blue square"), masks, strict=True)]}


def test_edit_mode_equals_eligen_edit_and_its_record_reloads(edit_client, tiny_kontext_dir, tmp_path):
    _, info = edit_client.json("GET", "/api/info")
    assert info["modes"] == ["edit"] and info["family"] == "FLUX.1 Kontext"
    edit_options = {o["name"]: o for o in info["options"] if o["group"] == "EditOptions"}
    assert set(edit_options) == {"keep_outside", "auto_resize"} and edit_options["keep_outside"]["default"] is True
    photo = (np.random.default_rng(0).random((EDIT, EDIT, 3)) * 255).astype(np.uint8)
    status, upload = edit_client.json("POST", "/api/upload", file_body(png_bytes(Image.fromarray(photo))))
    assert status == 200, upload
    layout = edit_layout()
    status, job = edit_client.json("POST", "/api/jobs", {"layout": layout, "mode": "edit", "background": upload["id"],
                                                        "params": EDIT_FAST})
    assert status == 200, job
    done = edit_client.wait(job["id"])
    assert done["state"] == "done", done
    assert done["result"]["mode"] == "edit"
    _, png = edit_client.get(done["result"]["image"])
    app_png = tmp_path / "app.png"
    app_png.write_bytes(png)
    record = read_metadata(app_png)
    assert record["command"] == "edit" and record["params"]["keep_outside"] is True
    assert record["params"]["image"] == "uploaded image" and record["inputs"]["image"]["path"] == "uploaded image"
    union = np.logical_or(*[binarize_mask(e["mask"]) for e in layout["entities"]])
    out = np.asarray(Image.open(app_png).convert("RGB"))
    assert (out[~union] == photo[~union]).all() and not (out[union] == photo[union]).all()  # kept outside

    # the CLI on the same input (the app's stored copy) and layout: the same pixels and the same record
    _, stored = edit_client.get(upload["url"])
    (tmp_path / "input.png").write_bytes(stored)
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    assert main(["edit", str(tmp_path / "input.png"), str(tmp_path / "layout.json"), "-o", str(tmp_path / "cli.png"),
                 "--model", str(tiny_kontext_dir), "--seed", "3", "--steps", "2", "--max-sequence-length", "16",
                 "--no-auto-resize", "--no-progress"]) == 0
    cli = read_metadata(tmp_path / "cli.png")
    assert np.array_equal(out, np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")))
    for made in (record, cli):
        made["params"].pop("image"), made["inputs"]["image"].pop("path")
    assert record == cli  # the input by the same hash; only the name differs

    status, loaded = edit_client.json("POST", "/api/load", file_body(png))
    assert status == 200 and loaded["command"] == "edit"
    assert loaded["params"]["auto_resize"] is False and loaded["params"]["keep_outside"] is True
    assert [e["prompt"] for e in loaded["layout"]["entities"]] == ["a dog", "a blue square"]


def test_edit_mode_is_refused_naming_the_problem(client, edit_client):
    status, answer = edit_client.json("POST", "/api/jobs", {"layout": edit_layout(), "mode": "edit",
                                                           "params": EDIT_FAST})
    assert status == 400 and answer["errors"][0]["field"] == "image"
    assert answer["errors"][0]["message"].startswith("Image to edit: choose one")
    status, answer = edit_client.json("POST", "/api/jobs", {"layout": edit_layout(), "params": {"steps": 2},
                                                           "mode": "generate"})
    assert status == 400 and answer["errors"][0]["field"] == "mode"
    assert "FLUX.1 Kontext, an edit model: use Edit" in answer["errors"][0]["message"]
    status, answer = client.json("POST", "/api/jobs", {"layout": page_layout(), "mode": "edit",
                                                      "background": "upload:x", "params": {"steps": 2}})
    assert status == 400 and answer["errors"][0]["field"] == "mode"
    assert "Edit needs an edit model (FLUX.1 Kontext" in answer["errors"][0]["message"]
    status, answer = client.json("POST", "/api/jobs", {"layout": page_layout(), "params": {"keep_outside": False}})
    assert status == 400 and answer["errors"][0]["message"] == "'keep_outside' is not an option of generate"
    _, info = client.json("GET", "/api/info")
    assert info["modes"] == ["generate", "inpaint"] and "keep_outside" not in {o["name"] for o in info["options"]}


def test_the_planner_fills_the_editor_within_the_pixel_cap(vlm_server, tmp_path):  # noqa: F811
    config = UIConfig(port=0, plan_vlm="openai", plan_base_url=vlm_server.base_url, plan_model="m",
                      max_pixels=1024 * 1024)
    app = make_app(config, tmp_path)
    vlm_server.fake.text_answers = [PLAN]
    answer = app.plan({"text": "a cat and a dog on a sofa", "width": 512, "height": 384})
    layout = answer["layout"]
    assert [e["prompt"] for e in layout["entities"]] == ["a ginger cat", "a small dog"]
    masks = [binarize_mask(e["mask"]) for e in layout["entities"]]
    assert masks[1].shape == (384, 512) and masks[1][60:330, 220:500].all() and masks[1].sum() == 270 * 280
    assert app.info()["plan"] is True
    with pytest.raises(Exception, match="above this app's limit") as refused:
        app.plan({"text": "a cat", "width": 12000, "height": 12000})  # 1.4 GB of masks, before this fix
    assert refused.value.status == 400 and vlm_server.fake.text_answers == []  # the planner was never asked
    app.jobs.close()


def test_history_lists_results_and_uploads_expire(app, tmp_path):
    from eligen.ui.uploads import UploadStore

    store = UploadStore(tmp_path / "uploads", keep=3, ttl_s=3600)
    ids = [store.add(Image.new("RGB", (8, 8))) for _ in range(5)]
    assert len(store) == 3 and len(list((tmp_path / "uploads").iterdir())) == 3
    assert store.get(ids[0]) is None and store.get(ids[-1]) is not None
    old = UploadStore(tmp_path / "old", ttl_s=0.0)
    first = old.add(Image.new("RGB", (8, 8)))
    time.sleep(0.01)
    assert old.get(first) is None and not list((tmp_path / "old").iterdir())


def test_the_page_script_is_served_and_names_every_control(client):
    _, page = client.get("/")
    _, script = client.get("/app.js")
    ids = set(re.findall(rb'\$\("([a-z-]+)"\)', script))
    missing = [i.decode() for i in ids if b'id="' + i + b'"' not in page]
    assert not missing, f"app.js uses ids the page lacks: {missing}"


def test_static_files_ship_with_the_package():
    static = Path(eligen.ui.__file__).with_name("static")
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "app.css"}


def test_reference_images_reach_the_pipeline_when_the_app_has_an_ip_adapter(tiny_pipeline_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    from eligen.families.flux.testing import save_tiny_ip_adapter

    transformer = FluxTransformer2DModel.load_config(tiny_pipeline_dir, subfolder="transformer")
    folder = tmp_path / "ip-adapter"
    folder.mkdir()
    save_tiny_ip_adapter(folder, type("Config", (), transformer))
    app = make_app(UIConfig(model=str(tiny_pipeline_dir), ip_adapter=str(folder), max_steps=4), tmp_path / "work")
    try:
        assert app.info()["ip_adapter"] is True
        picture = png_bytes(Image.new("RGB", (40, 40), (200, 9, 9)))
        reference = "data:image/png;base64," + base64.b64encode(picture).decode()
        layout = {"prompt": "a red circle", "width": 48, "height": 32, "ip_adapter_image": reference,
                  "entities": [{"prompt": "a dog", "mask": mask_to_png_data_uri(np.ones((32, 48), bool)),
                                "image": reference, "image_scale": 0.5}]}
        assert app.check({"layout": layout})["errors"] == []
        job = app.jobs.get(app.submit({"layout": layout, "params": {"steps": 2, "max_sequence_length": 16}})["id"])
        deadline = time.monotonic() + 120
        while job.state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.state == "done", job.error
        record = read_metadata(job.files["image.png"])
        assert record["layout"]["ip_adapter_image"] == reference
        entity = record["layout"]["entities"][0]
        assert entity["image"] == reference and entity["image_scale"] == 0.5
    finally:
        app.jobs.close()


CONTROL = 32  # the tiny FLUX pipeline's test size (8x8 tokens)
CONTROL_FAST = {"steps": 2, "seed": 3, "max_sequence_length": 16}


def image_uri(seed: int, size: int = CONTROL) -> str:
    """A random RGB picture (a stand-in for a pose or depth map) as the page sends it: a PNG data URI."""
    pixels = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8)
    return "data:image/png;base64," + base64.b64encode(png_bytes(Image.fromarray(pixels))).decode()


def halves_layout(left: dict, right: dict, **extra) -> dict:
    """Two entities, the left and the right half of a CONTROL x CONTROL image, with ``left`` / ``right`` added."""
    masks = [np.zeros((CONTROL, CONTROL), bool) for _ in range(2)]
    masks[0][:, :16], masks[1][:, 16:] = True, True
    entities = [{"prompt": "a dog", "mask": mask_to_png_data_uri(masks[0]), **left},
                {"prompt": "a red ball", "mask": mask_to_png_data_uri(masks[1]), **right}]
    return {"prompt": "a cat", "width": CONTROL, "height": CONTROL, "entities": entities, **extra}


@pytest.fixture(scope="module")
def control_files(tiny_pipeline_dir, random_lora_file, tmp_path_factory):
    """A tiny random ControlNet for the tiny FLUX pipeline, saved, and the app `eligen ui --controlnet DIR
    --entity-lora style=LORA` makes of them."""
    from eligen.families.flux.testing import build_controlnet

    folder = tmp_path_factory.mktemp("ui-controlnet")
    build_controlnet(0).save_pretrained(folder / "controlnet")
    config = UIConfig(model=str(tiny_pipeline_dir), controlnet=str(folder / "controlnet"), port=0, max_steps=4,
                      entity_lora=[f"style={random_lora_file}"])
    app = make_app(config, folder / "work")
    try:
        yield folder, app
    finally:
        app.jobs.close()


@pytest.fixture(scope="module")
def control_client(control_files) -> Client:
    from starlette.testclient import TestClient

    with TestClient(make_asgi(control_files[1], {"testserver"})) as test_client:
        yield Client(test_client)


def app_and_cli_png(client: Client, layout: dict, params: dict, cli_layout: dict, cli_args: list[str], tmp_path):
    """The app's PNG of ``layout`` and `eligen generate`'s of ``cli_layout`` (the same, with the LoRA's path for its
    name), as (pixels, record) pairs."""
    status, job = client.json("POST", "/api/jobs", {"layout": layout, "params": params})
    assert status == 200, job
    done = client.wait(job["id"])
    assert done["state"] == "done", done
    _, png = client.get(done["result"]["image"])
    (tmp_path / "app.png").write_bytes(png)
    (tmp_path / "layout.json").write_text(json.dumps(cli_layout))
    assert main(["generate", str(tmp_path / "layout.json"), "-o", str(tmp_path / "cli.png"), "--no-progress",
                 *cli_args]) == 0
    return [(np.asarray(Image.open(tmp_path / name)), read_metadata(tmp_path / name))
            for name in ("app.png", "cli.png")]


def test_entity_loras_and_control_images_equal_the_cli(control_files, control_client, tiny_pipeline_dir,
                                                       random_lora_file, tmp_path):
    folder, _ = control_files
    _, info = control_client.json("GET", "/api/info")
    assert info["entity_loras"] == ["style"] and info["controlnet"] is True and info["family"] == "FLUX.1 ControlNet"
    args = ["--model", str(tiny_pipeline_dir), "--controlnet", str(folder / "controlnet"), "--seed", "3", "--steps",
            "2", "--max-sequence-length", "16"]
    lora = {"lora": "style", "lora_scale": 0.7}
    # an entity with a LoRA (named as the app offers it), the whole picture under a control image
    layout = halves_layout(lora, {}, control_image=image_uri(0))
    cli_layout = halves_layout({**lora, "lora": str(random_lora_file)}, {}, control_image=image_uri(0))
    (app_pixels, app_record), (cli_pixels, cli_record) = app_and_cli_png(
        control_client, layout, {**CONTROL_FAST, "control_scale": 0.8}, cli_layout, [*args, "--control-scale", "0.8"],
        tmp_path)
    assert np.array_equal(app_pixels, cli_pixels) and app_record == cli_record
    assert app_record["layout"]["entities"][0]["lora"] == str(random_lora_file)  # as the CLI records it
    assert app_record["params"]["controlnet"] == str(folder / "controlnet")
    # an entity with a control image of its own (no global one)
    control = {"control_image": image_uri(1), "control_scale": 0.6}
    (app_pixels, app_record), (cli_pixels, cli_record) = app_and_cli_png(
        control_client, halves_layout({}, control), CONTROL_FAST, halves_layout({}, control), args, tmp_path)
    assert np.array_equal(app_pixels, cli_pixels) and app_record == cli_record
    assert app_record["layout"]["entities"][1]["control_image"] == image_uri(1)
    # its PNG loads back into the page, the LoRA by its name
    status, loaded = control_client.json("POST", "/api/load", file_body((tmp_path / "app.png").read_bytes()))
    assert status == 200, loaded
    assert loaded["layout"]["entities"][1]["control_scale"] == 0.6
    (tmp_path / "lora.json").write_text(json.dumps(cli_layout))
    status, loaded = control_client.json("POST", "/api/load", file_body((tmp_path / "lora.json").read_bytes()))
    assert status == 200, loaded
    assert loaded["layout"]["entities"][0]["lora"] == "style" and loaded["layout"]["entities"][0]["lora_scale"] == 0.7
    assert loaded["layout"]["control_image"] == image_uri(0)


def test_entity_loras_and_control_images_are_refused_by_field(client, control_files, control_client, tmp_path,
                                                              capsys):
    def refused(client_, layout, params=None):
        status, answer = client_.json("POST", "/api/jobs", {"layout": layout, "params": {**CONTROL_FAST,
                                                                                        **(params or {})}})
        assert status == 400, answer
        return [(e["entity"], e["field"], e["message"]) for e in answer["errors"]]

    control = {"control_image": image_uri(1)}
    [(entity, field, message)] = refused(control_client, halves_layout({"lora": "nope"}, control))
    assert (entity, field) == (0, "lora") and message == ("Entity 1, LoRA: not a LoRA this app offers (it offers "
                                                          "style); choose one in the page")
    [(entity, field, message)] = refused(control_client, halves_layout({"lora": "style", "lora_scale": -1}, control))
    assert (entity, field) == (0, "lora_scale") and "0..100" in message
    [(entity, field, message)] = refused(control_client, halves_layout({"lora": str(tmp_path)}, control))
    assert field == "lora" and str(tmp_path) not in message  # a path is no name: refused, never opened
    [(entity, field, message)] = refused(control_client, halves_layout({}, {"control_image": "/etc/passwd"}))
    assert (entity, field) == (1, "control_image") and "never as paths on the server" in message
    [(entity, field, message)] = refused(control_client, halves_layout({}, {}))
    assert (entity, field) == (None, "control_image") and "runs a ControlNet, which needs a control image" in message
    # the shipped tiny model: no ControlNet, no entity LoRA offered
    layout = page_layout()
    layout["entities"][0].update(control_image=image_uri(1, SIZE), lora="style")
    found = refused(client, layout, {"control_scale": 0.5, "max_sequence_length": None})
    assert {(e, f) for e, f, _ in found} == {(0, "lora"), (0, "control_image"), (None, "control_scale")}, found
    messages = {f: m for _, f, m in found}
    assert "it offers none: whoever starts the app offers LoRAs by name at start" in messages["lora"]
    assert "control images need a ControlNet, and this app's model (FLUX.1) has none" in messages["control_image"]
    assert messages["control_scale"].startswith("Control scale: this app's model has no ControlNet")
    # the operator's flags: checked at start
    for argv, says in ([["ui", "--entity-lora", "style"], "NAME=PATH"],
                       [["ui", "--entity-lora", "a=x", "--entity-lora", "a=y"], "given twice"]):
        assert main(argv) == 2
        assert says in capsys.readouterr().err
    from eligen.ui.app import preload_entity_loras

    with pytest.raises(ValueError, match="--entity-lora gone="):
        preload_entity_loras(control_files[1].pipe, {"gone": str(tmp_path / "missing.safetensors")})


def test_sigterm_stops_the_app_and_removes_its_temporary_folder(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "eligen.cli", "ui", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert process.stdout is not None
        url = ""
        for line in process.stdout:
            if line.startswith("eligen ui: http"):
                url = line.split()[2]
                break
        deadline = time.monotonic() + 60
        while True:  # serving (the page answers), as when a service manager stops it
            try:
                with urllib.request.urlopen(url + "api/info", timeout=5) as answer:
                    assert answer.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "the app never answered"
                time.sleep(0.2)
        assert [p for p in tmp_path.iterdir() if p.name.startswith("eligen-ui-")]  # serving from its folder
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        assert code == 130, process.stdout.read()[-3000:]  # unwound as Ctrl-C is
    finally:
        process.kill()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("eligen-ui-")]

"""`eligen ui` against other web pages and hostile clients, each test written to fail on the hand-written server it
replaced: foreign hosts and origins, non-JSON writes, framing; server paths named in any field (refused unopened, by
the process's audit events, with no oracle, a FIFO never blocking); bodies whose Content-Length is negative, malformed,
lying or missing; the pixel cap on every image and on the planner; only PNG, JPEG and WebP decoders; the step limit;
IPv6 loopback, a busy port told before the model loads, and listening beyond loopback (a warning, an address other
machines reach, an access key)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from eligen.ui.config import UIConfig
from eligen.ui.server import announce, bind, make_asgi, served_hosts
from test_annotate import server as vlm_server  # noqa: F401 - the fake OpenAI-compatible server fixture
from test_ui import file_body, page_layout, png_bytes

SIZE = 64


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from eligen.ui.app import make_app

    app = make_app(UIConfig(port=0, max_upload_mb=1, max_pixels=512 * 512), tmp_path_factory.mktemp("ui"))
    yield app
    app.jobs.close()


@pytest.fixture(scope="module")
def http(app):
    from starlette.testclient import TestClient

    with TestClient(make_asgi(app, {"testserver"})) as client:
        yield client


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1"):
    """The app on uvicorn on a free port of ``host``, as `eligen ui --host HOST` serves it; yields the port."""
    import uvicorn

    sock = bind(host, 0)
    hosts, _ = served_hosts(UIConfig(host=host, port=0))
    server = uvicorn.Server(uvicorn.Config(make_asgi(app, hosts), log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def live(app):
    """The app on uvicorn on a free loopback port, for requests no HTTP client library would send."""
    with serving(app) as port:
        yield port


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers) and ``body`` as they are; the status and the answer's bytes
    (status 0: no answer within ``timeout`` seconds, as from a server still reading to the end of the stream)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
            while chunk := conn.recv(65536):
                answer += chunk
        except OSError:  # the server may close on us once it has answered, or never answer
            pass
    return (int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0), answer


def folder_bytes(folder: Path) -> int:
    """What ``folder`` holds, less the results of jobs (which other tests queue)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "jobs" not in f.relative_to(folder).parts)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` and holds no pixels (what a decompression bomb looks like up front)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def jobs_count(app) -> int:
    return len(app.jobs._jobs)


def test_other_origins_foreign_hosts_and_non_json_writes_are_refused(app, http):
    before = jobs_count(app)
    body = {"layout": page_layout(), "params": {"steps": 1}}
    cases = [({"Origin": "http://evil.example"}, 403), ({"Sec-Fetch-Site": "cross-site"}, 403),
             ({"Origin": "null"}, 403), ({"Host": "evil.example"}, 403), ({"Host": "attacker.test:7860"}, 403)]
    for headers, status in cases:
        assert http.post("/api/jobs", json=body, headers=headers).status_code == status, headers
    assert http.get("/api/info", headers={"Host": "rebound.example"}).status_code == 403  # DNS rebinding
    import json

    text = http.post("/api/jobs", content=json.dumps(body), headers={"Content-Type": "text/plain"})  # no-cors
    assert text.status_code == 415
    assert http.post("/api/upload", content=b"x", headers={"Content-Type": "image/png"}).status_code == 415
    for headers in ({"Origin": "http://testserver:8080"}, {"Origin": "http://testserver.evil.example"},
                    {"Origin": "https://testserver"}, {"Sec-Fetch-Site": "same-site"}):
        assert http.post("/api/jobs", json=body, headers=headers).status_code == 403, headers
    for kind in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json-seq"):
        assert http.post("/api/jobs", content=json.dumps(body), headers={"Content-Type": kind}).status_code == 415
    assert jobs_count(app) == before  # nothing was queued
    same = http.post("/api/jobs", json=body, headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200  # the page itself works
    cancel = f"/api/jobs/{same.json()['id']}/cancel"
    assert http.post(cancel, json={}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert http.post(cancel, json={}, headers={"Origin": "http://testserver"}).status_code == 200


def test_on_the_wire_only_the_pages_own_address_and_origin_get_in(live):
    """What a browser sends, byte for byte, to the app on uvicorn: the page's own requests pass; a rebound name,
    a request with no Host and a cross-origin write do not."""
    page = {"layout": page_layout()}
    body = json.dumps(page).encode()

    def post(host: str, extra: str = "") -> int:
        head = (f"POST /api/check HTTP/1.1\nHost: {host}\nContent-Type: application/json\nConnection: close\n"
                f"Content-Length: {len(body)}\n{extra}")
        return raw_request(live, head, body)[0]

    own = f"127.0.0.1:{live}"
    assert post(own, f"Origin: http://{own}\nSec-Fetch-Site: same-origin\n") == 200  # the page itself
    assert post(f"localhost:{live}", f"Origin: http://localhost:{live}\n") == 200
    assert post(f"rebound.example:{live}") == 403  # DNS rebinding
    assert post(f"127.0.0.1.nip.io:{live}") == 403
    assert post(own, "Origin: http://evil.example\nSec-Fetch-Site: cross-site\n") == 403
    assert post(own, f"Origin: http://127.0.0.1:{live + 1 if live < 65535 else 1}\n") == 403  # another port
    status, _ = raw_request(live, "GET /api/info HTTP/1.0\n")  # no Host at all
    assert status == 403


def test_every_answer_forbids_framing_and_sets_a_content_security_policy(http):
    for response in (http.get("/"), http.get("/api/info"), http.get("/nowhere"),
                     http.get("/", headers={"Host": "evil.example"})):
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"


SERVER_PATHS = ["/etc/passwd", "../../../../etc/shadow", "/root", "/nonexistent/secret.png", "file:///etc/passwd"]
_WATCHED: list[tuple[tuple[str, ...], list[str]]] = []  # (paths, what was opened) while `files_opened` is active
OPENING_EVENTS = ("open", "os.listdir", "os.scandir", "shutil.copyfile", "shutil.copytree")


def _audit(event: str, args: tuple) -> None:
    """Python's audit hook: every file the process opens or lists (PIL, open(), shutil, os.scandir) passes here."""
    if not _WATCHED or event not in OPENING_EVENTS or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    name = os.fsdecode(args[0])
    for paths, seen in _WATCHED:
        if any(name == p or name.endswith("/" + p.removeprefix("file://").lstrip("./")) for p in paths):
            seen.append(f"{event} {name}")


@contextlib.contextmanager
def files_opened(paths: list[str]):
    """The opens of any of ``paths`` while the block runs (by the process's audit events, not a patched function)."""
    if not getattr(files_opened, "hooked", False):
        sys.addaudithook(_audit)  # hooks cannot be removed; it does nothing outside this block
        files_opened.hooked = True  # type: ignore[attr-defined]
    entry: tuple[tuple[str, ...], list[str]] = (tuple(paths), [])
    _WATCHED.append(entry)
    try:
        yield entry[1]
    finally:
        _WATCHED.remove(entry)


def with_path(path: str, where: str) -> dict:
    """The page's layout with ``path`` in one field: ``ip_adapter_image``, an entity's ``image`` or ``mask``."""
    layout = page_layout()
    if where == "ip_adapter_image":
        layout["ip_adapter_image"] = path
    else:
        layout["entities"][0][where] = path
    return layout


def eligen_png(record: dict) -> bytes:
    """A PNG carrying ``record`` as eligen writes it."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("eligen", json.dumps(record))
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def path_requests(path: str) -> list[tuple[str, str, dict]]:
    """Every request in which a client could name ``path``: (field, route, body)."""
    requests = []
    for field in ("ip_adapter_image", "image", "mask"):
        layout = with_path(path, field)
        requests += [(field, "/api/check", {"layout": layout}), (field, "/api/jobs", {"layout": layout})]
        requests.append((field, "/api/load", file_body(json.dumps(layout).encode(), "application/json")))
        record = {"version": "0", "command": "generate", "params": {}, "layout": layout}
        requests.append((field, "/api/load", file_body(eligen_png(record))))
    inpaint = {"layout": page_layout(), "mode": "inpaint"}
    for reference in (path, f"upload:{path}", f"job:{path}"):
        requests.append(("background", "/api/jobs", {**inpaint, "background": reference}))
    requests.append(("params.image", "/api/jobs", {**inpaint, "background": path, "params": {"image": path}}))
    return requests


def test_a_server_path_in_any_field_is_refused_unopened_with_one_message(app, http, tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it would block the request thread for ever
    (tmp_path / "real.png").write_bytes(png_bytes(Image.new("RGB", (SIZE, SIZE))))  # a readable image on the server
    paths = [*SERVER_PATHS, str(fifo), str(tmp_path / "real.png"), str(tmp_path)]
    before, messages = jobs_count(app), {}
    with files_opened(paths) as opened:
        for path in paths:
            for field, route, body in path_requests(path):
                started = time.monotonic()
                answer = http.post(route, json=body)
                assert time.monotonic() - started < 5, (route, field, path)  # the FIFO was not opened
                errors = answer.json()["errors"]
                assert answer.status_code == 400 or route == "/api/check", (route, field, path, answer.text)
                assert errors, (route, field, path)
                for i, error in enumerate(errors):  # the words after the place ("Entity 1, mask: ...")
                    messages.setdefault((route, field, i), set()).add(error["message"].split(": ", 1)[-1])
    assert opened == [], opened
    assert jobs_count(app) == before
    for place, said in messages.items():  # the same words whatever the path: no file-existence oracle
        assert len(said) == 1, (place, said)
        text = next(iter(said))
        assert not any(word in text for word in ("passwd", "shadow", "secret", "fifo", "real.png", str(tmp_path),
                                                 "No such file", "directory", "Permission")), (place, text)


def jpeg_header(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims ``width x height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    raw = bytearray(buffer.getvalue())
    frame = raw.index(b"\xff\xc0")
    raw[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def data_uri(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def test_the_pixel_cap_holds_for_uploads_masks_and_reference_images_before_decoding(app, http):
    bomb = png_header(13000, 13000)  # 169 MP declared in a few bytes: decoding it would fail, not name its size
    for route in ("/api/upload", "/api/load"):
        answer = http.post(route, json=file_body(bomb))
        assert answer.status_code == 400 and "13000x13000" in answer.json()["errors"][0]["message"], route
    for place, value in ((None, data_uri(bomb)), (None, data_uri(jpeg_header(13000, 13000), "jpeg")),
                         (0, data_uri(bomb)), (1, data_uri(jpeg_header(13000, 13000), "jpeg"))):
        layout = page_layout()
        if place is None:
            layout["ip_adapter_image"] = value
        else:
            layout["entities"][place]["image"] = value
        field = "ip_adapter_image" if place is None else "image"
        for route in ("/api/check", "/api/jobs"):
            errors = http.post(route, json={"layout": layout}).json()["errors"]
            assert [(e["entity"], e["field"]) for e in errors] == [(place, field)], (route, errors)
            assert "13000x13000" in errors[0]["message"], errors
    layout = page_layout()
    layout["entities"][1]["mask"] = data_uri(bomb)
    for route in ("/api/check", "/api/jobs"):
        errors = http.post(route, json={"layout": layout}).json()["errors"]
        assert [(e["entity"], e["field"]) for e in errors] == [(1, "mask")] and "13000x13000" in errors[0]["message"]
    answer = http.post("/api/upload", json=file_body(b"not an image at all"))
    assert answer.status_code == 400 and "/tmp" not in answer.text and "eligen-ui" not in answer.text
    big = http.post("/api/upload", json=file_body(png_bytes(Image.new("L", (600, 600)))))  # 360000 > 512x512
    assert big.status_code == 400 and "600x600" in big.json()["errors"][0]["message"]
    fits = http.post("/api/upload", json=file_body(png_bytes(Image.new("L", (512, 512)))))
    assert fits.status_code == 200  # at the cap exactly: taken


def test_images_in_other_formats_reach_no_decoder(app, http):
    """Only PNG, JPEG and WebP are parsed, whatever a data URI's type says (Pillow has decoders that run programs,
    such as EPS through Ghostscript, or parse rarer formats)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    gif = buffer.getvalue()
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    for raw in (gif, eps):
        answer = http.post("/api/upload", json=file_body(raw))
        assert answer.status_code == 400 and "PNG, JPEG or WebP" in answer.text, answer.text
        for kind, field in (("png", "image"), ("jpeg", "image"), ("webp", "image"), ("png", "mask")):
            layout = page_layout()
            layout["entities"][1][field] = data_uri(raw, kind)
            errors = http.post("/api/check", json={"layout": layout}).json()["errors"]
            assert [(e["entity"], e["field"]) for e in errors] == [(1, field)], errors
            assert "could not be read as an image" in errors[0]["message"], errors
    layout = page_layout()
    layout["entities"][0]["image"] = data_uri(gif, "gif")
    errors = http.post("/api/check", json={"layout": layout}).json()["errors"]
    assert "not a PNG, JPEG or WebP file" in errors[0]["message"], errors  # not "never paths": it is a file


def test_the_pixel_cap_holds_for_the_planner_before_it_is_asked(app, vlm_server, tmp_path):  # noqa: F811
    from starlette.testclient import TestClient

    from eligen.ui.app import App
    from test_plan import PLAN

    config = UIConfig(port=0, plan_vlm="openai", plan_base_url=vlm_server.base_url, plan_model="m",
                      max_pixels=512 * 512)
    planner = App(config, app.pipe, tmp_path, app.device, app.dtype, app.loras)
    try:
        with TestClient(make_asgi(planner, {"testserver"})) as client:
            for size in ({"width": 12000, "height": 12000}, {"width": 12000.0, "height": 12000.0},
                         {"width": 12000}, {"height": 12000}, {"width": "12000", "height": "12000"},
                         {"width": 10**30, "height": 10**30}, {"width": True, "height": 10**9}):
                answer = client.post("/api/plan", json={"text": "a cat", **size})
                assert answer.status_code == 400, (size, answer.text)
                assert {e["field"] for e in answer.json()["errors"]} <= {"width", "height"}, answer.text
            assert vlm_server.fake.bodies == []  # the planner was never asked
            vlm_server.fake.text_answers = [PLAN]
            answer = client.post("/api/plan", json={"text": "a cat and a dog on a sofa", "width": 512, "height": 512})
            assert answer.status_code == 200 and len(answer.json()["layout"]["entities"]) == 2
    finally:
        planner.jobs.close()


def test_a_job_over_the_step_limit_is_refused_before_it_is_queued(app, http, tmp_path):
    from starlette.testclient import TestClient

    from eligen.ui.app import App

    before, limit = jobs_count(app), app.config.max_steps
    for steps in (limit + 1, 1_000_000, 10**30, 1e6, "1000000", [10**6]):  # 1000000 steps: about 14 hours
        for mode in ("generate", "inpaint"):
            answer = http.post("/api/jobs", json={"layout": page_layout(), "mode": mode, "params": {"steps": steps}})
            assert answer.status_code == 400, (steps, answer.text)
            assert (None, "steps") in [(e["entity"], e["field"]) for e in answer.json()["errors"]], answer.text
    assert f"at most {limit}" in http.post("/api/jobs", json={"layout": page_layout(),
                                                             "params": {"steps": limit + 1}}).text
    assert jobs_count(app) == before
    small = App(UIConfig(max_steps=10), app.pipe, tmp_path, app.device, app.dtype, app.loras)
    try:  # the model's own default (20 steps) is over this app's limit: a job that leaves steps out is refused too
        with TestClient(make_asgi(small, {"testserver"})) as client:
            answer = client.post("/api/jobs", json={"layout": page_layout()})
            assert answer.status_code == 400 and "at most 10" in answer.text, answer.text
            assert answer.json()["errors"][0]["field"] == "steps" and len(small.jobs._jobs) == 0
            job = client.post("/api/jobs", json={"layout": page_layout(), "params": {"steps": 10}})
            assert job.status_code == 200  # at the limit: queued
            client.post(f"/api/jobs/{job.json()['id']}/cancel", json={})
    finally:
        small.jobs.close()


def test_the_app_answers_on_ipv6_loopback(app):
    import http.client

    try:
        bind("::1", 0).close()
    except ValueError:
        pytest.skip("no IPv6 loopback on this machine")
    with serving(app, "::1") as port:
        def status(method: str, path: str, body: str | None = None, headers: dict | None = None) -> int:
            conn = http.client.HTTPConnection("::1", port, timeout=10)  # Host: [::1]:port, as a browser sends it
            try:
                conn.request(method, path, body, headers or {})
                return conn.getresponse().status
            finally:
                conn.close()

        assert status("GET", "/api/info") == 200
        assert status("POST", "/api/check", json.dumps({"layout": page_layout()}),
                      {"Content-Type": "application/json", "Origin": f"http://[::1]:{port}"}) == 200
        assert status("GET", "/api/info", headers={"Host": f"rebound.example:{port}"}) == 403


def test_no_content_length_can_pass_the_body_cap(app, live):
    cap, kept = app.max_body_bytes, folder_bytes(app.workdir)
    head = f"POST /api/upload HTTP/1.1\nHost: 127.0.0.1:{live}\nContent-Type: application/json\nConnection: close\n"
    started = time.monotonic()
    status, _ = raw_request(live, head + "Content-Length: -1\n", b"{}", timeout=5)
    assert status == 400 and time.monotonic() - started < 5  # refused at once, not read to the end of the stream
    for malformed in ("Content-Length: +10\n", "Content-Length: 1e9\n", "Content-Length: 10\nContent-Length: 99\n",
                      f"Content-Length: {2**70}\n"):
        status, _ = raw_request(live, head + malformed, b"{}", timeout=5)
        assert status in (400, 413), malformed
    status, answer = raw_request(live, head + "Content-Length: 10\n", b'{"a": 1}  ' + b"x" * 4096)
    assert status == 400 and b"send the file as" in answer  # a lying length: its 10 bytes are the body
    chunks = b"".join(b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n" for _ in range(cap // 65536 + 2))
    status, answer = raw_request(live, head + "Transfer-Encoding: chunked\n", chunks + b"0\r\n\r\n")
    assert status == 413 and b"above this app's limit of 1 MiB" in answer  # no length at all: cut at the cap
    status, answer = raw_request(live, head + f"Content-Length: {100 * cap}\n", b"{}", timeout=5)
    assert status == 413  # declared too large: refused without reading it
    body = json.dumps(file_body(png_bytes(Image.new("RGB", (SIZE, SIZE))))).encode()
    body = body[:-1] + b", " + b'"pad": "' + b"x" * (cap + 1) + b'"}'  # a valid upload, over the cap
    status, answer = raw_request(live, head + f"Content-Length: {len(body)}\n", body)
    assert status == 413 and b"upload:" not in answer
    assert folder_bytes(app.workdir) == kept  # nothing of any of these bodies was written


def test_listening_beyond_loopback_warns_prints_the_address_and_needs_the_key(app, capsys):
    from starlette.testclient import TestClient

    config = UIConfig(host="0.0.0.0", port=0, allowed_host=["studio.lan"])
    hosts, reachable = served_hosts(config)
    assert all(not a.startswith("127.") for a in reachable)
    assert {"127.0.0.1", "localhost", "studio.lan"} <= hosts and "0.0.0.0" not in hosts
    announce(config, 7860, ["192.0.2.5"], "KEY")
    out, err = capsys.readouterr()
    assert "WARNING" in err and "anyone who can reach this machine" in err
    assert "http://192.0.2.5:7860/?key=KEY" in out and "0.0.0.0" not in out
    announce(UIConfig(host="::1"), 7861, [], None)
    assert "http://[::1]:7861/" in capsys.readouterr().out
    with TestClient(make_asgi(app, {"testserver"}, access_key="KEY"), follow_redirects=False) as client:
        assert client.get("/api/info").status_code == 401
        entered = client.get("/?key=KEY")
        assert entered.status_code == 303 and "HttpOnly" in entered.headers["set-cookie"]
        assert client.get("/api/info").status_code == 200  # the cookie carries the key now
        client.cookies.clear()
        client.cookies.set("eligen_key", "wrong")
        assert client.get("/api/info").status_code == 401


def test_every_interface_finds_this_machines_address_when_its_name_resolves_to_loopback(monkeypatch):
    from eligen.ui.server import _route_address

    routed = _route_address(socket.AF_INET)
    if routed is None or routed.startswith("127."):
        pytest.skip("this machine has no IPv4 route beyond loopback")
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")  # as /etc/hosts says in most containers
    hosts, reachable = served_hosts(UIConfig(host="0.0.0.0", port=0))
    assert routed in reachable and routed in hosts
    assert all(":" not in address for address in reachable)  # 0.0.0.0 listens on IPv4 only


def test_eligen_ui_on_every_interface_warns_and_prints_an_address_that_works(tmp_path):
    import re
    import subprocess
    import urllib.error
    import urllib.request

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the default route's source (nothing is sent)
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("this machine has no IPv4 route beyond loopback")
        routed = probe.getsockname()[0]
    if routed.startswith("127."):
        pytest.skip("this machine has no IPv4 route beyond loopback")
    err = (tmp_path / "stderr.txt").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "eligen.cli", "ui", "--host", "0.0.0.0", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=err, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    try:
        lines: list[str] = []
        while not any("Ctrl-C stops it" in line for line in lines):
            line = process.stdout.readline()
            assert line, "eligen ui stopped: " + (tmp_path / "stderr.txt").read_text()
            lines.append(line)
        out = "".join(lines)
        assert "WARNING: listening on 0.0.0.0" in (tmp_path / "stderr.txt").read_text()
        assert "0.0.0.0" not in out, out
        found = re.search(r"from other machines: (http://([0-9.]+):(\d+)/)\?key=(\S+)", out)
        assert found is not None and found.group(2) == routed, out
        base, key = found.group(1), found.group(4)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "api/info", timeout=10)
        assert refused.value.code == 401  # the address alone is not enough: the key is needed
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())  # keeps the key's cookie
        with browser.open(f"{base}?key={key}", timeout=10) as page:  # the printed address, as a browser opens it
            assert page.url == base and b'id="canvas"' in page.read()
        with browser.open(base + "api/info", timeout=10) as answer:
            assert json.loads(answer.read())["model"] == "eligen-tiny"
    finally:
        process.terminate()
        process.wait(timeout=30)
        err.close()


def test_a_busy_port_or_a_wrong_address_is_told_before_the_model_loads(capsys):
    from eligen.cli import main

    hosts = ["127.0.0.1"] + (["::1"] if socket.has_ipv6 else [])
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as busy:
            try:
                busy.bind((host, 0))
            except OSError:
                continue  # no IPv6 loopback here
            busy.listen(1)
            port = busy.getsockname()[1]
            started = time.monotonic()
            assert main(["ui", "--host", host, "--port", str(port)]) == 2
            assert time.monotonic() - started < 5
            err = capsys.readouterr().err
            assert "the port is in use; choose another --port" in err and "loading" not in err, err  # no model yet
    assert main(["ui", "--host", "192.0.2.77", "--port", "0"]) == 2  # TEST-NET: not an address of this machine
    assert "must be an address of this machine" in capsys.readouterr().err

"""`eligen ui` against other web pages and hostile clients: foreign hosts and origins, non-JSON writes, framing,
server paths named in any field (refused unopened, with no oracle), bodies whose Content-Length lies, the pixel cap
on every image, and listening beyond loopback (a warning, the real address, an access key)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from eligen.ui.config import UIConfig
from eligen.ui.server import announce, bind, make_asgi, served_hosts
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


@pytest.fixture(scope="module")
def live(app):
    """The app on uvicorn on a free loopback port, for requests no HTTP client library would send."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    hosts, _ = served_hosts(UIConfig(port=0))
    server = uvicorn.Server(uvicorn.Config(make_asgi(app, hosts), log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers) and ``body`` as they are; the status and the answer's bytes."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
            while chunk := conn.recv(65536):
                answer += chunk
        except OSError:  # the server may close on us once it has answered
            pass
    return int(answer.split(b" ", 2)[1]), answer


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
    assert jobs_count(app) == before  # nothing was queued
    same = http.post("/api/jobs", json=body, headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200  # the page itself works


def test_every_answer_forbids_framing_and_sets_a_content_security_policy(http):
    for response in (http.get("/"), http.get("/api/info"), http.get("/nowhere"),
                     http.get("/", headers={"Host": "evil.example"})):
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"


SERVER_PATHS = ["/etc/passwd", "../../../../etc/shadow", "/root", "/nonexistent/secret.png", "file:///etc/passwd"]


def test_a_server_path_in_any_field_is_refused_unopened_with_one_message(app, http, tmp_path, monkeypatch):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it would block the request thread for ever
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) if isinstance(fp, (str, os.PathLike))
                        else real_open(fp, *a, **k))
    messages = set()
    for path in [*SERVER_PATHS, str(fifo)]:
        layouts = [{**page_layout(), "ip_adapter_image": path}, page_layout()]
        layouts[1]["entities"][0]["image"] = path
        for layout in layouts:
            for route in ("/api/check", "/api/jobs"):
                started = time.monotonic()
                answer = http.post(route, json={"layout": layout}).json()
                assert time.monotonic() - started < 5
                errors = [e for e in answer["errors"] if e["field"] in ("image", "ip_adapter_image")]
                assert errors, answer
                messages |= {e["message"].split(": ", 1)[1] for e in errors}
    assert opened == [] and len(messages) == 1, messages  # the same words whatever the path: no oracle
    assert not any(p.strip("./") in next(iter(messages)) for p in SERVER_PATHS)


def test_a_server_path_inside_an_uploaded_pngs_record_is_refused(app, http):
    import json

    image = Image.new("RGB", (SIZE, SIZE))
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    record = {"version": "0", "command": "generate", "params": {}, "layout": {**page_layout(),
                                                                               "ip_adapter_image": "/etc/passwd"}}
    info.add_itxt("eligen", json.dumps(record))
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    answer = http.post("/api/load", json=file_body(buffer.getvalue()))
    assert answer.status_code == 400
    error = answer.json()["errors"][0]
    assert error["field"] == "ip_adapter_image" and "passwd" not in error["message"]


def test_the_pixel_cap_holds_for_uploads_masks_and_reference_images_before_decoding(app, http):
    bomb = png_header(13000, 13000)  # 169 MP declared in a few bytes
    answer = http.post("/api/upload", json=file_body(bomb))
    assert answer.status_code == 400 and "13000x13000" in answer.json()["errors"][0]["message"]
    layout = page_layout()
    layout["entities"][0]["image"] = "data:image/png;base64," + __import__("base64").b64encode(bomb).decode()
    errors = http.post("/api/check", json={"layout": layout}).json()["errors"]
    assert [(e["entity"], e["field"]) for e in errors] == [(0, "image")] and "13000x13000" in errors[0]["message"]
    layout = page_layout()
    layout["entities"][1]["mask"] = "data:image/png;base64," + __import__("base64").b64encode(bomb).decode()
    errors = http.post("/api/check", json={"layout": layout}).json()["errors"]
    assert [(e["entity"], e["field"]) for e in errors] == [(1, "mask")]
    answer = http.post("/api/upload", json=file_body(b"not an image at all"))
    assert answer.status_code == 400 and "/tmp" not in answer.text and "eligen-ui" not in answer.text
    big = http.post("/api/upload", json=file_body(png_bytes(Image.new("L", (600, 600)))))  # 360000 > 512x512
    assert big.status_code == 400 and "512" not in big.json()["errors"][0]["message"].split("limit of")[0]


def test_no_content_length_can_pass_the_body_cap(app, live):
    cap = app.max_body_bytes
    head = f"POST /api/upload HTTP/1.1\nHost: 127.0.0.1:{live}\nContent-Type: application/json\nConnection: close\n"
    status, _ = raw_request(live, head + "Content-Length: -1\n", b"{}")
    assert status == 400  # the server refuses a negative length itself
    status, answer = raw_request(live, head + "Content-Length: 10\n", b'{"a": 1}  ' + b"x" * 4096)
    assert status == 400 and b"send the file as" in answer  # a lying length: its 10 bytes are the body
    chunks = b"".join(b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n" for _ in range(cap // 65536 + 2))
    status, answer = raw_request(live, head + "Transfer-Encoding: chunked\n", chunks + b"0\r\n\r\n")
    assert status == 413 and b"above this app's limit of 1 MiB" in answer  # no length at all: cut at the cap
    status, answer = raw_request(live, head + f"Content-Length: {100 * cap}\n", b"{}")
    assert status == 413  # declared too large: refused without reading it


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


def test_a_busy_port_or_a_wrong_address_is_told_before_the_model_loads(capsys):
    from eligen.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        started = time.monotonic()
        assert main(["ui", "--port", str(port)]) == 2
        assert time.monotonic() - started < 5  # no model was loaded first
        assert "the port is in use; choose another --port" in capsys.readouterr().err
    assert main(["ui", "--host", "192.0.2.77", "--port", "0"]) == 2  # TEST-NET: not an address of this machine
    assert "must be an address of this machine" in capsys.readouterr().err
    if socket.has_ipv6:
        try:
            sock = bind("::1", 0)
        except ValueError:
            pytest.skip("no IPv6 loopback here")
        sock.close()

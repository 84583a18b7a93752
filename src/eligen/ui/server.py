"""`eligen ui`: the web app's server, Starlette on uvicorn (the ``ui`` extra). The routes are thin: each reads its
JSON body (bounded by the app's cap whatever the headers say) and hands it to :class:`eligen.ui.app.App` on a worker
thread; :class:`eligen.ui.guard.Guard` refuses foreign hosts, other origins and non-JSON writes and sets the
security headers. The listening socket is bound before the model loads, so a busy port or a wrong address is told
at once."""

from __future__ import annotations

import errno
import ipaddress
import json
import secrets
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .app import App, RequestError, make_app, page_error, refused
from .config import LOOPBACK_NAMES, UIConfig, is_loopback
from .guard import Guard
from .uploads import too_large

STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
                "/app.css": ("app.css", "text/css")}
JOB_ID = "{job_id:str}"
JOB_FILES = ("image.png", "overlay.png", "layout.json")
DRAIN_FACTOR = 8  # an over-size body declared up to this many times the cap is read and dropped, so a browser
# reads the answer instead of a reset connection; anything larger (or undeclared) is cut off at the cap


def _is_id(text: str) -> bool:
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


async def read_json(request: Request, cap: int) -> Any:
    """The request's JSON body, refused (413) once more than ``cap`` bytes have arrived, whatever its
    ``Content-Length`` says (the server has already refused a malformed one). What comes beyond the cap is read and
    dropped up to ``DRAIN_FACTOR`` times the cap (so a browser reads the answer), never kept."""
    declared = request.headers.get("content-length", "")
    over = declared.isdigit() and int(declared) > cap
    chunks, size = [], 0
    try:
        if over and int(declared) > DRAIN_FACTOR * cap:
            raise ClientDisconnect  # not worth reading: refused as it stands
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_FACTOR * cap:
                break
            if size <= cap:
                chunks.append(chunk)
    except ClientDisconnect:
        if not over:
            raise refused("the request was cut off") from None
    if over or size > cap:
        raise refused(too_large(max(size, int(declared or 0)) * 3 // 4, request.app.state.app.config.max_upload_bytes),
                      "file", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise refused("the request body is not JSON") from None


def _answer(status: HTTPStatus | int, data: Any) -> JSONResponse:
    return JSONResponse(data, status_code=int(status))


async def _run(work: Callable[[], Any]) -> Response:
    """``work`` on a worker thread, its result or refusal as JSON."""
    try:
        return _answer(HTTPStatus.OK, await run_in_threadpool(work))
    except RequestError as exc:
        return _answer(exc.status, {"errors": exc.errors})
    except Exception as exc:  # the server stays up; the page shows what went wrong
        print(f"eligen ui: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"errors": [page_error(exc)]})


def _post(method: Callable[[App, Any], Any]):
    async def endpoint(request: Request) -> Response:
        app: App = request.app.state.app
        try:
            body = await read_json(request, app.max_body_bytes)
        except RequestError as exc:
            return _answer(exc.status, {"errors": exc.errors})
        return await _run(lambda: method(app, body))
    return endpoint


def _not_found() -> JSONResponse:
    return _answer(HTTPStatus.NOT_FOUND, {"errors": [{"message": "not found", "entity": None, "field": None}]})


async def static(request: Request) -> Response:
    name, content_type = STATIC_FILES[request.url.path]
    return Response(resources.files(__package__).joinpath("static", name).read_bytes(), media_type=content_type)


async def info(request: Request) -> Response:
    return await _run(request.app.state.app.info)


async def history(request: Request) -> Response:
    return await _run(request.app.state.app.history)


async def job_status(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    if not _is_id(job_id):
        return _not_found()
    return await _run(lambda: request.app.state.app.status(job_id))


async def cancel(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    if not _is_id(job_id):
        return _not_found()
    return await _post(lambda app, body: app.cancel(job_id))(request)


async def job_file(request: Request) -> Response:
    job_id, name = request.path_params["job_id"], request.path_params["name"]
    if not _is_id(job_id) or name not in JOB_FILES:
        return _not_found()
    return await _file(lambda: request.app.state.app.job_file(job_id, name))


async def upload_file(request: Request) -> Response:
    upload_id = request.path_params["upload_id"]
    if not _is_id(upload_id):
        return _not_found()
    return await _file(lambda: request.app.state.app.upload_file(upload_id))


async def _file(locate: Callable[[], Path]) -> Response:
    try:
        path = locate()
    except RequestError as exc:
        return _answer(exc.status, {"errors": exc.errors})
    return FileResponse(path, media_type="application/json" if path.suffix == ".json" else "image/png")


ROUTES = [
    *(Route(path, static, methods=["GET"]) for path in STATIC_FILES),
    Route("/api/info", info, methods=["GET"]),
    Route("/api/jobs", history, methods=["GET"]),
    Route("/api/jobs", _post(App.submit), methods=["POST"]),
    Route(f"/api/jobs/{JOB_ID}", job_status, methods=["GET"]),
    Route(f"/api/jobs/{JOB_ID}/cancel", cancel, methods=["POST"]),
    Route(f"/api/jobs/{JOB_ID}/{{name:str}}", job_file, methods=["GET"]),
    Route("/api/uploads/{upload_id:str}.png", upload_file, methods=["GET"]),
    Route("/api/check", _post(App.check), methods=["POST"]),
    Route("/api/upload", _post(App.upload), methods=["POST"]),
    Route("/api/load", _post(App.load), methods=["POST"]),
    Route("/api/plan", _post(App.plan), methods=["POST"]),
]


async def _missing(request: Request, exc: Exception) -> Response:
    return _not_found()


def make_asgi(app: App, hosts: set[str], access_key: str | None = None) -> Guard:
    """The ASGI application serving ``app``: the routes above behind :class:`~eligen.ui.guard.Guard`."""
    web = Starlette(routes=ROUTES, exception_handlers={404: _missing, 405: _missing})
    web.state.app = app
    return Guard(web, hosts, access_key)


# -- listening ------------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (IPv4 or IPv6 by the address), bound now; errors say what to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ValueError(f"cannot listen on {where}: the port is in use; choose another --port (0: any free "
                             "one)") from None
        if exc.errno == errno.EACCES:
            raise ValueError(f"cannot listen on {where}: ports below 1024 need administrator rights; choose "
                             "another --port") from None
        raise ValueError(f"cannot listen on {where}: {exc.strerror or exc}; --host must be an address of this "
                         "machine (127.0.0.1, ::1, 0.0.0.0 or ::)") from None
    return sock


ROUTE_PROBES = {socket.AF_INET: "192.0.2.1", socket.AF_INET6: "2001:db8::1"}  # documentation addresses


def _route_address(family: socket.AddressFamily) -> str | None:
    """The address this machine sends from towards the wider network: a UDP socket's source once "connected" (a
    route lookup; nothing is sent). None without such a route."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((ROUTE_PROBES[family], 9))
            return str(probe.getsockname()[0])
        except OSError:
            return None


def machine_addresses(families: tuple[socket.AddressFamily, ...] = (socket.AF_INET, socket.AF_INET6)) -> list[str]:
    """This machine's own non-loopback, non-link-local addresses of ``families``: what its name resolves to and the
    source address of its default route (a name often resolves to loopback alone, as in most containers)."""
    found: set[str] = set()
    try:
        found |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
                  if info[0] in families}
    except OSError:
        pass
    found |= {a for a in (_route_address(f) for f in families) if a is not None}
    usable = []
    for address in found:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
            usable.append(address)
    return sorted(usable)


def served_hosts(config: UIConfig) -> tuple[set[str], list[str]]:
    """The names the page may be reached by (the ``Host`` headers accepted) and the addresses to print."""
    wildcard = config.host in ("0.0.0.0", "::")
    if is_loopback(config.host) or wildcard:
        hosts = set(LOOPBACK_NAMES) | ({config.host} if not wildcard else set())
    else:
        hosts = {config.host}
    families = (socket.AF_INET,) if config.host == "0.0.0.0" else (socket.AF_INET, socket.AF_INET6)
    reachable = machine_addresses(families) if wildcard else ([] if is_loopback(config.host) else [config.host])
    if wildcard:
        hosts |= set(reachable) | {socket.gethostname().lower()}
    return hosts | {h.lower() for h in config.allowed_host}, reachable


def _url(host: str, port: int, key: str | None = None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?key={key}" if key else "")


def announce(config: UIConfig, port: int, reachable: list[str], key: str | None) -> str:
    """Print where the app is; beyond loopback, a warning and the addresses other machines use. Returns the URL to
    open here."""
    if is_loopback(config.host):
        url = _url("127.0.0.1" if config.host == "localhost" else config.host, port)
        print(f"eligen ui: {url}  (Ctrl-C stops it)", flush=True)
        return url
    local = _url("127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host, port, key)
    print(f"eligen ui: WARNING: listening on {config.host} (port {port}): anyone who can reach this machine over "
          "the network and has the address below (with its key) can generate and read results; use the default "
          "--host 127.0.0.1 to keep it to this machine", file=sys.stderr, flush=True)
    for address in reachable:
        print(f"eligen ui: from other machines: {_url(address, port, key)}", flush=True)
    if not reachable:
        print("eligen ui: no network address of this machine was found by its name; use one of its addresses "
              f"with port {port} and ?key={key}", flush=True)
    print(f"eligen ui: {local}  (Ctrl-C stops it)", flush=True)
    return local


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(config: UIConfig) -> None:
    """Run the app until interrupted (Ctrl-C or SIGTERM); the temporary folder goes with it. SIGTERM unwinds like
    Ctrl-C whenever it comes: while the model loads, or while serving (uvicorn stops gracefully, then re-raises it)."""
    import uvicorn

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    sock = bind(config.host, config.port)  # before the model loads: a busy port is told at once
    try:
        with tempfile.TemporaryDirectory(prefix="eligen-ui-") as workdir:
            print(f"loading {config.model} ...", file=sys.stderr)
            app = make_app(config, Path(workdir))
            key = None if is_loopback(config.host) else secrets.token_urlsafe(18)
            hosts, reachable = served_hosts(config)
            url = announce(config, sock.getsockname()[1], reachable, key)
            if config.open_browser:
                import webbrowser

                webbrowser.open(url)
            server = uvicorn.Server(uvicorn.Config(make_asgi(app, hosts, key), log_level="warning", access_log=False,
                                                   lifespan="off", timeout_graceful_shutdown=2))
            try:
                server.run(sockets=[sock])
            finally:
                app.jobs.close()
    finally:
        sock.close()
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)

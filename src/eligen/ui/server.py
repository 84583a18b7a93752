"""`eligen ui`: the web app's server. A stdlib threading HTTP server with a small JSON API; the page is
``static/``. The model is loaded once; generations go through one queue (:mod:`eligen.ui.jobs`) and render with
the CLI's own code (:func:`eligen.generate.render`), so a PNG from the app equals the CLI's and carries the same
record. Nothing a client sends is a path: uploads and results live in the server's temporary folder under
random ids."""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from PIL import Image

from ..config import config_from_mapping
from ..entities import LayoutError, layout_to_dict
from ..files import open_image, write_text_atomic
from ..generate import (
    GenerateConfig,
    InpaintConfig,
    default_dtype,
    fit_patch_grid,
    load_pipeline,
    render,
    resolve_device,
    resolve_layout,
    save_png,
    set_lora_scales,
)
from ..models import model_loras
from ..options import pipeline_sampling_defaults, resolve_sampling, schema
from ..overlay import PALETTE, render_overlay
from .config import MAX_ENTITIES, UIConfig
from .jobs import Job, JobQueue
from .layouts import (
    INPAINT_PARAMS,
    PAGE_OPTIONS,
    PAGE_PARAMS,
    check_page_layout,
    layout_for_page,
    layout_problems,
    preview,
    problem,
    read_upload_record,
)

if TYPE_CHECKING:
    from ..data.vlm import VLMBackend

STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript"),
                "/app.css": ("app.css", "text/css")}
JOB_FILE = re.compile(r"^/api/jobs/([0-9a-f]{16})/(image\.png|overlay\.png|layout\.json)$")
JOB_STATUS = re.compile(r"^/api/jobs/([0-9a-f]{16})$")
UPLOAD_FILE = re.compile(r"^/api/uploads/([0-9a-f]{16})\.png$")
DRAIN_FACTOR = 8  # an over-size body up to this many times the cap is read and dropped, so the browser sees the answer


class RequestError(Exception):
    """A request the page must fix: ``status`` and the page's error list."""

    def __init__(self, status: HTTPStatus, *errors: dict[str, Any]):
        super().__init__(errors[0]["message"] if errors else status.phrase)
        self.status, self.errors = status, list(errors)


def _refused(message: str, field: str | None = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> RequestError:
    return RequestError(status, {"message": message, "entity": None, "field": field})


def page_error(exc: Exception) -> dict[str, Any]:
    """A failed job as the page shows it; anything but a bad layout or option is an internal error."""
    if isinstance(exc, (LayoutError, ValueError)):
        return problem(exc)
    return {**problem(exc), "message": f"internal error: {type(exc).__name__}: {exc}", "internal": True}


class App:
    """The app's state: one pipeline, one queue, the uploads and results in ``workdir``."""

    def __init__(self, config: UIConfig, pipe, workdir: Path, device: str, dtype: str, loras: list[str]):
        self.config, self.pipe, self.workdir = config, pipe, workdir
        self.device, self.dtype, self.loras = device, dtype, loras
        self.defaults = pipeline_sampling_defaults(pipe)  # the page's defaults and what a job leaves out
        self.uploads: dict[str, Path] = {}
        self.lock = threading.Lock()
        self.jobs = JobQueue(on_error=page_error, on_forget=self._forget)
        self._planner: VLMBackend | None = None

    # -- what the page reads first ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the page reads first: the model, its sizes, and the option schema it renders its controls from
        (each option's default is what a job that leaves it out runs)."""
        height, width = self.pipe.native_size()
        options = schema(PAGE_OPTIONS, self.defaults)
        return {
            "model": self.config.model, "family": self.pipe.family.card.title,
            "native_size": [width, height], "token_pixels": self.pipe.patch_grid,
            "options": options, "defaults": {option["name"]: option["default"] for option in options},
            "loras": [Path(lora).name or lora for lora in self.loras],
            "palette": [list(c) for c in PALETTE], "max_entities": MAX_ENTITIES,
            "max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels,
            "plan": self.config.plan_vlm is not None,
        }

    def check(self, body: Any) -> dict[str, Any]:
        """The live preview: every problem the layout would meet, and each mask on the model's token grid."""
        return preview(body.get("layout") if isinstance(body, dict) else None, self.config.max_pixels, self.pipe)

    # -- generation -------------------------------------------------------------------------------------------

    def submit(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _refused("the request is a JSON object with 'layout', 'params' and 'mode'")
        mode = body.get("mode", "generate")
        if mode not in ("generate", "inpaint"):
            raise _refused(f"mode must be generate or inpaint, got {mode!r}", "mode")
        params = body.get("params", {})
        if not isinstance(params, dict):
            raise _refused("params is a JSON object", "params")
        allowed = PAGE_PARAMS if mode == "inpaint" else PAGE_PARAMS - INPAINT_PARAMS
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise _refused(f"unknown option(s) {unknown} for {mode}", unknown[0])
        problems = layout_problems(body.get("layout"), self.config.max_pixels, self.pipe.entity_latent_masks)
        if problems:
            raise RequestError(HTTPStatus.BAD_REQUEST, *problems)
        # the LoRAs as given (none: the model's own, which records name by leaving them out)
        server_side: dict[str, Any] = {"model": self.config.model, "lora": list(self.config.lora), "progress": False,
                                       "device": self.device, "dtype": self.dtype}
        source_name = None
        if mode == "inpaint":
            source, source_name = self._source(body.get("background"))
            server_side["image"] = source
        try:
            config = config_from_mapping(InpaintConfig if mode == "inpaint" else GenerateConfig, params, server_side)
            config = dataclasses.replace(config, **resolve_sampling(config, self.defaults))
            layout = resolve_layout(config, check_page_layout(body["layout"], self.config.max_pixels))
        except (LayoutError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, problem(exc)) from None
        seed = config.seed if config.seed is not None else layout.seed
        seed = seed if seed is not None else secrets.randbelow(2**32)
        job = Job(task=lambda job: self._render(job, config, layout, seed, source_name))
        job.steps = config.steps
        position = self.jobs.submit(job)
        return {"id": job.id, "position": position, "seed": seed}

    def _render(self, job: Job, config: GenerateConfig, layout, seed: int, source_name: str | None) -> dict:
        def on_step_end(pipe, i, t, tensors):
            job.step = min(i + 1, job.steps)
            return {}

        set_lora_scales(self.pipe, len(self.loras), config.lora_scale)
        layout = fit_patch_grid(self.pipe, config, layout)
        image, metadata = render(self.pipe, config, layout, seed, self.device, self.dtype, on_step_end)
        if source_name is not None:
            metadata["params"]["image"] = source_name  # the user's name for it, never the server's path
            metadata.get("inputs", {}).get("image", {})["path"] = source_name
        folder = self.workdir / "jobs" / job.id
        job.files = {"image.png": folder / "image.png", "overlay.png": folder / "overlay.png",
                     "layout.json": folder / "layout.json"}
        save_png(image, job.files["image.png"], metadata)
        overlay = render_overlay(image, layout.masks(), [e.prompt for e in layout.entities])
        save_png(overlay, job.files["overlay.png"], metadata)
        write_text_atomic(job.files["layout.json"], json.dumps(layout_to_dict(layout), indent=2) + "\n")
        base = f"/api/jobs/{job.id}"
        return {"seed": seed, "width": layout.width, "height": layout.height, "image": f"{base}/image.png",
                "overlay": f"{base}/overlay.png", "layout": f"{base}/layout.json",
                "name": f"eligen_{seed}.png", "layout_name": f"eligen_{seed}.json"}

    def _source(self, reference: Any) -> tuple[str, str]:
        """An inpainting input named by the page: an upload id or a finished job's image (never a path)."""
        if isinstance(reference, str) and reference.startswith("upload:"):
            with self.lock:
                path = self.uploads.get(reference.removeprefix("upload:"))
            if path is not None:
                return str(path), "uploaded image"
        if isinstance(reference, str) and reference.startswith("job:"):
            job = self.jobs.get(reference.removeprefix("job:"))
            if job is not None and job.state == "done":
                assert job.result is not None  # a done job holds its result
                return str(job.files["image.png"]), f"result {job.result['name']}"
        raise _refused("choose the image to inpaint: upload one, or use a result as the background", "image")

    def status(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            raise _refused("no such job (finished jobs are kept for a while, then forgotten)", None,
                           HTTPStatus.NOT_FOUND)
        return {"id": job.id, "state": job.state, "position": self.jobs.position(job), "step": job.step,
                "steps": job.steps, "result": job.result, "error": job.error}

    def job_file(self, job_id: str, name: str) -> Path:
        job = self.jobs.get(job_id)
        if job is None or job.state != "done":
            raise _refused("no such result", None, HTTPStatus.NOT_FOUND)
        return job.files[name]

    def _forget(self, job: Job) -> None:
        shutil.rmtree(self.workdir / "jobs" / job.id, ignore_errors=True)

    # -- files the page sends ---------------------------------------------------------------------------------

    def upload(self, raw: bytes) -> dict[str, Any]:
        """An input image for inpainting: decoded (size-capped before decoding) and kept as RGB PNG."""
        upload_id = secrets.token_hex(8)
        folder = self.workdir / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        received = folder / f"{upload_id}.upload"
        received.write_bytes(raw)
        try:
            with Image.open(received) as probe:
                width, height = probe.size
            if width * height > self.config.max_pixels:
                raise _refused(f"the image is {width}x{height} ({width * height} pixels), above this app's "
                               f"{self.config.max_pixels} pixels (--max-pixels); downscale it first", "image")
            image = open_image(received, "uploaded image").convert("RGB")
        except OSError as exc:
            raise _refused(f"the upload is not an image this app can read ({exc})", "image") from None
        except ValueError as exc:
            raise _refused(str(exc), "image") from None
        finally:
            received.unlink(missing_ok=True)
        path = folder / f"{upload_id}.png"
        image.save(path, format="PNG")
        with self.lock:
            self.uploads[upload_id] = path
        return {"id": f"upload:{upload_id}", "width": image.width, "height": image.height,
                "url": f"/api/uploads/{upload_id}.png"}

    def upload_file(self, upload_id: str) -> Path:
        with self.lock:
            path = self.uploads.get(upload_id)
        if path is None:
            raise _refused("no such upload", None, HTTPStatus.NOT_FOUND)
        return path

    def load(self, raw: bytes) -> dict[str, Any]:
        """A layout JSON or an eligen PNG, to continue editing exactly where it was."""
        try:
            return read_upload_record(raw, self.config.max_pixels)
        except (LayoutError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, problem(exc)) from None

    def plan(self, body: Any) -> dict[str, Any]:
        """`eligen plan` from the page: a description -> a layout to edit (only when a planner is configured)."""
        if self.config.plan_vlm is None:
            raise _refused("no layout planner is configured; start the app with --plan-vlm", None,
                           HTTPStatus.NOT_FOUND)
        from ..data.plan import PlanConfig, plan_layout
        from ..data.vlm import make_backend
        text = body.get("text") if isinstance(body, dict) else None
        width, height = (body.get("width"), body.get("height")) if isinstance(body, dict) else (None, None)
        if self._planner is None:
            self._planner = make_backend(self.config.plan_vlm, self.config.plan_model, self.config.plan_base_url,
                                         self.config.plan_api_key_env, 60.0)
        try:
            config = PlanConfig(prompt=text, output=self.workdir / "plans" / f"{secrets.token_hex(8)}.json",
                                width=width, height=height)
            layout = plan_layout(config, backend=self._planner)
        except (LayoutError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, problem(exc)) from None
        return {"layout": layout_for_page(layout)}


class Handler(BaseHTTPRequestHandler):
    """The app's HTTP API and page; :func:`_handler` binds it to one :class:`App`."""

    app: App
    quiet: bool = True
    server_version = "eligen-ui"

    def log_message(self, format: str, *args: Any) -> None:
        if not self.quiet:
            super().log_message(format, *args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json")

    def _answer(self, work: Callable[[], Any]) -> None:
        try:
            self._json(HTTPStatus.OK, work())
        except RequestError as exc:
            self._json(exc.status, {"errors": exc.errors})
        except Exception as exc:  # the server stays up; the page shows what went wrong
            print(f"eligen ui: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"errors": [page_error(exc)]})

    def _body(self) -> bytes:
        """The request body, refused (413) above the upload cap before it is kept."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _refused("the request needs a Content-Length", None, HTTPStatus.LENGTH_REQUIRED) from None
        cap = self.app.config.max_upload_bytes
        if length > cap:
            if length <= DRAIN_FACTOR * cap:  # read and drop it, so the browser reads this answer
                remaining = length
                while remaining > 0:
                    remaining -= len(self.rfile.read(min(remaining, 2**20)) or b"\0" * remaining)
            else:
                self.close_connection = True
            raise _refused(f"the upload is {length / 2**20:.1f} MiB, above this app's limit of "
                           f"{cap / 2**20:g} MiB (--max-upload-mb)", "image", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(length)

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _refused(f"the request body is not JSON ({exc})") from None

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            self._send(HTTPStatus.OK, resources.files(__package__).joinpath("static", name).read_bytes(),
                       content_type)
        elif path == "/api/info":
            self._answer(self.app.info)
        elif status_match := JOB_STATUS.match(path):
            self._answer(lambda: self.app.status(status_match.group(1)))
        elif file_match := JOB_FILE.match(path):
            self._file(lambda: self.app.job_file(file_match.group(1), file_match.group(2)))
        elif match := UPLOAD_FILE.match(path):
            self._file(lambda: self.app.upload_file(match.group(1)))
        else:
            self._json(HTTPStatus.NOT_FOUND, {"errors": [{"message": "not found", "entity": None,
                                                          "field": None}]})

    def _file(self, locate: Callable[[], Path]) -> None:
        try:
            path = locate()
        except RequestError as exc:
            self._json(exc.status, {"errors": exc.errors})
            return
        content_type = "application/json" if path.suffix == ".json" else "image/png"
        self._send(HTTPStatus.OK, path.read_bytes(), content_type)

    def do_POST(self) -> None:
        routes = {"/api/check": lambda: self.app.check(self._json_body()),
                  "/api/jobs": lambda: self.app.submit(self._json_body()),
                  "/api/upload": lambda: self.app.upload(self._body()),
                  "/api/load": lambda: self.app.load(self._body()),
                  "/api/plan": lambda: self.app.plan(self._json_body())}
        route = routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._json(HTTPStatus.NOT_FOUND, {"errors": [{"message": "not found", "entity": None,
                                                          "field": None}]})
            return
        self._answer(route)


def _handler(app: App, quiet: bool) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (Handler,), {"app": app, "quiet": quiet})


def make_app(config: UIConfig, workdir: Path) -> App:
    """Load the model (its LoRAs: ``--lora``, else the model's own) and build the app around it."""
    device = resolve_device(config.device)
    dtype = config.dtype or default_dtype(device)
    loras = list(config.lora) or model_loras(config.model)
    pipe = load_pipeline(config.model, device, dtype, loras, [])
    pipe.set_progress_bar_config(disable=True)
    return App(config, pipe, workdir, device, dtype, loras)


def make_server(app: App) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((app.config.host, app.config.port), _handler(app, quiet=True))
    server.daemon_threads = True
    return server


def _cannot_listen(config: UIConfig, exc: OSError) -> ValueError:
    return ValueError(f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); choose another --port")


def check_port(config: UIConfig) -> None:
    """Bind the address once before the model loads (minutes for a large one), so a port in use or reserved for
    root fails at once."""
    import socket

    with socket.socket(ThreadingHTTPServer.address_family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((config.host, config.port))
        except OSError as exc:
            raise _cannot_listen(config, exc) from None


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(config: UIConfig) -> None:
    """Run the app until interrupted (Ctrl-C or SIGTERM); the temporary folder goes with it."""
    if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds like Ctrl-C, cleaning up
        signal.signal(signal.SIGTERM, _terminate)
    check_port(config)
    with tempfile.TemporaryDirectory(prefix="eligen-ui-") as workdir:
        print(f"loading {config.model} ...", file=sys.stderr)
        app = make_app(config, Path(workdir))
        try:
            server = make_server(app)
        except OSError as exc:
            raise _cannot_listen(config, exc) from None
        host, port = cast("tuple[str, int]", server.server_address[:2])  # a TCP server's (host, port)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"
        print(f"eligen ui: {url}  (Ctrl-C stops it)", flush=True)
        if config.open_browser:
            import webbrowser

            webbrowser.open(url)
        try:
            server.serve_forever(poll_interval=0.2)
        finally:
            app.jobs.close()
            server.server_close()

"""The web app's state and operations, free of any web framework (:mod:`eligen.ui.server` serves them): one
pipeline, one queue of jobs, the uploads and results in the app's own folder. Every layout goes through the CLI's
own code and renders with :func:`eligen.generate.render`, so a PNG from the app equals the CLI's and carries the
same record. Nothing a client sends is a path: uploads and results live under random ids, and every request is held
to the operator's limits (pixels, steps, entities, queue length)."""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..config import config_from_mapping
from ..entities import LayoutError, layout_to_dict
from ..families import edit_titles
from ..files import write_text_atomic
from ..generate import (
    EditConfig,
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
from .config import NATIVE_AREAS, UIConfig
from .jobs import Job, JobQueue, QueueFull
from .layouts import (
    EDIT_OPTIONS,
    MODE_PARAMS,
    PAGE_OPTIONS,
    Limits,
    check_page_layout,
    layout_for_page,
    layout_problems,
    preview,
    read_upload_record,
)
from .messages import label, page_problem, refusal
from .uploads import UploadError, UploadStore, decode_image, file_bytes

if TYPE_CHECKING:
    from ..data.vlm import VLMBackend

MODE_CONFIGS: dict[str, type[GenerateConfig]] = {"generate": GenerateConfig, "inpaint": InpaintConfig,
                                                "edit": EditConfig}  # what each of the page's modes runs
PLAN_MIN_SIDE = 16  # `eligen plan`'s smallest side
REQUEST_SLACK = 2**16  # a request body may be this much larger than the upload cap's base64 form (the JSON around it)


class RequestError(Exception):
    """A request the page must fix: ``status`` and the page's list of problems (all of them, not the first)."""

    def __init__(self, status: HTTPStatus, *errors: dict[str, Any]):
        super().__init__(errors[0]["message"] if errors else status.phrase)
        self.status, self.errors = status, list(errors)


def refused(message: str, field: str | None = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> RequestError:
    return RequestError(status, refusal(message, field))


def page_error(exc: Exception) -> dict[str, Any]:
    """A failed job as the page shows it; anything but a bad layout or option is an internal error."""
    if isinstance(exc, (LayoutError, ValueError)):
        return page_problem(exc)
    return {**refusal(f"internal error: {type(exc).__name__}: {exc}"), "internal": True}


def _merged(problems: list[dict[str, Any]], more: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``problems`` and those of ``more`` about a place (entity, field) ``problems`` does not name yet."""
    named = {(p["entity"], p["field"]) for p in problems}
    return problems + [p for p in more if (p["entity"], p["field"]) not in named]


@dataclasses.dataclass
class Submission:
    """A job request once every check has passed."""

    config: GenerateConfig
    layout: Any
    seed: int
    source: Path | None = None  # the image to inpaint or edit (copied into the job's folder when it is queued)
    source_name: str | None = None


class App:
    """The app's state: one pipeline, one queue, the uploads and results in ``workdir``."""

    def __init__(self, config: UIConfig, pipe, workdir: Path, device: str, dtype: str, loras: list[str]):
        self.config, self.pipe, self.workdir = config, pipe, workdir
        self.device, self.dtype, self.loras = device, dtype, loras
        self.defaults = pipeline_sampling_defaults(pipe)  # the page's defaults and what a job leaves out
        height, width = pipe.native_size()
        max_pixels = config.max_pixels or NATIVE_AREAS * width * height
        self.limits = Limits(max_pixels=max_pixels, max_entities=config.max_entities, loras=config.entity_loras)
        self.uploads = UploadStore(workdir / "uploads")
        self.jobs = JobQueue(on_error=page_error, on_forget=self._forget, max_waiting=config.max_queue)
        self._planner: VLMBackend | None = None
        # an edit model edits an input (the page's Edit mode); any other generates and inpaints (design section 15)
        self.modes = ("edit",) if "edit" in pipe.family.card.features else ("generate", "inpaint")

    @property
    def max_body_bytes(self) -> int:
        """The most a request body may hold: an upload at the cap, as base64 inside JSON."""
        return self.config.max_upload_bytes * 4 // 3 + REQUEST_SLACK

    @property
    def has_ip_adapter(self) -> bool:
        return self.config.ip_adapter is not None

    @property
    def has_controlnet(self) -> bool:
        """Whether the model runs a ControlNet (``--controlnet``, or a ControlNet pipeline's own folder)."""
        return "controlnet" in self.pipe.family.card.features

    # -- what the page reads first ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the page reads first: the model, its sizes, the limits, and the option schema it renders its
        controls from (each option's default is what a job that leaves it out runs)."""
        height, width = self.pipe.native_size()
        options = schema(EDIT_OPTIONS if "edit" in self.modes else PAGE_OPTIONS, self.defaults)
        return {
            "model": self.config.model, "family": self.pipe.family.card.title,
            "native_size": [width, height], "token_pixels": self.pipe.patch_grid,
            "options": options, "defaults": {option["name"]: option["default"] for option in options},
            "loras": [Path(lora).name or lora for lora in self.loras],
            "palette": [list(c) for c in PALETTE], "max_entities": self.limits.max_entities,
            "max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.limits.max_pixels,
            "max_steps": self.config.max_steps, "max_queue": self.config.max_queue,
            "plan": self.config.plan_vlm is not None, "ip_adapter": self.has_ip_adapter, "modes": list(self.modes),
            "entity_loras": list(self.limits.loras), "controlnet": self.has_controlnet,
        }

    def check(self, body: Any) -> dict[str, Any]:
        """The live preview: every problem the layout would meet, and each mask on the model's token grid."""
        layout = body.get("layout") if isinstance(body, dict) else None
        answer = preview(layout, self.limits, self.pipe)
        answer["errors"] = _merged(answer["errors"], self._reference_problems(layout))
        return answer

    # -- generation -------------------------------------------------------------------------------------------

    def submit(self, body: Any) -> dict[str, Any]:
        """Queue a job, or refuse it listing every problem (layout, options, the image to inpaint, limits)."""
        submission = self._checked(body)
        job = Job(task=lambda job: self._render(job, submission))
        job.steps = submission.config.steps or 0
        if submission.source is not None:  # the job's own copy: an upload may expire while it waits
            folder = self.workdir / "jobs" / job.id
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(submission.source, folder / "input.png")
            submission.config = dataclasses.replace(cast(InpaintConfig, submission.config), image=folder / "input.png")
        try:
            position = self.jobs.submit(job)
        except QueueFull as exc:
            self._forget(job)
            raise refused(str(exc), None, HTTPStatus.TOO_MANY_REQUESTS) from None
        return {"id": job.id, "position": position, "seed": submission.seed}

    def _checked(self, body: Any) -> Submission:
        if not isinstance(body, dict):
            raise refused("the request is a JSON object with 'layout', 'params' and 'mode'")
        mode = body.get("mode", self.modes[0])
        if mode not in MODE_CONFIGS:
            raise refused(f"mode must be one of {', '.join(MODE_CONFIGS)}, got {mode!r}", "mode")
        if mode not in self.modes:
            raise refused(self._mode_refusal(mode), "mode")
        params = body.get("params", {})
        if not isinstance(params, dict):
            raise refused("params is a JSON object", "params")
        config_class = MODE_CONFIGS[mode]
        server_side = self._server_side()
        problems = self._param_problems(config_class, params, server_side, mode)
        found = layout_problems(body.get("layout"), self.limits, self.pipe.entity_latent_masks)
        problems += _merged(found, self._reference_problems(body.get("layout")))
        source = None
        if mode != "generate":
            try:
                source = self._source(body.get("background"), mode)
            except RequestError as exc:
                problems += exc.errors
        if problems:
            raise RequestError(HTTPStatus.BAD_REQUEST, *problems)
        if source is not None:
            server_side["image"] = str(source[0])
        return self._resolved(config_class, params, server_side, body["layout"], source)

    def _mode_refusal(self, mode: str) -> str:
        """Why this app's model does not run ``mode``, and what to do instead."""
        title = self.pipe.family.card.title
        if mode == "edit":
            return (f"Mode: Edit needs an edit model ({edit_titles()}); this app serves {title}: use Generate or "
                    "Inpaint")
        return f"Mode: this app serves {title}, an edit model: use Edit (upload the image to edit)"

    def _server_side(self) -> dict[str, Any]:
        """What a job takes from the server, never from the page."""
        # the LoRAs as given (none: the model's own, which a record names by leaving them out, so it travels)
        return {"model": self.config.model, "lora": list(self.config.lora), "progress": False, "device": self.device,
                "dtype": self.dtype, "ip_adapter": self.config.ip_adapter, "ip_scale": self.config.ip_scale,
                "controlnet": self.config.controlnet}

    def _param_problems(self, config_class: type, params: dict, server_side: dict, mode: str) -> list[dict]:
        """Every option the page set that is unknown, of the wrong type, out of range or over this app's limits."""
        allowed = MODE_PARAMS[mode]
        problems = [refusal(f"{name!r} is not an option of {mode}", name) for name in sorted(set(params) - allowed)]
        for name in sorted(set(params) & allowed):
            try:
                config_from_mapping(config_class, {name: params[name]}, server_side)
            except ValueError as exc:
                problems.append(page_problem(exc, field=name))
        if "control_scale" in params and not self.has_controlnet:
            problems = [p for p in problems if p["field"] != "control_scale"]
            problems.append(refusal("Control scale: this app's model has no ControlNet; start the app with a "
                                    "ControlNet to use control images", "control_scale"))
        steps = params.get("steps")
        if isinstance(steps, int) and steps > self.config.max_steps:
            problems.append(refusal(f"Steps: {steps} is more than this app runs in one job (at most "
                                    f"{self.config.max_steps})", "steps"))
        return problems

    def _reference_problems(self, layout: Any) -> list[dict[str, Any]]:
        """Reference images in an app started without an IP-Adapter, control images on a model without a
        ControlNet, and a ControlNet's job without any control image."""
        if not isinstance(layout, dict):
            return []
        problems = []
        if not self.has_ip_adapter:
            problems += [page_problem(LayoutError("reference images need an IP-Adapter, and this app was started "
                                                  "without one", entity=i, field=f))
                         for i, f in _images_named(layout, "ip_adapter_image", "image")]
        controls = _images_named(layout, "control_image", "control_image")
        if not self.has_controlnet:
            problems += [page_problem(LayoutError(f"control images need a ControlNet, and this app's model "
                                                  f"({self.pipe.family.card.title}) has none; start the app with a "
                                                  "ControlNet to use them", entity=i, field=f)) for i, f in controls]
        elif not controls:
            problems.append(refusal("Control image: this app's model runs a ControlNet, which needs a control image; "
                                    "choose one for the whole picture or for an entity", "control_image"))
        return problems

    def _resolved(self, config_class: type, params: dict, server_side: dict, layout: Any,
                  source: tuple[Path, str] | None) -> Submission:
        try:
            config = config_from_mapping(config_class, params, server_side)
            config = dataclasses.replace(config, **resolve_sampling(config, self.defaults))
            resolved = resolve_layout(config, check_page_layout(layout, self.limits))
            self._check_size(resolved.width, resolved.height)
        except (LayoutError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, page_problem(exc)) from None
        if config.steps is not None and config.steps > self.config.max_steps:
            raise refused(f"Steps: the model's default of {config.steps} is more than this app runs in one job (at "
                          f"most {self.config.max_steps}); set fewer", "steps")
        seed = config.seed if config.seed is not None else resolved.seed
        seed = seed if seed is not None else secrets.randbelow(2**32)
        return Submission(config, resolved, seed, *(source or (None, None)))

    def _check_size(self, width: int, height: int) -> None:
        """Refuse up front a size this device cannot render (the pipelines' own memory check)."""
        import torch

        from ..pipelines.memory import check_memory

        if width * height > self.limits.max_pixels:
            raise LayoutError(f"{width}x{height} is above this app's limit of {self.limits.max_pixels} pixels",
                              field="width")
        device = torch.device(self.device)
        check_memory(self.pipe, 1, (height, width), device.type != "cuda", device)

    def _render(self, job: Job, submission: Submission) -> dict:
        def on_step_end(pipe, i, t, tensors):
            job.step = min(i + 1, job.steps)
            job.check_cancelled()
            return {}

        job.check_cancelled()
        config = submission.config
        set_lora_scales(self.pipe, len(self.loras), config.lora_scale)
        layout = fit_patch_grid(self.pipe, config, submission.layout)
        image, metadata = render(self.pipe, config, layout, submission.seed, self.device, self.dtype, on_step_end)
        if submission.source_name is not None:
            metadata["params"]["image"] = submission.source_name  # the user's name for it, never a server path
            metadata.get("inputs", {}).get("image", {})["path"] = submission.source_name
        folder = self.workdir / "jobs" / job.id
        job.files = {"image.png": folder / "image.png", "overlay.png": folder / "overlay.png",
                     "layout.json": folder / "layout.json"}
        save_png(image, job.files["image.png"], metadata)
        overlay = render_overlay(image, layout.masks(), [e.prompt for e in layout.entities])
        save_png(overlay, job.files["overlay.png"], metadata)
        write_text_atomic(job.files["layout.json"], json.dumps(layout_to_dict(layout), indent=2) + "\n")
        base = f"/api/jobs/{job.id}"
        return {"id": job.id, "seed": submission.seed, "width": layout.width, "height": layout.height,
                "image": f"{base}/image.png", "overlay": f"{base}/overlay.png", "layout": f"{base}/layout.json",
                "name": f"eligen_{submission.seed}.png", "overlay_name": f"eligen_{submission.seed}_overlay.png",
                "layout_name": f"eligen_{submission.seed}.json", "prompt": layout.prompt,
                "mode": metadata["command"]}

    def _source(self, reference: Any, mode: str = "inpaint") -> tuple[Path, str]:
        """An inpainting or edit input named by the page: an upload id or a finished job's image (never a path)."""
        if isinstance(reference, str) and reference.startswith("upload:"):
            path = self.uploads.get(reference.removeprefix("upload:"))
            if path is not None:
                return path, "uploaded image"
        if isinstance(reference, str) and reference.startswith("job:"):
            job = self.jobs.get(reference.removeprefix("job:"))
            if job is not None and job.state == "done":
                assert job.result is not None  # a done job holds its result
                return job.files["image.png"], f"result {job.result['name']}"
        raise refused(f"Image to {mode}: choose one (upload an image, or use a result as the background); an "
                      "upload is kept for an hour", "image")

    def status(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        return {"id": job.id, "state": job.state, "position": self.jobs.position(job), "step": job.step,
                "steps": job.steps, "result": job.result, "error": job.error}

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job now, a running one at its next step."""
        self.jobs.cancel(self._job(job_id))
        return self.status(job_id)

    def history(self) -> dict[str, Any]:
        """The results made since the app started, newest first."""
        return {"jobs": [job.result for job in reversed(self.jobs.finished())]}

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise refused("no such job (finished jobs are kept for a while, then forgotten)", None,
                          HTTPStatus.NOT_FOUND)
        return job

    def job_file(self, job_id: str, name: str) -> Path:
        job = self.jobs.get(job_id)
        if job is None or job.state != "done":
            raise refused("no such result", None, HTTPStatus.NOT_FOUND)
        return job.files[name]

    def _forget(self, job: Job) -> None:
        shutil.rmtree(self.workdir / "jobs" / job.id, ignore_errors=True)

    # -- files the page sends ---------------------------------------------------------------------------------

    def upload(self, body: Any) -> dict[str, Any]:
        """An input image to inpaint or edit (``{"name", "data"}``): decoded in memory under the caps, kept as an RGB
        PNG under a random id."""
        try:
            _, raw = file_bytes(body, self.config.max_upload_bytes)
            image = decode_image(raw, self.limits.max_pixels)
        except UploadError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, exc.problem) from None
        upload_id = self.uploads.add(image)
        return {"id": f"upload:{upload_id}", "width": image.width, "height": image.height,
                "url": f"/api/uploads/{upload_id}.png"}

    def upload_file(self, upload_id: str) -> Path:
        path = self.uploads.get(upload_id)
        if path is None:
            raise refused("no such upload", None, HTTPStatus.NOT_FOUND)
        return path

    def load(self, body: Any) -> dict[str, Any]:
        """A layout JSON or an eligen PNG (``{"name", "data"}``), to continue editing exactly where it was."""
        try:
            _, raw = file_bytes(body, self.config.max_upload_bytes)
            return read_upload_record(raw, self.limits)
        except UploadError as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, {**exc.problem, "field": "file"}) from None
        except (LayoutError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, page_problem(exc)) from None

    def plan(self, body: Any) -> dict[str, Any]:
        """`eligen plan` from the page: a description -> a layout to edit (only when a planner is configured)."""
        if self.config.plan_vlm is None:
            raise refused("no layout planner is configured; start the app with --plan-vlm", None,
                          HTTPStatus.NOT_FOUND)
        from ..data.plan import PlanConfig, plan_layout
        from ..data.vlm import make_backend

        text = body.get("text") if isinstance(body, dict) else None
        width, height = self._plan_size(body)
        if self._planner is None:
            self._planner = make_backend(self.config.plan_vlm, self.config.plan_model, self.config.plan_base_url,
                                         self.config.plan_api_key_env, 60.0)
        try:
            config = PlanConfig(prompt=text, output=self.workdir / "plans" / f"{secrets.token_hex(8)}.json",
                                width=width, height=height)
            layout = plan_layout(config, backend=self._planner)
        except (LayoutError, ValueError) as exc:
            raise RequestError(HTTPStatus.BAD_REQUEST, page_problem(exc)) from None
        return {"layout": layout_for_page(layout)}

    def _plan_size(self, body: Any) -> tuple[int, int]:
        """The planner's canvas: the page's width and height (the model's native size where left out), each a whole
        number of pixels, together within the pixel cap; refused before the planner is asked."""
        native_height, native_width = self.pipe.native_size()
        given = body if isinstance(body, dict) else {}
        size, problems = {"width": native_width, "height": native_height}, []
        for name in size:
            value = given.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < PLAN_MIN_SIDE:
                problems.append(refusal(f"{label(name)}: a whole number of pixels, at least {PLAN_MIN_SIDE}", name))
            else:
                size[name] = value
        width, height = size["width"], size["height"]
        if not problems and width * height > self.limits.max_pixels:
            problems.append(refusal(f"{width}x{height} is above this app's limit of {self.limits.max_pixels} pixels; "
                                    "choose a smaller size", "width"))
        if problems:
            raise RequestError(HTTPStatus.BAD_REQUEST, *problems)
        return width, height


def _images_named(layout: dict, whole: str, entity_field: str) -> list[tuple[int | None, str]]:
    """Where a page's layout carries an image: ``(None, whole)`` for the whole picture's, ``(i, entity_field)``
    for entity ``i``'s."""
    entities = layout.get("entities")
    entities = entities if isinstance(entities, list) else []
    named: list[tuple[int | None, str]] = [(None, whole)] if layout.get(whole) is not None else []
    return named + [(i, entity_field) for i, e in enumerate(entities)
                    if isinstance(e, dict) and e.get(entity_field) is not None]


def make_app(config: UIConfig, workdir: Path) -> App:
    """Load the model (its LoRAs: ``--lora``, else the model's own; its ControlNet) and build the app around it.
    The entity LoRAs offered are loaded now (inactive), so a file that is missing or of the wrong model is told at
    start."""
    device = resolve_device(config.device)
    dtype = config.dtype or default_dtype(device)
    loras = list(config.lora) or model_loras(config.model)
    pipe = load_pipeline(config.model, device, dtype, loras, [], config.ip_adapter, config.ip_scale,
                         config.controlnet)
    pipe.set_progress_bar_config(disable=True)
    preload_entity_loras(pipe, config.entity_loras)
    return App(config, pipe, workdir, device, dtype, loras)


def preload_entity_loras(pipe, offered: dict[str, str]) -> None:
    """Each offered entity LoRA loaded as an entity's would be (inactive, :func:`entity_adapters`); a problem is
    refused naming its ``--entity-lora``."""
    from types import SimpleNamespace

    from ..pipelines.entity_lora import entity_adapters

    for name, path in offered.items():
        try:
            entity_adapters(pipe, [SimpleNamespace(lora=path)])
        except LayoutError as exc:
            raise ValueError(f"--entity-lora {name}={path}: {exc.reason}") from None

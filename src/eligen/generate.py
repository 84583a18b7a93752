"""The main job: a layout in, a PNG out (with its layout and parameters in the PNG's metadata)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import secrets
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from . import __version__
from .choices import DTYPE_NAMES
from .config import option, torch_dtype
from .entities import Layout, LayoutError, layout_from_dict, layout_to_dict, load_layout
from .families import edit_titles, titles
from .files import atomic_path, file_sha256, open_image, read_utf8, write_text_atomic
from .models import HUB_ID, loading, model_loras, portable_name, resolve_file
from .options import (
    EditOptions,
    EntityOptions,
    InpaintOptions,
    SamplingOptions,
    check_lora_scales,
    check_scale,
    pipeline_sampling_defaults,
    resolve_sampling,
)
from .overlay import render_overlay

METADATA_KEY = "eligen"
# Fields that describe the output files or the run, not the image: never read back by --from.
RUN_ONLY_FIELDS = ("layout", "output", "from_png", "overlay", "progress", "device", "attention", "compile",
                   "num_images", "prompt", "negative_prompt", "ip_image", "control_image")  # the last four: layout
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # PNG carries the record inside
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64


@dataclass
class GenerateConfig(SamplingOptions, EntityOptions):
    """Everything `eligen generate` reads. The CLI flags are built from these fields; the sampling options left unset
    are the model's (:func:`eligen.options.resolve_sampling`), and the record stores what ran."""

    layout: Path | None = option(None, "layout JSON file (prompt, width, height, entities)", positional=True)
    output: Path | None = option(None, "output image path: .png (the layout and parameters inside), .jpg or .webp "
                                 "(with them in OUT.jpg.json)", short="-o", flag="--output", metavar="OUT.png")
    from_png: Path | None = option(None, "reproduce the generation recorded in a PNG, in a JPEG/WebP's sidecar "
                                   "(OUT.jpg.json, or the image itself) or start from a layout JSON (other flags "
                                   "override it)", flag="--from", metavar="PNG|JSON")
    model: str | None = option("eligen-tiny", f"diffusers pipeline directory or hub id of any family eligen runs "
                               f"({titles()}; the family is read from its model_index.json); eligen-tiny is the small "
                               "shapes-world model shipped in the package (its own defaults: 20 steps, 32-token "
                               "prompts, its EliGen LoRA)")
    lora: list[str] = option([], "LoRA file, folder or hub id in DiffSynth, kohya or diffusers format (repeat to "
                             "stack)", repeat=True, metavar="PATH")
    lora_scale: list[float] = option([], "weight of the matching --lora, in order (default 1.0 each)", repeat=True,
                                     metavar="S")
    seed: int | None = option(None, "random seed (default: the layout's seed, else a random one, printed; always "
                              "recorded)")
    num_images: int = option(1, "images to render, with seeds seed, seed + 1, ...; OUT.png becomes OUT_0.png, "
                             "OUT_1.png, ...")
    prompt: str | None = option(None, "global prompt (replaces the layout's)")
    negative_prompt: str | None = option(None, "negative prompt (replaces the layout's)")
    height: int | None = option(None, "output height in pixels (default: the layout's; boxes and polygons scale)")
    width: int | None = option(None, "output width in pixels (default: the layout's; boxes and polygons scale)")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str | None = option(None, "weights dtype (default: bfloat16 on cuda, float32 elsewhere)",
                               choices=DTYPE_NAMES)
    overlay: bool = option(False, "also write OUT_overlay.png: every entity mask tinted and labelled")
    progress: bool = option(True, "show a progress bar")
    ip_adapter: str | None = option(None, "IP-Adapter of the model's family, where diffusers has one (XLabs or "
                                    "diffusers format): a .safetensors file, a folder holding one (its image_encoder/ "
                                    "subfolder is the CLIP encoder, else openai/clip-vit-large-patch14) or a hub id; "
                                    "reference images set the style", metavar="PATH_OR_ID")
    ip_image: Path | None = option(None, "global reference image for --ip-adapter (replaces the layout's "
                                   "ip_adapter_image; entities may carry their own 'image')", metavar="PATH")
    ip_scale: float = option(1.0, "IP-Adapter scale in every double-stream block")
    controlnet: str | None = option(None, "ControlNet of the model's family, where eligen runs one (a diffusers "
                                    "ControlNet folder or hub id): the layout's control_image (or --control-image) "
                                    "conditions the whole image, an entity's control_image only the region its mask "
                                    "covers", metavar="PATH_OR_ID")
    control_image: Path | None = option(None, "global control image for --controlnet (replaces the layout's "
                                        "control_image; entities may carry their own)", metavar="PATH")
    control_scale: float = option(1.0, "ControlNet conditioning scale of the global control image (an entity's is "
                                  "its control_scale)")

    def __post_init__(self) -> None:
        SamplingOptions.__post_init__(self)
        EntityOptions.__post_init__(self)
        for name in ("layout", "output", "from_png", "ip_image", "control_image"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        if self.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {self.num_images}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"--seed must be in 0..2**64 - 1, got {self.seed}")
        if self.output is not None and self.output.is_dir():
            raise ValueError(f"--output {self.output} is a folder; give a file name, e.g. {self.output / 'out.png'}")
        if self.output is not None and self.output.suffix.lower() not in IMAGE_FORMATS:
            raise ValueError(f"--output {self.output}: the extension names the format; use one of "
                             f"{', '.join(IMAGE_FORMATS)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} must be a positive number of pixels, got {value}")
        check_lora_scales(self.lora_scale, self.lora or model_loras(self.model))  # the model's own LoRA counts
        check_scale("--ip-scale", self.ip_scale, 0)
        check_scale("--control-scale", self.control_scale, 0)
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")

    def recorded(self) -> dict[str, Any]:
        """The parameters stored in the PNG (everything that shapes the image), in names that resolve on another
        machine: the shipped model and its files by name (:func:`eligen.models.portable_name`)."""
        params = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items() if k not in RUN_ONLY_FIELDS}
        params["model"] = portable_name(params["model"])
        params["lora"] = [portable_name(lora) for lora in params["lora"]]
        return params

    def inputs(self) -> dict[str, Any]:
        """The input files the record names by content (none for text-to-image)."""
        return {}

    def inputs_of(self) -> list[Path]:
        """The files this run reads, which no output may replace."""
        return [p for p in (self.layout, self.from_png, self.ip_image, self.control_image) if p is not None]

    def input_size(self) -> tuple[int, int] | None:
        """``(width, height)`` of an input image the layout must fit (None: text-to-image)."""
        return None

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Arguments for the pipeline call beyond the layout's (none for text-to-image)."""
        return {}


@dataclass
class InpaintConfig(GenerateConfig, InpaintOptions):
    """`eligen inpaint`: everything `eligen generate` reads, plus the input image and the fusion options."""

    image: Path | None = option(None, "input image to repaint (RGB, L, opaque RGBA, 16-bit; any size)",
                                positional=True, order=-1)

    def __post_init__(self) -> None:
        super().__post_init__()
        InpaintOptions.__post_init__(self)
        if self.image is not None and not isinstance(self.image, Path):
            self.image = Path(self.image)

    def input_size(self) -> tuple[int, int] | None:
        if self.image is None:
            raise ValueError("give the input image: eligen inpaint INPUT.png LAYOUT.json -o OUT.png")
        return open_image(self.image, "input image").size  # decoded once here: a bad file fails before the model

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"image": self.image, "inpaint": True, **InpaintOptions.pipeline_kwargs(self)}

    def inputs(self) -> dict[str, Any]:
        """The input image by its name and content hash: `--from` finds it anywhere (:func:`locate_input`)."""
        if self.image is None or not self.image.is_file():
            return {}
        return {"image": {"path": str(self.image), "sha256": file_sha256(self.image)}}

    def inputs_of(self) -> list[Path]:
        return [*super().inputs_of(), *([self.image] if self.image is not None else [])]


@dataclass
class EditConfig(InpaintConfig, EditOptions):
    """`eligen edit`: an input image edited by an edit model (a card with the "edit" feature), the layout's global
    prompt the overall instruction and each entity a local instruction with its region (docs/design.md section
    21); its own options are :class:`~eligen.options.EditOptions` (the web app's controls come from them too)."""

    def input_size(self) -> tuple[int, int] | None:
        if self.image is None:
            raise ValueError("give the input image: eligen edit INPUT.png LAYOUT.json -o OUT.png")
        return open_image(self.image, "input image").size

    def pipeline_kwargs(self) -> dict[str, Any]:
        from .inpaint import to_rgb_array

        assert self.image is not None  # input_size ran first
        return {"image": Image.fromarray(to_rgb_array(self.image)[0]), "keep_outside": self.keep_outside,
                **InpaintOptions.pipeline_kwargs(self)}

    def sizing(self, pipe, layout: Layout) -> dict[str, Any]:
        """The size arguments the edit pipeline takes: the output at the layout's size where the pipeline would
        render about 1024x1024 (``max_area``), and ``auto_resize`` where it resizes the input itself."""
        accepted = inspect.signature(pipe.__call__).parameters
        sizing = {"max_area": layout.width * layout.height, "_auto_resize": self.auto_resize}
        return {name: value for name, value in sizing.items() if name in accepted}


def command_of(config: GenerateConfig) -> str:
    """The command a config belongs to (recorded in the PNG, so --from names it)."""
    return "edit" if isinstance(config, EditConfig) else "inpaint" if isinstance(config, InpaintConfig) else "generate"


@dataclass
class GenerateResult:
    image: Image.Image
    path: Path
    overlay_path: Path | None
    metadata: dict[str, Any]


def resolve_device(name: str | None) -> str:
    """``--device`` checked before anything loads: a torch device that exists here (default: cuda if any)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        built = "with" if torch.version.cuda else "without"
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device here (torch {torch.__version__}, built {built} CUDA); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (0.."
                             f"{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: no Apple MPS device here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: eligen runs on cpu, cuda or mps")
    return name


def default_dtype(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


def overlay_path_for(path: Path) -> Path:
    return path.with_name(f"{path.stem}_overlay.png")


def sidecar_path(path: Path) -> Path:
    """Where the record of an image whose format cannot carry it goes: ``OUT.jpg`` -> ``OUT.jpg.json`` (never the
    ``OUT.json`` a layout file may be called)."""
    return path.with_name(path.name + ".json")


def output_paths(output: Path, count: int) -> list[Path]:
    """``OUT.png`` for one image, ``OUT_0.png``, ``OUT_1.png``, ... for several."""
    return [output] if count == 1 else [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The eligen record of an image: inside a PNG (:func:`save_png`), else in its ``.json`` sidecar; a record file
    itself (the sidecar, a ``.json``) is read as it is."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _as_record(_read_json(path), path)
    if suffix in IMAGE_FORMATS and IMAGE_FORMATS[suffix] != "PNG":
        legacy = path.with_suffix(".json")  # where records were written before OUT.jpg.json
        sidecar = next((p for p in (sidecar_path(path), legacy) if p.is_file()), None)
        if sidecar is None:
            raise ValueError(f"{path} has no record beside it ({sidecar_path(path).name} is missing)")
        return _as_record(_read_json(sidecar), sidecar)
    try:
        with Image.open(path) as image:
            text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as a PNG: {exc}") from exc
    if text is None:
        raise ValueError(f"{path} carries no eligen metadata (was it written by `eligen generate`?)")
    try:
        return _as_record(json.loads(text), path)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its eligen metadata is not JSON ({exc})") from exc


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        return json.loads(read_utf8(path, "record"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None


def _as_record(record: Any, path: Path | str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: its eligen metadata is not a record (a JSON object)")
    return record


def checked_record(record: Any, path: Path | str) -> dict[str, Any]:
    """A generation record with the parts ``--from`` reads: a ``layout`` and a ``params`` mapping (their fields
    are checked where they are read, naming each). ``path`` names the record's source in the messages."""
    record = _as_record(record, path)
    for part in ("layout", "params"):
        if not isinstance(record.get(part), dict):
            raise ValueError(f"{path}: its eligen metadata has no '{part}' object; it cannot be reproduced")
    return record


def from_source(command: str, source: Path, given: dict[str, Any]) -> tuple[dict | None, dict[str, Any], dict]:
    """What ``eligen <command> --from SOURCE`` starts from: ``(stored layout, stored parameters, given flags)``.
    SOURCE is a PNG carrying its record, a JPEG/WebP with its sidecar, a record file (the sidecar itself) or a
    layout JSON (read as if given as the layout). An inpainting record's input image is found by its content
    (:func:`locate_input`) unless the command names one."""
    if given.get("layout") is not None:
        raise ValueError("give either a layout file or --from PNG, not both")
    record = read_metadata(source)
    if source.suffix.lower() == ".json" and "params" not in record:  # a layout file, not a record
        return None, {}, {**given, "layout": source}
    record = checked_record(record, source)
    made_by = record.get("command", "generate")
    if made_by not in ("generate", "inpaint", "edit"):
        raise ValueError(f"{source}: its record names no eligen command ({made_by!r})")
    if made_by != command:
        raise ValueError(f"{source} was made by `eligen {made_by}`; reproduce it with `eligen {made_by} --from`")
    params = dict(record["params"])
    if command in ("inpaint", "edit") and given.get("image") is None and isinstance(params.get("image"), str):
        inputs = record.get("inputs")
        entry = inputs.get("image") if isinstance(inputs, dict) else None
        params["image"] = str(locate_input(entry, params["image"], source, command))
    return record["layout"], params, given


def locate_input(entry: Any, recorded: str, source: Path, command: str = "inpaint") -> Path:
    """The input image a record was made from: the recorded path, else a file of that name beside the record, if
    its SHA-256 is the recorded one (a record without one: the recorded path). Refused naming the file."""
    digest = entry.get("sha256") if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) else None
    name = Path(recorded)
    candidates = list(dict.fromkeys([name, source.parent / name, source.parent / name.name]))
    for candidate in candidates:
        if candidate.is_file() and (digest is None or file_sha256(candidate) == digest):
            return candidate
    other = [str(c) for c in candidates if c.is_file()]
    what = f"{name.name} (sha256 {digest[:16]}...)" if digest else str(name)
    found = f"; {', '.join(other)} holds another image" if other else ""
    raise ValueError(f"{source} was made from the input image {what}, which is not at {name} nor beside "
                     f"{source.name}{found}; give it: eligen {command} IMAGE --from {source} -o OUT.png")


def save_image(image: Image.Image, path: Path, metadata: dict[str, Any]) -> None:
    """Save in the format the extension names; the record goes inside a PNG, else into a ``.json`` beside it."""
    image_format = IMAGE_FORMATS.get(path.suffix.lower(), "PNG")
    if image_format == "PNG":
        save_png(image, path, metadata)
        return
    with atomic_path(path) as tmp:  # both written before either replaces its old file
        image.convert("RGB").save(tmp, format=image_format, quality=95)
        write_text_atomic(sidecar_path(path), json.dumps(metadata, indent=1) + "\n")


def save_png(image: Image.Image, path: Path, metadata: dict[str, Any]) -> None:
    """Write ``image`` with ``metadata`` as iTXt, atomically (temp file + rename), creating parent folders."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(metadata, separators=(",", ":")))
    info.add_text("Software", f"eligen {__version__}")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def resolve_layout(config: GenerateConfig, stored_layout: dict[str, Any] | None = None) -> Layout:
    """The layout to render: from the file or the stored record, fitted to the input image and the size flags.

    For inpainting the layout's width/height default to the input image's size; a layout drawn at another
    size of the same aspect ratio is scaled to it, any other mismatch is an error.
    """
    input_size = config.input_size()
    if stored_layout is not None:
        layout = layout_from_dict(stored_layout, default_size=input_size)
    elif config.layout is not None:
        layout = load_layout(config.layout, default_size=input_size)
    else:
        raise ValueError("give a layout JSON file or --from PNG")
    if input_size is not None and input_size != (layout.width, layout.height):
        (in_w, in_h), ratio = input_size, layout.height / layout.width
        if abs(in_h / in_w - ratio) > 0.01 * ratio:
            raise ValueError(f"the layout is {layout.width}x{layout.height} but the input image is {in_w}x{in_h}, "
                             "another aspect ratio: draw the layout at the image's size (or leave width/height out)")
        print(f"note: layout scaled from {layout.width}x{layout.height} to the input's {in_w}x{in_h}",
              file=sys.stderr)
        layout = layout.resized(in_w, in_h)
        layout.validate()
    if config.prompt is not None or config.negative_prompt is not None:
        layout = dataclasses.replace(layout, prompt=config.prompt if config.prompt is not None else layout.prompt,
                                     negative_prompt=config.negative_prompt if config.negative_prompt is not None
                                     else layout.negative_prompt)
        layout.validate()
    width, height = config.width or layout.width, config.height or layout.height
    if (width, height) != (layout.width, layout.height):
        layout = layout.resized(width, height)
        layout.validate()
    if config.ip_image is not None:  # recorded inside the layout, so --from needs no file
        layout = dataclasses.replace(layout, ip_adapter_image=str(config.ip_image))
        layout.validate()
    return check_controls(config, check_image_prompts(config, layout))


def check_image_prompts(config: GenerateConfig, layout: Layout) -> Layout:
    """Reference images need an IP-Adapter."""
    if config.ip_adapter is None:
        for i, entity in enumerate(layout.entities):
            if entity.image is not None:
                raise LayoutError("a reference image needs an IP-Adapter: pass --ip-adapter PATH_OR_ID", entity=i,
                                  field="image")
        if layout.ip_adapter_image is not None:
            raise ValueError("the layout's ip_adapter_image (or --ip-image) needs an IP-Adapter: pass --ip-adapter "
                             "PATH_OR_ID")
    return layout


def check_controls(config: GenerateConfig, layout: Layout) -> Layout:
    """``--control-image`` goes into the layout (so ``--from`` needs no file); control images need a ControlNet and
    a ControlNet needs a control image."""
    if config.control_image is not None:
        layout = dataclasses.replace(layout, control_image=str(config.control_image))
        layout.validate()
    controlled = [i for i, e in enumerate(layout.entities) if e.control_image is not None]
    controls = bool(controlled) or layout.control_image is not None
    if config.controlnet is not None and not controls:
        raise ValueError("--controlnet needs a control image: pass --control-image IMG, or give the layout (or an "
                         "entity) a control_image")
    if controls and config.controlnet is None and not saved_with_controlnet(config.model):
        if controlled:
            raise LayoutError("a control image needs a ControlNet: pass --controlnet PATH_OR_ID", entity=controlled[0],
                              field="control_image")
        raise ValueError("the layout's control_image (or --control-image) needs a ControlNet: pass --controlnet "
                         "PATH_OR_ID")
    return layout


def saved_with_controlnet(model: str | None) -> bool:
    """Whether the model is a ControlNet pipeline's folder (saved with its ControlNet)."""
    from .families import model_card

    return model is not None and "controlnet" in model_card(model).features


def load_pipeline(model: str, device: str, dtype: str, loras: list[str], scales: list[float],
                  ip_adapter: str | None = None, ip_scale: float = 1.0, controlnet: str | None = None):
    """The EliGen pipeline of the model's family on ``device`` in ``dtype`` (with ``controlnet``: its ControlNet
    pipeline), with the LoRAs stacked at ``scales`` and, if given, an IP-Adapter at ``ip_scale``."""
    from .pipelines import load_eligen_pipeline

    pipe = load_eligen_pipeline(model, controlnet, dtype=torch_dtype(dtype),
                                load_default_lora=False)  # the LoRAs are ours
    pipe.to(device)
    for i, lora in enumerate(loras):
        pipe.load_eligen_lora(lora, adapter_name=f"lora_{i}")
    set_lora_scales(pipe, len(loras), scales)
    if ip_adapter is not None:
        if "ip_adapter" not in pipe.family.card.features:
            raise ValueError(f"--ip-adapter: {model} is a {pipe.family.card.title} model, and diffusers has no "
                             "IP-Adapter for that family")
        check_ip_adapter_file(ip_adapter)
        encoder = [] if (Path(ip_adapter).parent / "image_encoder").is_dir() else ["openai/clip-vit-large-patch14"]
        with loading("the IP-Adapter (or its CLIP image encoder)", ip_adapter, *encoder):
            pipe.load_eligen_ip_adapter(ip_adapter, scale=ip_scale)
    return pipe


def check_ip_adapter_file(path: str) -> None:
    """A local ``--ip-adapter`` file whose tensors hold no image-prompt branch (a LoRA, say) is refused by name
    before anything else loads."""
    file = Path(path)
    if not (file.is_file() and file.suffix == ".safetensors"):
        return
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:
        raise ValueError(f"--ip-adapter {file} is not a readable .safetensors file ({exc})") from None
    if not any("ip_adapter" in key or key.startswith("image_proj") for key in keys):
        raise ValueError(f"--ip-adapter {file} is not an IP-Adapter: none of its {len(keys)} tensors belongs to an "
                         f"image-prompt branch (e.g. {keys[0] if keys else 'none'}); a LoRA goes to --lora")


def set_lora_scales(pipe, count: int, scales: list[float]) -> None:
    """The stacked LoRAs of :func:`load_pipeline` (``lora_0 .. lora_{count-1}``) at ``scales`` (1.0 where none)."""
    if count:
        pipe.set_adapters([f"lora_{i}" for i in range(count)], [*scales, *[1.0] * (count - len(scales))])


def fit_patch_grid(pipe, config: GenerateConfig, layout: Layout) -> Layout:
    """A text-to-image layout off the model's patch grid, rounded down to it (said, and recorded as rendered);
    inpainting keeps the input's size (the pipeline restores it)."""
    grid = pipe.patch_grid
    if isinstance(config, InpaintConfig) or not (layout.width % grid or layout.height % grid):
        return layout
    width, height = max(grid, layout.width // grid * grid), max(grid, layout.height // grid * grid)
    print(f"note: {layout.width}x{layout.height} is off the model's {grid}-pixel patch grid; rendering and "
          f"recording {width}x{height}", file=sys.stderr)
    layout = layout.resized(width, height)
    layout.validate()
    return layout


def render(pipe, config: GenerateConfig, layout: Layout, seed: int, device: str, dtype: str,
           callback_on_step_end=None) -> tuple[Image.Image, dict[str, Any]]:
    """One image of ``layout`` with ``config``'s parameters and ``seed``, and the record stored with it (the CLI and
    the web app both render through here). ``callback_on_step_end`` is diffusers' step callback. Sampling options
    left unset are the model's (:func:`eligen.options.resolve_sampling`); the record holds what ran."""
    import torch

    config = dataclasses.replace(config, **resolve_sampling(config, pipeline_sampling_defaults(pipe)))
    assert config.true_cfg is not None  # resolve_sampling fills every sampling option
    negative = layout.negative_prompt
    if negative is None and config.true_cfg > 1:
        negative = ""
    sizing = config.sizing(pipe, layout) if isinstance(config, EditConfig) else {}
    image = pipe(
        **sizing,
        prompt=layout.prompt,
        negative_prompt=negative,
        entities=layout.entities,
        height=layout.height,
        width=layout.width,
        num_inference_steps=config.steps,
        true_cfg_scale=config.true_cfg,
        cfg_mode=config.cfg_mode,
        guidance_scale=config.guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=config.max_sequence_length,
        entities_on_negative=config.entities_on_negative,
        entity_tokens=config.entity_tokens,
        attention=config.attention,
        compile=config.compile,
        output_type="pil",
        callback_on_step_end=callback_on_step_end,
        **({} if layout.ip_adapter_image is None else {"ip_adapter_image": layout.ip_adapter_image}),
        **control_kwargs(config, layout),
        **config.pipeline_kwargs(),
    ).images[0]
    params = {**config.recorded(), "seed": seed, "dtype": dtype, "height": layout.height, "width": layout.width}
    metadata = {
        "version": __version__,
        "command": command_of(config),
        "layout": recorded_layout(layout),
        "params": params,
        **({"inputs": inputs} if (inputs := config.inputs()) else {}),
        "environment": {"device": device, "torch": torch.__version__, "attention": config.attention,
                        "compile": config.compile},
    }
    return image, metadata


def control_kwargs(config: GenerateConfig, layout: Layout) -> dict[str, Any]:
    """The ControlNet arguments of a call: the global control image (decoded) at ``--control-scale``."""
    if layout.control_image is None and config.controlnet is None:
        return {}
    from .entities import load_reference_image

    image = None if layout.control_image is None else load_reference_image(layout.control_image,
                                                                           field="control_image")
    return {"control_image": image, "controlnet_conditioning_scale": config.control_scale}


def check_entity_loras(layout: Layout) -> None:
    """Before the model loads: every entity LoRA is a file or folder that exists, or a hub id (a fresh pipeline has
    no adapter an entity could name)."""
    for i, entity in enumerate(layout.entities):
        lora = entity.lora
        if lora is None or Path(resolve_file(str(lora))).exists() or HUB_ID.fullmatch(str(lora)):
            continue
        raise LayoutError(f"LoRA not found: {lora} is neither a file, a folder nor a hub id; paths in a layout file "
                          "are relative to that file", entity=i, field="lora")


def recorded_layout(layout: Layout) -> dict[str, Any]:
    """The layout as a record stores it: masks inline, an entity's LoRA named as a global one is (the shipped
    model's files by the name that resolves in any clone)."""
    data = layout_to_dict(layout, embed_masks=True)
    for entity in data["entities"]:
        if "lora" in entity:
            entity["lora"] = portable_name(entity["lora"])
    return data


def written_paths(config: GenerateConfig, paths: list[Path]) -> list[Path]:
    """Every file a run writes: the images, their sidecar records (JPEG, WebP) and overlays."""
    sidecars = [sidecar_path(p) for p in paths if IMAGE_FORMATS[p.suffix.lower()] != "PNG"]
    return [*paths, *sidecars, *([overlay_path_for(p) for p in paths] if config.overlay else [])]


def check_outputs(config: GenerateConfig, paths: list[Path]) -> None:
    """Before the model loads: no output is a folder, and none replaces a file the run reads."""
    inputs = {p.resolve(): p for p in config.inputs_of() if p.exists()}
    for path in written_paths(config, paths):
        if path.is_dir():
            raise ValueError(f"the output {path} is a folder; give a file name")
        if path.resolve() in inputs:
            raise ValueError(f"the output {path} would replace the input {inputs[path.resolve()]}; choose another "
                             "output name")


def check_command(pipe, config: GenerateConfig) -> None:
    """An edit model runs `eligen edit` alone and `eligen edit` runs only on one: without an input image one edit
    pipeline cannot render and another renders at its own size whatever the layout's, and none takes an inpainting
    call (docs/design.md section 15)."""
    card, command = pipe.family.card, command_of(config)
    if command == "edit" and "edit" not in card.features:
        raise ValueError(f"eligen edit: {config.model} is a {card.title} model, not an edit model; give an edit "
                         f"model ({edit_titles()}) or use eligen inpaint")
    if command != "edit" and "edit" in card.features:
        raise ValueError(f"eligen {command}: {config.model} is a {card.title} model, an edit model; edit with it "
                         "(eligen edit INPUT.png LAYOUT.json -o OUT.png) or give its base model")


def generate(config: GenerateConfig, stored_layout: dict[str, Any] | None = None) -> list[GenerateResult]:
    """Render a layout to ``config.output`` (``num_images`` of them, and overlays), recording layout and parameters
    in each image. Everything about the outputs is checked before the model loads, so no result is lost."""
    if config.output is None:
        raise ValueError("give an output path with -o OUT.png")
    if not config.model:
        raise ValueError(f"give a model with --model (a diffusers {titles()} directory or hub id)")
    layout = resolve_layout(config, stored_layout)
    check_entity_loras(layout)
    paths = output_paths(config.output, config.num_images)
    check_outputs(config, paths)
    seed = config.seed if config.seed is not None else layout.seed
    if seed is None:
        seed = secrets.randbelow(2**32)
        print(f"seed: {seed} (random; --seed {seed} renders it again)", file=sys.stderr)
    device = resolve_device(config.device)
    dtype = config.dtype or default_dtype(device)
    pipe = load_pipeline(config.model, device, dtype, config.lora or model_loras(config.model), config.lora_scale,
                         config.ip_adapter, config.ip_scale, config.controlnet)
    pipe.set_progress_bar_config(disable=not config.progress)
    check_command(pipe, config)
    layout = fit_patch_grid(pipe, config, layout)
    results = []
    for index, path in enumerate(paths):
        image, metadata = render(pipe, config, layout, (seed + index) % SEED_LIMIT, device, dtype)
        save_image(image, path, metadata)
        overlay_path = None
        if config.overlay:
            overlay_path = overlay_path_for(path)
            overlay = render_overlay(image, layout.masks(), [e.prompt for e in layout.entities])
            save_png(overlay, overlay_path, metadata)
        results.append(GenerateResult(image=image, path=path, overlay_path=overlay_path, metadata=metadata))
    return results

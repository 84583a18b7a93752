"""What `eligen ui` reads (torch-free: `eligen ui --help` and bad flags never load a model)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..choices import DTYPE_NAMES
from ..config import option
from ..data.vlm import VLM_KINDS
from ..families import titles

MAX_ENTITIES = 16  # the reference app has 8 brush layers; the regional mask has no limit of its own
NATIVE_AREAS = 16  # the default pixel cap: this many times the model's native image area
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # an offered entity LoRA's name, as the page shows it


def require_ui_extra() -> None:
    """The web app runs on Starlette and uvicorn (the ``ui`` extra): say how to get them when they are missing."""
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"eligen ui needs {' and '.join(missing)}: pip install 'eligen[ui]'")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class UIConfig:
    """Everything `eligen ui` reads. The CLI flags are built from these fields."""

    model: str = option("eligen-tiny", f"diffusers {titles()} pipeline directory or hub id; eligen-tiny "
                        "is the small shapes-world model shipped in the package (runs on a CPU)")
    lora: list[str] = option([], "LoRA file, folder or hub id (repeat to stack; default: the model's own EliGen "
                             "LoRA if it declares one); each gets a scale in the page", repeat=True, metavar="PATH")
    host: str = option("127.0.0.1", "address to listen on (loopback by default: only this machine can connect; "
                       "0.0.0.0 or :: opens the app to your network, behind an access key printed at start)")
    allowed_host: list[str] = option([], "a further name the page may be reached by (the Host header; repeat for "
                                     "more), e.g. a DNS name of this machine; requests naming any other host are "
                                     "refused", repeat=True, metavar="NAME")
    port: int = option(7860, "port to listen on (0: any free port; the address is printed)")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str | None = option(None, "weights dtype (default: bfloat16 on cuda, float32 elsewhere)",
                               choices=DTYPE_NAMES)
    ip_adapter: str | None = option(None, "IP-Adapter of the model's family, where diffusers has one: the page then "
                                    "offers a reference image per entity and for the whole image", metavar="PATH")
    ip_scale: float = option(1.0, "IP-Adapter scale of every double-stream block")
    entity_lora: list[str] = option([], "a LoRA the page offers per entity, as NAME=PATH (a LoRA file, folder or hub "
                                    "id; repeat for more): each entity may choose one by NAME, with a scale; the "
                                    "page never names a file", repeat=True, metavar="NAME=PATH")
    controlnet: str | None = option(None, "ControlNet of the model's family, where eligen runs one (a diffusers "
                                    "ControlNet folder or hub id, as for eligen generate): the page then offers a "
                                    "control image for the whole picture and per entity", metavar="PATH_OR_ID")
    max_upload_mb: float = option(20.0, "largest request or upload (an input image, a layout or PNG to load) in MiB")
    max_pixels: int | None = option(None, "largest image in pixels: a layout's width x height, an upload, a mask or "
                                    f"a reference image (default: {NATIVE_AREAS}x the model's native image area)")
    max_steps: int = option(200, "most denoising steps one job may ask for")
    max_entities: int = option(MAX_ENTITIES, "most entities one layout may have")
    max_queue: int = option(16, "most jobs waiting behind the running one; more are refused until one finishes")
    plan_vlm: str | None = option(None, "show the layout planner: the grounding MLLM backend `eligen plan` uses "
                                  "(openai or transformers); hidden when not given", choices=VLM_KINDS)
    plan_model: str | None = option(None, "the planner's model (server model name, or a local path for "
                                    "transformers)")
    plan_base_url: str | None = option(None, "the planner's OpenAI-compatible endpoint, e.g. "
                                       "http://127.0.0.1:8000/v1")
    plan_api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the planner's API key")
    open_browser: bool = option(False, "open the app in the default web browser once it is ready")

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError("--host must be an address such as 127.0.0.1 or 0.0.0.0")
        if self.host != "localhost":
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                raise ValueError(f"--host {self.host}: not an IP address; use 127.0.0.1 (this machine only), "
                                 "0.0.0.0 (every interface) or one of this machine's addresses") from None
        for name in self.allowed_host:
            if not name or (any(c in name for c in "/:@ ") and not _is_ipv6(name)):
                raise ValueError(f"--allowed-host {name!r}: give a host name or address, without a port or scheme")
        offered_loras(self.entity_lora)  # each NAME=PATH well formed, the names distinct
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"--max-upload-mb must be > 0, got {self.max_upload_mb}")
        if self.max_pixels is not None and self.max_pixels < 64 * 64:
            raise ValueError(f"--max-pixels must be at least 4096 (64x64), got {self.max_pixels}")
        for name in ("max_steps", "max_entities", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")
        if self.plan_vlm is not None and self.plan_vlm not in VLM_KINDS:
            raise ValueError(f"--plan-vlm must be one of {VLM_KINDS}, got {self.plan_vlm!r}")
        if self.plan_vlm == "openai" and not (self.plan_base_url and self.plan_model):
            raise ValueError("--plan-vlm openai needs --plan-base-url (the server's /v1 address) and --plan-model "
                             "(the model name it serves)")
        if self.plan_vlm == "transformers" and not self.plan_model:
            raise ValueError("--plan-vlm transformers needs --plan-model (a local Qwen2-VL / Qwen2.5-VL)")

    @property
    def entity_loras(self) -> dict[str, str]:
        """The LoRAs offered per entity: ``{name: path}`` from ``--entity-lora NAME=PATH``."""
        return offered_loras(self.entity_lora)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def offered_loras(given: list[str]) -> dict[str, str]:
    """``--entity-lora NAME=PATH`` flags as ``{name: path}``: each well formed, the names distinct."""
    offered: dict[str, str] = {}
    for item in given:
        name, equals, path = str(item).partition("=")
        name, path = name.strip(), path.strip()
        if not equals or not path or not LORA_NAME.fullmatch(name):
            raise ValueError(f"--entity-lora {item!r}: give NAME=PATH, a short name (letters, digits, '_', '-', "
                             "'.') the page shows, and the LoRA's file, folder or hub id")
        if name in offered:
            raise ValueError(f"--entity-lora: the name {name!r} is given twice; give each LoRA its own name")
        offered[name] = path
    return offered


def _is_ipv6(name: str) -> bool:
    try:
        return ipaddress.ip_address(name.strip("[]")).version == 6
    except ValueError:
        return False

"""What `eligen ui` reads (torch-free: `eligen ui --help` and bad flags never load a model)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..choices import DTYPE_NAMES
from ..config import option
from ..data.vlm import VLM_KINDS
from ..families import titles

MAX_ENTITIES = 16  # the reference app has 8 brush layers; the regional mask has no limit of its own


@dataclass
class UIConfig:
    """Everything `eligen ui` reads. The CLI flags are built from these fields."""

    model: str = option("eligen-tiny", f"diffusers {titles()} pipeline directory or hub id; eligen-tiny "
                        "is the small shapes-world model shipped in the package (runs on a CPU)")
    lora: list[str] = option([], "LoRA file, folder or hub id (repeat to stack; default: the model's own EliGen "
                             "LoRA if it declares one); each gets a scale in the page", repeat=True, metavar="PATH")
    host: str = option("127.0.0.1", "address to listen on (loopback by default: only this machine can connect; "
                       "0.0.0.0 opens the app to your network)")
    port: int = option(7860, "port to listen on (0: any free port; the address is printed)")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str | None = option(None, "weights dtype (default: bfloat16 on cuda, float32 elsewhere)",
                               choices=DTYPE_NAMES)
    max_upload_mb: float = option(20.0, "largest upload (an input image, a layout or PNG to load) in MiB")
    max_pixels: int = option(16 * 2**20, "largest image (uploaded, or a layout's width x height) in pixels")
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
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"--max-upload-mb must be > 0, got {self.max_upload_mb}")
        if self.max_pixels < 64 * 64:
            raise ValueError(f"--max-pixels must be at least 4096 (64x64), got {self.max_pixels}")
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
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

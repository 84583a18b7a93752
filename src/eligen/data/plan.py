"""`eligen plan`: a grounding MLLM turns a text prompt into a layout file that `eligen generate` renders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eligen.config import option

from ..entities import Layout, save_layout
from ..models import model_defaults
from .parse import PLAN_INSTRUCTIONS, ParseError, parse_plan
from .vlm import VLM_KINDS, VLMError, check_base_url, make_backend


@dataclass
class PlanConfig:
    """Everything `eligen plan` reads."""

    prompt: str | None = option(None, "what the image should show", positional=True, required=True)
    output: Path | None = option(None, "layout JSON file to write", short="-o", flag="--output", metavar="LAYOUT.json")
    vlm: str = option("openai", "backend: openai (any OpenAI-compatible server, e.g. vLLM or SGLang) or "
                      "transformers (a local Qwen2-VL / Qwen2.5-VL)", choices=VLM_KINDS)
    model: str | None = option(None, "model name on the server, or a local path / hub id for transformers")
    base_url: str | None = option(None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the API key (read, never stored)")
    for_model: str = option("eligen-tiny", "the image model the layout is for: its native size is the default "
                            "--width/--height (the size its eligen_defaults.json declares, else 1024x1024)",
                            flag="--for-model", metavar="MODEL")
    width: int | None = option(None, "layout width in pixels (default: the --for-model's native width)")
    height: int | None = option(None, "layout height in pixels (default: the --for-model's native height)")
    max_entities: int = option(6, "at most this many entities")
    retries: int = option(2, "extra attempts after a malformed answer or a failed request")
    timeout: float = option(60.0, "seconds one request may take in all: connecting, the headers and the whole answer")
    seed: int | None = option(None, "seed stored in the layout for `eligen generate`")

    def __post_init__(self) -> None:
        if self.output is not None and not isinstance(self.output, Path):
            self.output = Path(self.output)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("give the description to plan, e.g. eligen plan \"a cat and a dog on a sofa\" -o l.json")
        native = model_defaults(self.for_model).get("native_size", [1024, 1024])
        self.width = self.width if self.width is not None else native[0]
        self.height = self.height if self.height is not None else native[1]
        if self.width < 16 or self.height < 16 or self.max_entities < 1 or self.retries < 0 or self.timeout <= 0:
            raise ValueError("width/height >= 16, max_entities >= 1, retries >= 0 and timeout > 0")
        if self.vlm not in VLM_KINDS:
            raise ValueError(f"--vlm must be one of {VLM_KINDS}")
        check_base_url(self.base_url)


def plan_layout(config: PlanConfig, backend=None) -> Layout:
    """Ask the backend for a plan (retrying malformed answers), validate it and write the layout file."""
    if config.output is None:
        raise ValueError("give the layout file to write with -o LAYOUT.json")
    if config.output.is_dir():  # before the model is asked
        raise ValueError(f"-o {config.output} is a folder; give a file name, e.g. {config.output / 'layout.json'}")
    backend = backend or make_backend(config.vlm, config.model, config.base_url, config.api_key_env, config.timeout)
    assert config.prompt is not None and config.width is not None and config.height is not None  # __post_init__

    question = PLAN_INSTRUCTIONS.format(prompt=config.prompt.strip(), width=config.width, height=config.height,
                                        max_entities=config.max_entities)
    problems = []
    for _ in range(1 + config.retries):
        try:
            plan = parse_plan(backend.ask(question), config.width, config.height, max_entities=config.max_entities)
        except (ParseError, VLMError) as exc:
            problems.append(str(exc))
            continue
        layout = plan.to_layout(config.width, config.height)
        layout.seed = config.seed
        save_layout(layout, config.output)
        return layout
    raise ValueError(f"no usable plan after {1 + config.retries} attempts; last problem: {problems[-1]}")

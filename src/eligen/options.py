"""The sampling options every command shares, and the one rule that fills what a caller leaves out.

:class:`SamplingOptions` is what shapes one image's denoising (steps, the two CFG scales, the text length) and
:class:`EntityOptions` how the entities enter it; `eligen generate`, `inpaint`, `data generate`, the benchmarks
and the web app all embed them (their flags and the web app's controls come from these fields). An option left
``None`` is filled by :func:`resolve_sampling` with :func:`sampling_defaults`: the model's declared default
(``eligen_defaults.json``), else its family's reference setting (:attr:`eligen.families.card.FamilyCard.reference`).
Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .choices import ATTENTION_MODES, CFG_MODES, ENTITY_TOKEN_MODES, FUSIONS, SCALE_LIMIT
from .config import option

MODEL_DEFAULT = "the model's"  # how help texts say "filled by resolve_sampling"


@dataclass
class SamplingOptions:
    """How one image is denoised; ``None`` means the model's default (see :func:`resolve_sampling`)."""

    steps: int | None = option(None, f"number of denoising steps (default: {MODEL_DEFAULT})")
    true_cfg: float | None = option(None, f"true CFG scale; 1 disables the negative pass (default: {MODEL_DEFAULT})")
    cfg_mode: str | None = option(None, "how true CFG combines the passes: plain (neg + s (pos - neg)) or rescaled "
                                  "(rescaled to the positive prediction's norm); default: the "
                                  "model family's", choices=CFG_MODES)
    guidance: float | None = option(None, "embedded guidance scale of guidance-distilled models "
                                    f"(default: {MODEL_DEFAULT})")
    max_sequence_length: int | None = option(None, f"text tokens per prompt segment (default: {MODEL_DEFAULT})")

    def __post_init__(self) -> None:
        check_sampling(self)


@dataclass
class EntityOptions:
    """How the entities enter the denoising (every choice but ``entity_tokens="trim"`` is exact)."""

    entities_on_negative: bool = option(False, "reference behaviour: also apply the entities on the negative CFG pass "
                                        "(with the negative prompt in every entity slot)")
    entity_tokens: str = option("full", "full: every entity prompt as long as the global prompt's encoding makes it "
                                "(padded where the family pads, as the released LoRAs were trained); trim: its real "
                                "tokens plus 8 pads (fewer tokens, faster, approximate)", choices=ENTITY_TOKEN_MODES)
    attention: str = option("auto", "how the regional mask reaches attention, all exact: dense (bool mask), flex "
                            "(FlexAttention block mask), segmented (unmasked flash calls merged by log-sum-exp); "
                            "auto: segmented on CUDA, dense elsewhere", choices=ATTENTION_MODES)
    compile: bool = option(False, "torch.compile the transformer's repeated blocks (a slow first image, faster ones "
                           "after; for a GPU)")

    def __post_init__(self) -> None:
        if self.entity_tokens not in ENTITY_TOKEN_MODES:
            raise ValueError(f"--entity-tokens must be one of {ENTITY_TOKEN_MODES}, got {self.entity_tokens!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"--attention must be one of {ATTENTION_MODES}, got {self.attention!r}")


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingOptions))
ENTITY_FIELDS = tuple(f.name for f in dataclasses.fields(EntityOptions))
DECLARABLE = ("steps", "true_cfg", "guidance", "max_sequence_length")  # what eligen_defaults.json may set


def check_sampling(options: Any) -> None:
    """The sampling options' ranges (for any object carrying them), each error naming the flag."""
    if options.steps is not None and options.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {options.steps}")
    if options.true_cfg is not None and not 1 <= options.true_cfg <= SCALE_LIMIT:
        raise ValueError(f"--true-cfg must be in 1..{SCALE_LIMIT} (1 disables true CFG), got {options.true_cfg}")
    check_scale("--guidance", options.guidance, 0)
    if options.max_sequence_length is not None and not 1 <= options.max_sequence_length <= 512:
        raise ValueError(f"--max-sequence-length must be in 1..512, got {options.max_sequence_length}")
    if options.cfg_mode is not None and options.cfg_mode not in CFG_MODES:
        raise ValueError(f"--cfg-mode must be one of {CFG_MODES}, got {options.cfg_mode!r}")


def check_scale(flag: str, value: float | None, low: float = -SCALE_LIMIT) -> None:
    """A scale option within ``low..SCALE_LIMIT`` (a larger finite one only makes a black image), naming the flag."""
    if value is not None and not low <= value <= SCALE_LIMIT:
        raise ValueError(f"{flag} must be in {low:g}..{SCALE_LIMIT}, got {value:g}")


def check_lora_scales(scales: list[float], loras: list[str] | None = None) -> None:
    """Each ``--lora-scale`` within +-SCALE_LIMIT, and (given ``loras``) one per ``--lora`` at most."""
    for scale in scales:
        check_scale("--lora-scale", scale)
    if loras is not None and len(scales) > len(loras):
        raise ValueError(f"{len(scales)} --lora-scale values for {len(loras)} --lora files; give one scale per "
                         "LoRA, in the same order")


BASELINES = ("reference", "diffusers")


def sampling_defaults(card: Any, declared: dict[str, Any], baseline: str = "reference") -> dict[str, Any]:
    """The one rule: what a run uses for each sampling option it is not given is the model's declared default
    (``declared``: its ``eligen_defaults.json``), else its family's setting (and the family's CFG combination).
    ``card``: the family's :class:`~eligen.families.card.FamilyCard`; ``baseline``: ``"reference"`` (EliGen's
    reference settings, for entity-controlled generation) or ``"diffusers"`` (the diffusers pipeline's own, for plain
    generation such as the dataset's images)."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    family = card.reference if baseline == "reference" else card.defaults
    stated = {k: v for k, v in declared.items() if k in DECLARABLE}
    return {**dataclasses.asdict(family), "cfg_mode": card.default_cfg, **stated}


def model_sampling_defaults(model: str, baseline: str = "reference") -> dict[str, Any]:
    """:func:`sampling_defaults` of a model directory or hub id, read from its files (torch-free)."""
    from .families import model_card
    from .models import model_defaults

    return sampling_defaults(model_card(model), model_defaults(model), baseline)


def pipeline_sampling_defaults(pipe: Any, baseline: str = "reference") -> dict[str, Any]:
    """:func:`sampling_defaults` of a loaded EliGen pipeline."""
    return sampling_defaults(pipe.family.card, pipe.eligen_defaults, baseline)


def resolve_sampling(options: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """``options``' sampling fields with every ``None`` filled from ``defaults`` (:func:`sampling_defaults`)."""
    return {name: getattr(options, name) if getattr(options, name) is not None else defaults.get(name)
            for name in SAMPLING_FIELDS}


@dataclass
class InpaintOptions:
    """How inpainting keeps the input outside the entities (docs/design.md section 5)."""

    fusion: str = option("exact", "exact: CFG first, the background ends exactly at the input; paper: fuse before CFG "
                         "as the paper does", choices=FUSIONS)
    strength: float = option(1.0, "below 1 starts from a partly noised input")
    paste_back: bool = option(True, "copy the input's pixels outside the (dilated) entity union back exactly")
    mask_dilate: int = option(0, "grow the union of the entity masks by this many latent pixels")
    mask_blur: float = option(0.0, "Gaussian sigma (latent pixels) of a soft rim around the union")

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"--fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"--strength must be in (0, 1], got {self.strength}")
        if self.mask_dilate < 0 or self.mask_blur < 0:
            raise ValueError("--mask-dilate and --mask-blur must be >= 0")

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in INPAINT_FIELDS}


INPAINT_FIELDS = tuple(f.name for f in dataclasses.fields(InpaintOptions))


@dataclass
class EditOptions:
    """How an edit model treats the input beyond inpainting's options (docs/design.md section 21)."""

    keep_outside: bool = option(True, "keep the input outside the union of the entity masks (inpainting fusion and "
                                "paste-back); off, the model may change the whole image")
    auto_resize: bool = option(True, "show the model the input resized to the nearest of its preferred resolutions, "
                               "as the diffusers pipeline does")


EDIT_FIELDS = tuple(f.name for f in dataclasses.fields(EditOptions))


def schema(classes: tuple[type, ...], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """The fields of option dataclasses as the web app renders its controls from them: name, kind (int, float,
    bool, choice), default (``defaults`` first, e.g. the model's resolved sampling options), choices and help."""
    import typing

    from .config import _scalar_type

    out = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _scalar_type(hints[f.name])
            choices = f.metadata.get("choices")
            out.append({"name": f.name, "kind": "choice" if choices else {int: "int", float: "float", bool: "bool",
                                                                         str: "text"}.get(kind, "text"),
                        "default": defaults.get(f.name, f.default), "choices": list(choices) if choices else None,
                        "help": f.metadata.get("help", ""), "group": cls.__name__})
    return out

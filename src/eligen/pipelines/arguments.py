"""One pipeline call's arguments: diffusers' own, and EliGen's in three small groups (entities, inpainting, speed).

Each EliGen pipeline keeps its diffusers parent's ``__call__`` signature (so ``help()`` and IDEs show every
argument) and hands its arguments to :meth:`Call.of`, which sorts them: the arguments every family shares become
fields, the EliGen ones the groups below (each checks its values), and the family's own (``prompt_2``,
``pooled_prompt_embeds``, ``prompt_embeds_mask``, the IP-Adapter's, ...) stay in ``extra`` for its hooks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..choices import ATTENTION_MODES, ENTITY_TOKEN_MODES, FUSIONS, SCALE_LIMIT

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class EntityArgs:
    """The entities: :class:`eligen.Entity` objects, or (low level) prompts or their embeddings with masks."""

    entities: Sequence[Any] | None = None
    entity_prompts: Sequence[str] | None = None
    entity_prompt_embeds: Sequence[Any] | None = None
    entity_masks: Sequence[Any] | None = None
    entities_on_negative: bool = False
    entity_tokens: str = "full"

    def __post_init__(self) -> None:
        if self.entity_tokens not in ENTITY_TOKEN_MODES:
            raise ValueError(f"entity_tokens must be one of {ENTITY_TOKEN_MODES}, got {self.entity_tokens!r}")
        if self.entities is not None and (self.entity_prompts is not None or self.entity_prompt_embeds is not None
                                          or self.entity_masks is not None):
            raise ValueError("pass either `entities` or `entity_prompts`/`entity_prompt_embeds` + `entity_masks`")
        if self.entity_prompts is not None and self.entity_prompt_embeds is not None:
            raise ValueError("pass either `entity_prompts` or `entity_prompt_embeds`, not both")

    @property
    def given(self) -> bool:
        return bool(self.entities) or bool(self.entity_masks)


@dataclass
class InpaintArgs:
    """Inpainting fusion (docs/design.md section 5): the input ``image`` and how its background is kept."""

    image: Any = None
    inpaint: bool = False
    strength: float = 1.0
    fusion: str = "exact"
    mask_dilate: int = 0
    mask_blur: float = 0.0
    paste_back: bool = True

    def __post_init__(self) -> None:
        if self.image is None and not self.inpaint:
            return
        if not self.inpaint:
            raise ValueError("`image` is only read for inpainting: pass inpaint=True (plain image-to-image is not "
                             "supported)")
        if self.image is None:
            raise ValueError("inpaint=True needs the input `image`")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if isinstance(self.mask_dilate, bool) or not isinstance(self.mask_dilate, int) or self.mask_dilate < 0:
            raise ValueError(f"mask_dilate is a number of latent pixels >= 0, got {self.mask_dilate!r}")
        if not self.mask_blur >= 0:
            raise ValueError(f"mask_blur is a Gaussian sigma in latent pixels >= 0, got {self.mask_blur!r}")

    @property
    def active(self) -> bool:
        return self.inpaint


@dataclass
class SpeedArgs:
    """How the regional mask is computed (all exact) and the opt-in approximations."""

    attention: str = "auto"
    compile: bool = False
    entity_steps: int | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        steps = self.entity_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"entity_steps is a number of steps >= 0 (None: every step), got {steps!r}")


GROUPS = {"entity": EntityArgs, "inpainting": InpaintArgs, "speed": SpeedArgs}


@dataclass
class Call:
    """The arguments of one call, sorted (see the module doc). ``attention_kwargs`` is diffusers'
    ``joint_attention_kwargs`` or ``attention_kwargs``, whichever the family's pipeline takes."""

    entity: EntityArgs
    inpainting: InpaintArgs
    speed: SpeedArgs
    prompt: Any = None
    negative_prompt: Any = None
    prompt_embeds: Any = None
    negative_prompt_embeds: Any = None
    true_cfg_scale: float | None = None
    cfg_mode: str | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    sigmas: Sequence[float] | None = None
    shift_sigmas: bool = True
    guidance_scale: float | None = None
    num_images_per_prompt: int = 1
    generator: Any = None
    latents: Any = None
    output_type: str = "pil"
    return_dict: bool = True
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    callback_on_step_end: Callable[..., dict] | None = None
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)
    max_sequence_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, arguments: dict[str, Any], attention_kwargs_name: str) -> Call:
        """Sort a ``__call__``'s ``locals()`` (``self`` dropped)."""
        given = {k: v for k, v in arguments.items() if k != "self"}
        groups = {name: group(**{f.name: given.pop(f.name) for f in dataclasses.fields(group) if f.name in given})
                  for name, group in GROUPS.items()}
        given["attention_kwargs"] = dict(given.pop(attention_kwargs_name, None) or {})
        own = {f.name for f in dataclasses.fields(cls)} - set(GROUPS)
        call = cls(**groups, **{k: v for k, v in given.items() if k in own},
                   extra={k: v for k, v in given.items() if k not in own})
        if call.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {call.output_type!r}")
        return call

    @property
    def batch_size(self) -> int:
        """Prompts in the call (before ``num_images_per_prompt``)."""
        if self.prompt is not None:
            return 1 if isinstance(self.prompt, str) else len(self.prompt)
        return len(self.prompt_embeds)  # a (B, T, D) tensor, or a list of (T_b, D) (some pipelines take one)


def check_finite(**values: Any) -> None:
    """Refuse NaN / inf in scales and in tensors a caller passes in, naming the argument (they would only show as a
    black or noise image at the end)."""
    import torch

    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            bad = not value.float().isfinite().all()
        elif isinstance(value, (list, tuple)):
            bad = any(not v.float().isfinite().all() for v in value if isinstance(v, torch.Tensor))
        else:
            bad = not math.isfinite(value)
        if bad:
            raise ValueError(f"{name} holds NaN or inf; pass finite values")


def check_scales(**values: float | None) -> None:
    """Refuse finite but absurd scales (above :data:`~eligen.choices.SCALE_LIMIT` in magnitude), naming the argument:
    they overflow the model's activations into a black image."""
    for name, value in values.items():
        if value is not None and abs(value) > SCALE_LIMIT:
            raise ValueError(f"{name} must be at most {SCALE_LIMIT} in magnitude (a larger one only makes a black "
                             f"image), got {value:g}")


def check_whole(name: str, value: Any, least: int, unit: str = "") -> None:
    """A count the call was given (steps, pixels; None: not given) is a whole number >= ``least``, named."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least):
        raise ValueError(f"{name} must be a whole number{unit} >= {least}, got {value!r}")


def edit_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """An edit pipeline's ``__call__`` locals -> what :meth:`Call.of` sorts: ``image`` (the input to edit) moves to
    ``extra["edit_image"]``, and with ``keep_outside`` and entities it (the last of a list) is also the inpainting
    input (fusion by the entity union, docs/design.md section 21); without, the inpainting options keep their
    defaults."""
    arguments = dict(arguments)
    image = arguments["edit_image"] = arguments.pop("image")
    given = bool(arguments.get("entities")) or bool(arguments.get("entity_masks"))
    keep = bool(arguments.pop("keep_outside")) and image is not None and given
    arguments.update(image=(image[-1] if isinstance(image, list) else image) if keep else None, inpaint=keep)
    if not keep:
        for f in dataclasses.fields(InpaintArgs):
            if f.name not in ("image", "inpaint"):
                arguments[f.name] = f.default
    return arguments


ELIGEN_ARGUMENTS = """
        Entities:
            entities: :class:`eligen.Entity` list (a prompt and one of mask / box / polygon each).
            entity_prompts / entity_prompt_embeds: the entity texts, or their embeddings ``(T, D)``, ``(1, T, D)`` or
                ``(B, T, D)`` each (the low-level path), with ``entity_masks``: one mask per entity (PIL image, numpy
                array or tensor, any resolution).
            entities_on_negative: the reference's "enable on negative": run the negative CFG branch with the
                negative prompt copied into every entity slot under the same masks. Default: no entities there.
            entity_tokens: "full" (every entity segment as the global prompt's encoding makes it) or "trim" (fewer
                padding tokens where the family pads: approximate).
            cfg_mode: "plain" (``neg + s (pos - neg)``) or "rescaled" (rescaled to the positive prediction's norm,
                as some diffusers pipelines do); default: the family's.
            shift_sigmas: with False, ``sigmas`` are used verbatim (e.g. ``eligen.reference_sigmas(50)``); with True
                (default) they are shifted by the scheduler exactly as in the diffusers pipeline.

        Inpainting fusion (``image=..., inpaint=True``; docs/design.md section 5): the entities' masks mark what to
        repaint, everything else stays ``image``; all entities are rendered in one pass.
            image: the input (path, PIL image, numpy array or tensor); height/width default to its size, and a size
                off the patch grid is resized for the model and restored at the end.
            strength: below 1 starts from a partly noised input (skips the first steps).
            fusion: "exact" (default; CFG first, latents outside the union end exactly at the input's) or "paper"
                (fuse before CFG, as the paper and the reference do).
            mask_dilate: grow the union by this many latent pixels. mask_blur: Gaussian sigma (latent pixels) of a
                soft rim around the union. paste_back: pixels outside the union are copied from the input exactly.

        Speed (exact unless noted):
            attention: "dense" (a bool ``(1, 1, L, L)`` mask, SDPA), "flex" (a FlexAttention BlockMask, with a
                compiled fused kernel on CUDA), "segmented" (unmasked attention calls, one over ``[global | image]``
                and two per entity, merged by log-sum-exp) or "auto" (segmented on CUDA, dense elsewhere).
            compile: ``torch.compile`` the transformer's repeated blocks (regional compilation), once.
            entity_steps: entities in the first ``entity_steps`` steps only, then the plain global-prompt forward
                (approximate, faster; None: every step). See :mod:`eligen.speedups`.
"""


def eligen_call_doc(parent: str, family_notes: str = "") -> Callable[[Callable], Callable]:
    """The ``__call__`` docstring: the parent's arguments, the family's notes, then the EliGen arguments."""
    def document(call: Callable) -> Callable:
        call.__doc__ = (f"Generate images with entity control. The arguments are {parent}'s, plus the EliGen ones "
                        f"below.\n{family_notes}{ELIGEN_ARGUMENTS}")
        return call

    return document

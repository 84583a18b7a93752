"""ControlNet with entities (docs/design.md section 23): the family-independent half of an EliGen ControlNet
pipeline.

A call's control inputs are the global one (diffusers' ``control_image`` with ``controlnet_conditioning_scale``,
``control_mode``, ``control_guidance_start`` / ``_end``) and one per entity that carries a ``control_image`` (at its
``control_scale``). At each step the ControlNet runs once per input on the step's latents and the global prompt
alone (never the entity segments, never the regional mask), as diffusers runs it, and its residuals are shared by the
CFG branches. An entity's residuals are multiplied by its token mask on the image-token axis, so they reach only the
image tokens it covers; the residuals of all inputs are summed, block by block, and the transformer adds the sum as
it adds diffusers' ControlNet residuals. With only the global input the residuals are diffusers' own, untouched.

A family supplies :meth:`ControlNetMixin._control_condition` (the control image as its ControlNet takes it),
:meth:`ControlNetMixin._controlnet_forward` and :meth:`ControlNetMixin._residual_kwargs`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..entities import LayoutError, reference_pil
from ..families.base import Branch
from .arguments import Call
from .entities import ResolvedEntities

Residuals = tuple[Any, ...]  # a ControlNet's outputs: lists of (B, n_img, D) block residuals (or None), per kind


@dataclass
class ControlInput:
    """One ControlNet input of a call: ``cond`` as the ControlNet takes it (a list for a MultiControlNet),
    ``scale`` its conditioning scale (a list for a MultiControlNet), ``mode`` the union ControlNet's mode and
    ``weight (1, n_img, 1)`` an entity's token mask (None: every image token)."""

    cond: Any
    scale: Any
    mode: Any = None
    weight: torch.Tensor | None = None


@dataclass
class ControlPlan:
    """A call's control inputs and the guidance window of each ControlNet (``starts`` / ``ends``: fractions of the
    steps); the residuals of the step whose latents are ``latents`` are kept for its other CFG branch."""

    inputs: list[ControlInput]
    starts: list[float]
    ends: list[float]
    multi: bool
    step: int = -1
    latents: torch.Tensor | None = None
    residuals: Residuals = field(default_factory=tuple)


def control_keep(step: int, steps: int, starts: Sequence[float], ends: Sequence[float]) -> list[float]:
    """1.0 for each ControlNet active at ``step`` of ``steps`` (its window ``[start, end]``), else 0.0: diffusers'
    ``controlnet_keep``."""
    return [1.0 - float(step / steps < s or (step + 1) / steps > e) for s, e in zip(starts, ends, strict=True)]


def weighted(block: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """A residual ``(B, L, D)`` times a token weight ``(B or 1, n_img, 1)``; a weight shorter than the residual's
    token axis covers its first ``n_img`` tokens (the image tokens, where a residual over a joint sequence starts)
    and zeroes the rest (that sequence's image padding and text): docs/design.md section 23.1. A residual of CFG
    branches batched together (``k B`` rows) takes the weight once per branch."""
    if weight is None:
        return block
    weight = weight.to(block.dtype)
    if weight.shape[0] not in (1, block.shape[0]):
        weight = weight.repeat(block.shape[0] // weight.shape[0], 1, 1)
    if weight.shape[1] < block.shape[1]:
        weight = torch.nn.functional.pad(weight, (0, 0, 0, block.shape[1] - weight.shape[1]))
    return block * weight


def masked_sum(parts: Sequence[tuple[Residuals, torch.Tensor | None]]) -> Residuals:
    """``sum_k weight_k * residuals_k`` kind by kind and block by block (a weight ``(1, n_img, 1)`` masks the image
    tokens, :func:`weighted`; None keeps all). One unweighted part is returned as it is; a kind that every part
    leaves None stays None."""
    if len(parts) == 1 and parts[0][1] is None:
        return parts[0][0]
    total: list[Any] = [None] * len(parts[0][0])
    for residuals, weight in parts:
        for kind, blocks in enumerate(residuals):
            if blocks is None:
                continue
            masked = [weighted(b, weight) for b in blocks]
            total[kind] = masked if total[kind] is None else [t + w for t, w in zip(total[kind], masked, strict=True)]
    return tuple(total)


def _as_list(value: Any, count: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


class ControlNetMixin:
    """The ControlNet half of an EliGen ControlNet pipeline (before the family's hooks in the MRO).
    ``controlnet_class``: the diffusers ControlNet model class the pipeline loads (``--controlnet``);
    ``multi_controlnet_class``: its several-ControlNets wrapper (None where diffusers has none)."""

    controlnet_class: ClassVar[str]
    multi_controlnet_class: ClassVar[type | None]
    _control_plan: ControlPlan | None = None
    _control_text: Branch | None = None

    # -- family hooks -------------------------------------------------------------------------------------------

    def _control_condition(self, image: Any, batch: int, call: Call, size: tuple[int, int], device: torch.device,
                           dtype: torch.dtype) -> torch.Tensor:
        """A control image as the family's ControlNet takes it (diffusers' preparation, VAE-encoded with the call's
        generator where the ControlNet reads latents)."""
        raise NotImplementedError

    def _controlnet_forward(self, cond: Any, scale: Any, mode: Any, latents: torch.Tensor, timestep: torch.Tensor,
                            text: Branch, geometry) -> Residuals:
        """One ControlNet forward on the global prompt's ``text``: its residual lists."""
        raise NotImplementedError

    def _residual_kwargs(self, residuals: Residuals) -> dict[str, Any]:
        """The transformer's keyword arguments that carry ``residuals``."""
        raise NotImplementedError

    def _control_mode(self, mode: Any, rows: int, device: torch.device, count: int) -> Any:
        """The union ControlNet's ``control_mode`` as the ControlNet takes it (None where there is none)."""
        return None

    # -- the call -----------------------------------------------------------------------------------------------

    @classmethod
    def _serves(cls, serving) -> bool:
        """A ControlNet pipeline loads its own checkpoints and the family's text-to-image ones (plus a ControlNet)."""
        base = cls.family.card  # type: ignore[attr-defined]
        return super()._serves(serving) or (  # type: ignore[misc]
            serving.name == base.name and "edit" not in serving.features and "controlnet" not in serving.features)

    def _controls(self, call: Call, branches: dict[str, Branch], ents: ResolvedEntities | None, batch: int,
                  size: tuple[int, int], device: torch.device) -> None:
        """The call's control inputs, prepared once (before the initial latents, as diffusers prepares them)."""
        self._control_plan, self._control_text = None, branches["cond"]
        multi_class, x = self.multi_controlnet_class, call.extra
        multi = multi_class is not None and isinstance(self.controlnet, multi_class)  # type: ignore[attr-defined]
        count = len(self.controlnet.nets) if multi else 1  # type: ignore[attr-defined]
        dtype = branches["cond"].context.dtype
        inputs = []
        if x["control_image"] is not None:
            images = x["control_image"] if multi else [x["control_image"]]
            conds = [self._control_condition(image, batch, call, size, device, dtype) for image in images]
            mode = self._control_mode(x.get("control_mode"), conds[0].shape[0], device, len(conds))
            inputs.append(ControlInput(conds if multi else conds[0], x["controlnet_conditioning_scale"], mode))
            count = len(conds)
        inputs += self._entity_controls(call, ents, batch, size, device, dtype, multi)
        if not inputs:
            raise ValueError("a ControlNet pipeline needs a control image: pass control_image, or give an entity a "
                             "control_image")
        starts, ends = x["control_guidance_start"], x["control_guidance_end"]
        count = max(count, len(starts) if isinstance(starts, list) else 1, len(ends) if isinstance(ends, list) else 1)
        self._control_plan = ControlPlan(inputs, _as_list(starts, count), _as_list(ends, count), multi)

    def _entity_controls(self, call: Call, ents: ResolvedEntities | None, batch: int, size: tuple[int, int],
                         device: torch.device, dtype: torch.dtype, multi: bool) -> list[ControlInput]:
        """One input per entity with a ``control_image``, weighted by its token cover."""
        if ents is None or ents.entities is None:
            return []
        inputs = []
        for i, entity in enumerate(ents.entities):
            if entity.control_image is None:
                continue
            if multi:
                raise LayoutError("per-entity control needs one ControlNet model, not a MultiControlNet; load one "
                                  "ControlNet (it serves every entity)", entity=i, field="control_image")
            image = reference_pil(entity.control_image, i, "control_image")
            cond = self._control_condition(image, batch, call, size, device, dtype)
            mode = self._control_mode(call.extra.get("control_mode"), cond.shape[0], device, 1)
            weight = ents.cover[:, i, :, None].to(device)
            inputs.append(ControlInput(cond, float(entity.control_scale), mode, weight))
        return inputs

    def _step_residuals(self, plan: ControlPlan, latents: torch.Tensor, timestep: torch.Tensor, geometry) -> Residuals:
        """The summed, masked residuals of the step whose latents are ``latents`` (computed once per step)."""
        if plan.latents is latents:
            return plan.residuals
        plan.step, plan.latents = plan.step + 1, latents
        keep = control_keep(plan.step, self._num_timesteps, plan.starts, plan.ends)  # type: ignore[attr-defined]
        text = self._global_text()
        parts = []
        for control in plan.inputs:
            if plan.multi and control.weight is None:
                scale = [c * k for c, k in zip(_as_list(control.scale, len(keep)), keep, strict=False)]
            else:
                scale = (control.scale[0] if isinstance(control.scale, list) else control.scale) * keep[0]
            parts.append((self._controlnet_forward(control.cond, scale, control.mode, latents, timestep, text,
                                                   geometry), control.weight))
        plan.residuals = masked_sum(parts)
        return plan.residuals

    def _global_text(self) -> Branch:
        """The positive branch's global prompt alone (what the ControlNet reads)."""
        cond = self._control_text
        assert cond is not None and cond.sequence is not None  # set by _controls
        if not cond.sequence.entities:
            return cond
        sequence = cond.sequence.global_only()
        mask = None if cond.text_mask is None else cond.sequence.global_part(cond.text_mask)
        return Branch(cond.sequence.global_part(cond.context), cond.pooled, mask,
                      positions=self.family.positions(sequence, cond.context.device,  # type: ignore[attr-defined]
                                                      self._text_dtype()),  # type: ignore[attr-defined]
                      sequence=sequence)

    def _velocity(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                  guidance: torch.Tensor | None) -> torch.Tensor:
        """One transformer forward with the step's ControlNet residuals."""
        plan = self._control_plan
        if plan is None:
            return super()._velocity(latents, timestep, branch, geometry, guidance)  # type: ignore[misc]
        residuals = self._step_residuals(plan, latents, timestep, geometry)
        transformer = functools.partial(self.transformer, **self._residual_kwargs(residuals))  # type: ignore
        return self.family.forward(transformer, latents, timestep, branch, geometry, guidance,  # type: ignore
                                   self._eligen_attention_kwargs)  # type: ignore[attr-defined]

    def _eligen_call(self, call: Call):
        try:
            return super()._eligen_call(call)  # type: ignore[misc]
        finally:
            self._control_plan = self._control_text = None

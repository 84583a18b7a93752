"""EliGenZImagePipeline: diffusers' ZImagePipeline with entity prompts and regional attention (docs/design.md
section 18).

Every entity prompt is encoded as the global prompt is (real tokens, any length); the transformer pads each segment
to a multiple of 32 with its learned token, the segments' positions restart at the global prompt's, the context
refiner keeps the segments apart and the regional mask (FLUX's rule) reaches every main layer. With no entities
every step is stock ZImagePipeline, bit for bit: its sigmas, its time ``(1000 - t) / 1000``, its CFG branches in one
transformer call, its rule ``pos + g (pos - neg)`` with ``cfg_normalization`` and ``cfg_truncation``, its negated
prediction and its spatial latents. The call is the shared one (:class:`eligen.pipelines.call.EliGenCallMixin`);
this class holds Z-Image's hooks.

Z-Image's CFG scale is its ``guidance_scale`` ``g`` (CFG runs when ``g > 0``, the negative prompt defaulting to
""); EliGen's ``true_cfg_scale`` is the same scale written ``neg + s (pos - neg)``: ``s = 1 + g``. Either may be
given; both must agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput
from torch.nn.utils.rnn import pad_sequence

from ...entities import Entity
from ...pipelines.arguments import Call, eligen_call_doc
from ...pipelines.call import EliGenCallMixin
from ..base import Branch
from .model import Z_IMAGE, Control, ZImageBranch, ZImageFamily, latent_grid, pack_latents, unpack_latents


def default_sigmas(steps: int) -> list[float]:
    """ZImagePipeline's default schedule before the shift: ``linspace(1, 1/steps)`` in float32."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


class _ModelCfg:
    """Z-Image's CFG rule for one call: ``pos + g (pos - neg)`` with the exact ``guidance_scale`` ``g``, per sample
    renormalised to at most ``cfg_normalization`` times the positive prediction's norm, and off at steps whose
    ``(1000 - t) / 1000`` exceeds ``cfg_truncation`` (ZImagePipeline's rule; the predictions here are negated, which
    commutes with every operation)."""

    def __init__(self, pipe, guidance: float, normalization: Any, truncation: Any, grid: tuple[int, int]):
        self.pipe, self.guidance, self.normalization, self.truncation, self.grid = (pipe, guidance, normalization,
                                                                                     truncation, grid)

    def applies(self) -> bool:
        """Whether CFG runs at the current step (ZImagePipeline's ``cfg_truncation``)."""
        if self.truncation is None or float(self.truncation) > 1:
            return True
        t = self.pipe._current_timestep
        return not float((1000 - t.float()) / 1000) > self.truncation

    def __call__(self, positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
        if not self.applies():
            return positive
        prediction = positive + self.guidance * (positive - negative)
        if not (self.normalization and float(self.normalization) > 0.0):
            return prediction
        ours, theirs = unpack_latents(positive, *self.grid), unpack_latents(prediction, *self.grid)
        factors = []
        for j in range(positive.shape[0]):
            limit = torch.linalg.vector_norm(ours[j]) * float(self.normalization)
            norm = torch.linalg.vector_norm(theirs[j])
            factors.append(limit / norm if norm > limit else None)
        if all(f is None for f in factors):
            return prediction
        return torch.stack([p * f if f is not None else p for p, f in zip(prediction, factors, strict=True)])


class ZImageHooks(EliGenCallMixin):
    """The Z-Image hooks of the shared call, for every pipeline whose ``_encode_prompt`` and ``prepare_latents`` are
    ZImagePipeline's (ZImageControlNetPipeline's are the same)."""

    family: ClassVar[ZImageFamily]
    output_class = ZImagePipelineOutput
    _cfg_branches: dict[str, Branch] | None = None
    _cfg_rule: _ModelCfg | None = None
    _pending: tuple[Branch, torch.Tensor, torch.Tensor] | None = None
    _latent_size: tuple[int, int] = (0, 0)

    @property
    def default_sample_size(self) -> int:
        """ZImagePipeline draws 1024x1024 when no size is given."""
        return 1024 // self.vae_scale_factor

    # -- 0. arguments ---------------------------------------------------------------------------------------------

    def _fill_defaults(self, call: Call) -> None:
        """Z-Image's CFG scale from whichever of ``guidance_scale`` (``g``) and ``true_cfg_scale`` (``1 + g``) is
        given (both: they must agree), else the model's declared ``true_cfg``, else ZImagePipeline's ``g = 5``; its
        default sigmas (float32 ``linspace``, not numpy's)."""
        given, stated = call.guidance_scale, call.true_cfg_scale
        if given is not None and stated is not None and stated != 1 + given:
            raise ValueError(f"Z-Image's guidance_scale is its CFG scale (guidance_scale = true_cfg_scale - 1), but "
                             f"guidance_scale={given} and true_cfg_scale={stated} disagree: pass one of them")
        if given is not None:
            call.true_cfg_scale = 1 + given
        super()._fill_defaults(call)
        assert call.true_cfg_scale is not None and call.num_inference_steps is not None  # filled above
        call.guidance_scale = given if given is not None else call.true_cfg_scale - 1
        if call.sigmas is None and call.shift_sigmas:
            call.sigmas = default_sigmas(call.num_inference_steps)

    def _negative_given(self, call: Call) -> bool:
        """Always: ZImagePipeline encodes the empty prompt when no negative one is given."""
        return True

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        """ZImagePipeline's checks: the size on its 16-pixel grid, a negative for given embeddings under CFG, as many
        negative prompts as prompts; and the step-callback tensors it offers."""
        grid = self.vae_scale_factor * 2
        for name, value in (("Height", size[0]), ("Width", size[1])):
            if value % grid:
                raise ValueError(f"{name} must be divisible by {grid} (got {value}). Please adjust the "
                                 f"{name.lower()} to a multiple of {grid}.")
        if call.prompt is None and call.prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`.")
        embeds_only = call.prompt_embeds is not None and call.prompt is None
        if embeds_only and do_true_cfg and call.negative_prompt_embeds is None:
            raise ValueError("When `prompt_embeds` is provided without `prompt`, `negative_prompt_embeds` must also be "
                             "provided for classifier-free guidance.")
        negative = call.negative_prompt
        if do_true_cfg and call.prompt is not None and negative is not None and not isinstance(negative, str):
            prompts = 1 if isinstance(call.prompt, str) else len(call.prompt)
            if len(negative) != prompts:
                raise ValueError(f"{len(negative)} negative prompts for {prompts} prompts: give one each")
        unknown = [k for k in call.callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has {unknown}; ZImagePipeline offers "
                             f"{self._callback_tensor_inputs}")

    # -- 1. text --------------------------------------------------------------------------------------------------

    def _encode_branch(self, call: Call, negative: bool, device: torch.device) -> ZImageBranch:
        """The prompts (or the empty negative ones) encoded as ZImagePipeline encodes them, each sample's real tokens
        as one row of ``(B, T, D)`` (zero-padded after its tokens, with a text mask when the lengths differ)."""
        given = call.negative_prompt_embeds if negative else call.prompt_embeds
        if given is None:
            prompts = [call.prompt] if isinstance(call.prompt, str) else list(call.prompt)
            if negative:
                text = call.negative_prompt
                prompts = [""] * len(prompts) if text is None else [text] if isinstance(text, str) else list(text)
            given = self._encode_prompt(prompt=prompts, device=device, max_sequence_length=call.max_sequence_length)
        embeds = [e for e in given for _ in range(call.num_images_per_prompt)]
        lengths = torch.tensor([e.shape[0] for e in embeds])
        context = pad_sequence(embeds, batch_first=True)
        valid = None
        if len(set(lengths.tolist())) > 1:
            valid = (torch.arange(context.shape[1])[None] < lengths[:, None]).to(context.device)
        return ZImageBranch(context, text_mask=valid)

    # -- 2. latents -----------------------------------------------------------------------------------------------

    def _initial_latents(self, call: Call, batch: int, size: tuple[int, int], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
        """ZImagePipeline's latents (float32 whatever the model's dtype), packed."""
        latents = self.prepare_latents(batch, self.transformer.in_channels, *size, torch.float32, device,
                                       call.generator, call.latents)
        self._latent_size = (latents.shape[-2], latents.shape[-1])
        return pack_latents(latents)

    # -- 3. the loop ----------------------------------------------------------------------------------------------

    def _run(self, call: Call, latents: torch.Tensor, branches: dict[str, Branch], ents, source, size,
             guidance, combine: Callable, on_step_end: Callable) -> torch.Tensor:
        """The shared loop with Z-Image's own CFG rule (``cfg_mode="plain"``), its CFG branches batched as
        ZImagePipeline batches them."""
        rule = None
        if (call.cfg_mode or self.family.default_cfg) == "plain":
            assert call.guidance_scale is not None  # set by _fill_defaults
            rule = _ModelCfg(self, call.guidance_scale, call.extra["cfg_normalization"], call.extra["cfg_truncation"],
                             latent_grid(self, *size))
        self._cfg_branches, self._cfg_rule, self._pending = branches, rule, None
        try:
            return super()._run(call, latents, branches, ents, source, size, guidance, rule or combine, on_step_end)
        finally:
            self._cfg_branches = self._cfg_rule = self._pending = None

    def _velocity(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                  guidance: torch.Tensor | None) -> torch.Tensor:
        """One branch's velocity at the current step, with ZImagePipeline's time ``(1000 - t) / 1000`` of the
        scheduler's ``t``. A positive branch without entities whose negative partner has none either runs with it in
        one transformer call (the negative's result is kept for the call that asks for it next); at a step where
        ``cfg_truncation`` turns CFG off the negative branch is not run (its velocity is not read)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is branch and pending[1] is latents:
            return pending[2]
        scope = self._entity_lora_scope
        if scope is not None:
            scope.current = branch.lora_tokens
        t = self._current_timestep
        assert t is not None  # set by the shared loop before every forward
        model_time = (1000 - t.expand(latents.shape[0])) / 1000
        kwargs = self._eligen_attention_kwargs
        cfg_on = self._cfg_rule is None or self._cfg_rule.applies()
        partner = self._partner(branch)
        if partner is not None and not cfg_on:
            self._pending = (partner, latents, torch.zeros_like(latents))
        elif partner is not None:
            positive, negative = self.family.forward_stock(self.transformer, latents, model_time, [branch, partner],
                                                           geometry, kwargs, control=self._control_hints(latents))
            self._pending = (partner, latents, negative)
            return positive
        return self.family.forward(self.transformer, latents, timestep, branch, geometry, guidance, kwargs,
                                   model_time=model_time, control=self._control_hints(latents))

    def _control_hints(self, latents: torch.Tensor) -> Control | None:
        """The ControlNet of the step whose latents are ``latents`` (a ControlNet pipeline's; None here)."""
        return None

    def _partner(self, branch: Branch) -> Branch | None:
        """The negative branch run with ``branch`` in one call: both without entities and entity LoRAs (each branch's
        LoRA weights are its own; a positive one only)."""
        branches = self._cfg_branches or {}
        name = next((n for n, b in branches.items() if b is branch), None)
        if name is None or not name.startswith("cond"):
            return None
        partner = branches.get("un" + name)
        if partner is None or any(b.attention_mask is not None or (b.sequence and b.sequence.entities)
                                  or b.lora_tokens is not None for b in (branch, partner)):
            return None
        return partner

    def _step_callback(self, call: Call, branches: dict[str, Branch], ents, prompt_embeds: torch.Tensor) -> Callable:
        """diffusers' step callback as ZImagePipeline calls it: spatial latents ``(B, C, h, w)`` and the prompt
        embeddings as a list of ``(T_b, D)`` (a returned list must keep every length)."""
        callback = call.callback_on_step_end
        if callback is None:
            return super()._step_callback(call, branches, ents, prompt_embeds)
        size, text_mask = self._latent_size, branches["cond"].text_mask

        def as_stock(pipe, i, t, tensors):
            if "latents" in tensors:
                tensors["latents"] = unpack_latents(tensors["latents"], *size)
            if "prompt_embeds" in tensors:
                tensors["prompt_embeds"] = _rows(tensors["prompt_embeds"], text_mask)
            out = dict(callback(pipe, i, t, tensors))
            if "latents" in out:
                out["latents"] = pack_latents(out["latents"])
            if "prompt_embeds" in out:
                out["prompt_embeds"] = _padded(out["prompt_embeds"], text_mask, prompt_embeds)
            return out

        return super()._step_callback(dataclasses.replace(call, callback_on_step_end=as_stock), branches, ents,
                                      prompt_embeds)

    # -- 4. the output --------------------------------------------------------------------------------------------

    def _output(self, call: Call, latents: torch.Tensor, ents, source, size):
        """``output_type="latent"``: ZImagePipeline's spatial float32 latents ``(B, C, h, w)``."""
        if call.output_type == "latent":
            return unpack_latents(latents, *latent_grid(self, *size))
        return super()._output(call, latents, ents, source, size)


class EliGenZImagePipeline(ZImageHooks, ZImagePipeline):
    """Z-Image (and Z-Image-Turbo) with EliGen entity control; loads any diffusers Z-Image directory or hub id."""

    family = Z_IMAGE

    @torch.no_grad()
    @eligen_call_doc("diffusers' ZImagePipeline", """
        CFG: ``guidance_scale`` is ZImagePipeline's (``pos + g (pos - neg)``, on when above 0, the negative prompt
        defaulting to ""), ``true_cfg_scale`` the same scale as EliGen writes it (``1 + g``); give either.
        ``cfg_normalization`` and ``cfg_truncation`` act as in ZImagePipeline. Entity embeddings are ``(T_i, D)``
        each, any length (the transformer pads every segment itself, so ``entity_tokens="trim"`` changes nothing).
        ``output_type="latent"`` gives spatial latents ``(B, C, h, w)`` as ZImagePipeline does. Z-Image has no
        IP-Adapter in diffusers: entity images are refused.
    """)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float | None = None,
        cfg_normalization: bool | float = False,
        cfg_truncation: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        entities: Sequence[Entity] | None = None,
        entity_prompts: Sequence[str] | None = None,
        entity_prompt_embeds: Sequence[torch.Tensor] | None = None,
        entity_masks: Sequence[Any] | None = None,
        entities_on_negative: bool = False,
        true_cfg_scale: float | None = None,
        cfg_mode: str | None = None,
        shift_sigmas: bool = True,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        image: Any = None,
        inpaint: bool = False,
        strength: float = 1.0,
        fusion: str = "exact",
        mask_dilate: int = 0,
        mask_blur: float = 0.0,
        paste_back: bool = True,
        attention: str = "auto",
        entity_tokens: str = "full",
        compile: bool = False,
        entity_steps: int | None = None,
    ) -> ZImagePipelineOutput | tuple:
        return self._eligen_call(Call.of(locals(), "joint_attention_kwargs"))


def _rows(context: torch.Tensor, text_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """``(B, T, D)`` -> each sample's real tokens."""
    if text_mask is None:
        return list(context.unbind(0))
    return [row[valid] for row, valid in zip(context, text_mask, strict=True)]


def _padded(rows: Sequence[torch.Tensor], text_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A callback's prompt embeddings (a list of ``(T_b, D)``, or ``(B, T, D)``) back in the branch's layout."""
    if isinstance(rows, torch.Tensor):
        return rows
    lengths = [r.shape[0] for r in rows]
    expected = [int(v.sum()) for v in text_mask] if text_mask is not None else [like.shape[1]] * like.shape[0]
    if lengths != expected:
        raise ValueError(f"a step callback returned prompt_embeds of lengths {lengths}; keep the lengths {expected}")
    return pad_sequence(list(rows), batch_first=True)

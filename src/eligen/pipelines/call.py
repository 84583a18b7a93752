"""The one ``__call__`` body of every EliGen pipeline (docs/design.md section 1), numbered as diffusers' are:

0. validate, and fill what the call leaves out from the model's declared defaults, else its diffusers pipeline's;
1. encode the text and the entities into the CFG branches (each branch's sequence, positions and regional mask,
   built once per call);
2. prepare the latents and the embedded guidance;
3. run the shared loop (:func:`eligen.sampling.denoise`) with inpainting fusion;
4. decode (and for inpainting restore the input's size and paste its pixels back).

A pipeline supplies the family hooks below (``_check_parent_inputs``, ``_encode_branch``, ``_negative_given``,
``_initial_latents``, and optionally ``_image_prompts``, ``_schedule_mu`` and ``_regional_cover``); everything
else is shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..entities import LayoutError
from ..families.base import Branch
from ..inpaint import InpaintSource, pack_mask, prepare_source, restore, soft_union
from ..masks import latent_grid_size
from ..regional.lora import entity_lora_tokens
from ..regional.parallel import check_context_parallel
from ..regional.processors import check_regional_attention_support, install_regional_processors
from ..regional.sequence import TokenSequence
from ..sampling import Fusion, denoise
from ..schedules import flow_timesteps
from .arguments import Call, check_finite, check_scales, check_whole
from .entities import ResolvedEntities, resolve_entities
from .entity_lora import EntityLoraScope, entity_adapters
from .memory import check_memory
from .mixin import EliGenMixin, logger

# eligen_defaults.json keys -> the call fields they fill when a call leaves them out
DECLARED_ARGUMENTS = {"steps": "num_inference_steps", "true_cfg": "true_cfg_scale", "guidance": "guidance_scale",
                      "max_sequence_length": "max_sequence_length"}


def cache_context(transformer, name: str):
    """diffusers' ``transformer.cache_context(name)`` (a step cache's state per CFG branch); a transformer without
    cache support (not a diffusers ``CacheMixin``) runs every branch without one."""
    context = getattr(transformer, "cache_context", None)
    return context(name) if context is not None else contextlib.nullcontext()


class EliGenCallMixin(EliGenMixin):
    """The shared call. ``attention_kwargs_name``: the diffusers argument (and ``_<name>`` attribute) holding the
    attention kwargs; ``output_class``: the diffusers output of the family's pipeline."""

    attention_kwargs_name: ClassVar[str] = "joint_attention_kwargs"
    output_class: ClassVar[type]
    _current_timestep: torch.Tensor | None  # set during a call (diffusers' ``current_timestep`` reads it)
    _entity_lora_scope: EntityLoraScope | None = None  # the entity LoRAs of the running call's loop, if any

    # -- family hooks -------------------------------------------------------------------------------------------

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        """Every check the diffusers parent makes on the call's arguments (its ``check_inputs`` and the rest)."""
        raise NotImplementedError

    def _encode_branch(self, call: Call, negative: bool, device: torch.device) -> Branch:
        """The global (or negative) prompt encoded as the parent encodes it: a branch without entities."""
        raise NotImplementedError

    def _negative_given(self, call: Call) -> bool:
        """Whether the call gives a negative prompt (so true CFG can run)."""
        return call.negative_prompt is not None or call.negative_prompt_embeds is not None

    def _initial_latents(self, call: Call, batch: int, size: tuple[int, int], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
        """The parent's ``prepare_latents``: packed latents ``(B, n_img, C)``."""
        raise NotImplementedError

    def _schedule_mu(self, image_seq_len: int, num_inference_steps: int) -> float:
        """The schedule's shift ``mu`` for this call: the family's rule (:meth:`ModelFamily.schedule_mu`); a pipeline
        whose parent fixes it for some checkpoints (a distilled one's) overrides this."""
        return self.family.schedule_mu(self.scheduler.config, image_seq_len, num_inference_steps)

    def _regional_cover(self, cover: torch.Tensor) -> torch.Tensor:
        """The token covers ``(B, N, n_img)`` the regional mask is built from; an edit pipeline appends the tokens of
        its input image (docs/design.md section 21). By default the entities' own."""
        return cover

    def _image_prompts(self, call: Call, branches: dict[str, Branch], ents: ResolvedEntities | None, batch: int,
                       size: tuple[int, int], device: torch.device) -> None:
        """Image prompts (an IP-Adapter's) on the branches; a family without refuses entity images."""
        for i, entity in enumerate(call.entity.entities or []):
            if getattr(entity, "image", None) is not None:
                raise LayoutError(f"{self.family.card.title} has no IP-Adapter in diffusers, so an entity cannot carry "
                                  "a reference image here; drop 'image'", entity=i, field="image")

    def _controls(self, call: Call, branches: dict[str, Branch], ents: ResolvedEntities | None, batch: int,
                  size: tuple[int, int], device: torch.device) -> None:
        """ControlNet inputs (a ControlNet pipeline's, :mod:`eligen.pipelines.controlnet`); a pipeline without a
        ControlNet refuses entity control images by name."""
        for i, entity in enumerate(call.entity.entities or []):
            if getattr(entity, "control_image", None) is not None:
                from ..families import controlnet_titles

                raise LayoutError(f"this {self.family.card.title} pipeline has no ControlNet, so an entity cannot "
                                  f"carry a control image; ControlNet runs on {controlnet_titles()} (load the "
                                  "family's ControlNet pipeline with a controlnet, or pass --controlnet), or drop "
                                  "'control_image'", entity=i, field="control_image")

    # -- the call -----------------------------------------------------------------------------------------------

    def _eligen_call(self, call: Call):
        # 0. Validate; what the call leaves out comes from the model's declared defaults, else diffusers'.
        self._fill_defaults(call)
        assert call.true_cfg_scale is not None and call.max_sequence_length is not None  # filled by _fill_defaults
        combine = self.family.combine(call.cfg_mode or self.family.default_cfg)
        source, height, width, work = self._source_and_size(call)
        do_true_cfg = call.true_cfg_scale > 1 and self._negative_given(call)
        if call.true_cfg_scale > 1 and not self._negative_given(call):
            logger.warning(f"true_cfg_scale is {call.true_cfg_scale} but no negative prompt is given: CFG is off")
        self._check_parent_inputs(call, work, do_true_cfg)
        self._begin(call)
        batch = call.batch_size * call.num_images_per_prompt
        device = self._execution_device
        form = self.attention_mode(call.speed.attention, device)
        check_memory(self, batch, work, call.entity.given and form == "dense", device)

        # 1. Text: the global prompt, the entity segments, the negative prompt; the CFG branches.
        positive = self._encode_branch(call, negative=False, device=device)
        prompt_embeds = positive.context
        ents = resolve_entities(self, call.entity, height, width, batch, call.max_sequence_length, device,
                                prompt_embeds.dtype, grid=work, text_width=prompt_embeds.shape[-1])
        if call.speed.compile:
            self.compile_transformer()
        if source is not None and ents is None:
            raise ValueError("inpainting needs at least one entity: the entity masks mark what to repaint")
        negative = self._encode_branch(call, negative=True, device=device) if do_true_cfg else None
        branches = self._branches(ents, positive, negative, form, call.entity.entities_on_negative)
        self._image_prompts(call, branches, ents, batch, work, device)
        self._controls(call, branches, ents, batch, work, device)

        # 2. Latents and embedded guidance.
        latents = self._initial_latents(call, batch, work, prompt_embeds.dtype, device)
        guidance = self._guidance(call.guidance_scale, latents.shape[0], device)
        on_step_end = self._step_callback(call, branches, ents, prompt_embeds)

        # 3. The shared loop: schedule, inpainting fusion, Euler steps on the true-CFG velocity (the entity LoRAs
        # switched on and scoped to their tokens for the loop only).
        with self._entity_loras(call, branches, ents) as scope:
            self._entity_lora_scope = scope
            try:
                latents = self._run(call, latents, branches, ents, source, work, guidance, combine, on_step_end)
            finally:
                self._entity_lora_scope = None

        # 4. Decode.
        image = self._output(call, latents, ents, source, work)
        self.maybe_free_model_hooks()
        return self.output_class(images=image) if call.return_dict else (image,)

    def _fill_defaults(self, call: Call) -> None:
        """Arguments the call left as None -> the model's declared defaults, else the family pipeline's; a call that
        leaves true CFG to a model declaring it above 1 runs it with an empty negative prompt when none is given
        (as the CLI does). Then every scale and given tensor is checked for NaN / inf, the scales' size and the
        number of steps."""
        declared = {DECLARED_ARGUMENTS[k]: v for k, v in self.eligen_defaults.items() if k in DECLARED_ARGUMENTS}
        stated = self.eligen_defaults.get("true_cfg")
        if (call.true_cfg_scale is None and stated is not None and stated > 1 and call.negative_prompt is None
                and call.negative_prompt_embeds is None):
            call.negative_prompt = ""
        fallbacks = self.family.card.defaults
        for name, fallback in (("num_inference_steps", fallbacks.steps), ("true_cfg_scale", fallbacks.true_cfg),
                               ("guidance_scale", fallbacks.guidance),
                               ("max_sequence_length", fallbacks.max_sequence_length)):
            if getattr(call, name) is None:
                setattr(call, name, declared.get(name, fallback))
        tensors = {k: v for k, v in call.extra.items() if k.endswith("_embeds")}
        check_finite(true_cfg_scale=call.true_cfg_scale, guidance_scale=call.guidance_scale, latents=call.latents,
                     prompt_embeds=call.prompt_embeds, negative_prompt_embeds=call.negative_prompt_embeds,
                     entity_prompt_embeds=call.entity.entity_prompt_embeds, **tensors)
        check_scales(true_cfg_scale=call.true_cfg_scale, guidance_scale=call.guidance_scale)
        check_whole("num_inference_steps", call.num_inference_steps, 1)

    def _source_and_size(self, call: Call) -> tuple[InpaintSource | None, int, int, tuple[int, int]]:
        """The inpainting input (or None), the output size and the working size (the patch grid) of a call."""
        height, width, source = call.height, call.width, None
        for name in ("height", "width"):
            check_whole(name, getattr(call, name), self.patch_grid, " of pixels")
        if call.inpainting.active:
            source = prepare_source(call.inpainting.image, height, width, self.patch_grid)
            height, width = source.size
        height, width = self._size(height, width, inpainting=source is not None)
        return source, height, width, source.work_size if source else (height, width)

    def _begin(self, call: Call) -> None:
        """The state diffusers' pipelines keep during a call (their properties read it)."""
        self._guidance_scale = call.guidance_scale
        setattr(self, f"_{self.attention_kwargs_name}", call.attention_kwargs)
        self._eligen_attention_kwargs = call.attention_kwargs
        self._current_timestep = None
        self._interrupt = False

    # -- 1. the branches ------------------------------------------------------------------------------------------

    def _branches(self, ents: ResolvedEntities | None, positive: Branch, negative: Branch | None, form: str,
                  entities_on_negative: bool) -> dict[str, Branch]:
        """The CFG branches with their full text sequences, text positions and regional masks (built once per call
        and branch). The negative branch has no entities unless ``entities_on_negative`` (the reference's "enable
        on negative": the negative prompt in every entity slot, under the same masks)."""
        branches = {"cond": positive}
        if ents is not None:
            install_regional_processors(self.transformer, self.family.processors)
            check_regional_attention_support(self.transformer, backend=form)
            check_context_parallel(self.transformer, form, self.family.name, self.family.context_parallel)
            sequence = ents.sequence(positive.context.shape[1])
            cover = self._regional_cover(ents.cover)
            self._join(positive, sequence, ents.embeds, sequence.mask(cover, form, self._flex_slot("cond")))
        self._place(positive)
        if negative is None:
            return branches
        branches["uncond"] = negative
        if ents is not None and entities_on_negative:
            length = negative.context.shape[1]
            sequence = TokenSequence.of([length] * len(ents.embeds), length)
            same = sequence == positive.sequence
            mask = positive.attention_mask if same else sequence.mask(self._regional_cover(ents.cover), form,
                                                                      self._flex_slot("uncond"))
            self._join(negative, sequence, [negative.context] * len(ents.embeds), mask)
        self._place(negative)
        return branches

    def _join(self, branch: Branch, sequence: TokenSequence, entity_embeds: Sequence[torch.Tensor],
              regional: Any) -> None:
        """Put the entity segments before the branch's global text, with the regional mask and the family's
        padding rule."""
        global_valid = branch.text_mask
        branch.context = sequence.join(entity_embeds, branch.context)
        branch.sequence = sequence
        valid = sequence.text_valid(global_valid) if global_valid is not None else None
        branch.text_mask, branch.attention_mask = self.family.padding(sequence, valid, regional)

    def _place(self, branch: Branch) -> None:
        """The family's text positions of the branch's sequence."""
        assert branch.sequence is not None  # set by Branch.__post_init__
        branch.positions = self.family.positions(branch.sequence, branch.context.device, self._text_dtype())

    def _entity_loras(self, call: Call, branches: dict[str, Branch], ents: ResolvedEntities | None):
        """The entities' LoRAs (docs/design.md section 22): their adapters (files loaded once), each branch's token
        weights, and the scope that applies them during the loop; a null context without entity LoRAs."""
        entities = call.entity.entities if ents is not None else None
        adapters = entity_adapters(self, entities)
        if not any(adapters):
            return contextlib.nullcontext()
        assert ents is not None and entities is not None  # adapters come from the call's entities
        scales = [getattr(e, "lora_scale", 1.0) for e in entities]
        for name, branch in branches.items():
            assert branch.sequence is not None  # set by Branch.__post_init__
            tokens = entity_lora_tokens(branch.sequence, ents.cover, adapters, scales, with_text=name == "cond")
            branch.lora_tokens = tokens
        return EntityLoraScope(self.transformer, self.family, {a for a in adapters if a is not None})

    # -- 2. guidance and callbacks --------------------------------------------------------------------------------

    def _guidance(self, guidance_scale: float | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """The embedded guidance ``(B,)`` for guidance-distilled transformers, else None."""
        if not getattr(self.transformer.config, "guidance_embeds", False):
            return None
        if guidance_scale is None:
            raise ValueError("this transformer is guidance-distilled: pass guidance_scale")
        return torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)

    def _step_callback(self, call: Call, branches: dict[str, Branch], ents: ResolvedEntities | None,
                       prompt_embeds: torch.Tensor) -> Callable:
        """diffusers' ``callback_on_step_end`` as the loop's ``on_step_end``: a callback that returns new
        ``prompt_embeds`` rebuilds the positive branch's text sequence (and sees them on the next step)."""
        callback, names = call.callback_on_step_end, call.callback_on_step_end_tensor_inputs
        state = {"prompt_embeds": prompt_embeds}

        def on_step_end(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            if callback is None:
                return latents
            state["latents"] = latents
            outputs = callback(self, i, t, {k: state[k] for k in names})
            if "prompt_embeds" in outputs:
                state["prompt_embeds"] = embeds = outputs.pop("prompt_embeds")
                cond = branches["cond"]
                assert cond.sequence is not None  # set by Branch.__post_init__
                cond.context = cond.sequence.join(ents.embeds, embeds) if ents is not None else embeds
            return outputs.pop("latents", latents)

        return on_step_end

    # -- 3. the loop ----------------------------------------------------------------------------------------------

    def _velocity(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                  guidance: torch.Tensor | None) -> torch.Tensor:
        """One transformer forward of one branch (its regional mask, if any, reaches every attention layer, and its
        entity LoRA weights every layer an entity LoRA adapts)."""
        scope = getattr(self, "_entity_lora_scope", None)
        if scope is not None:
            scope.current = branch.lora_tokens
        return self.family.forward(self.transformer, latents, timestep, branch, geometry, guidance,
                                   self._eligen_attention_kwargs)

    def _run(self, call: Call, latents: torch.Tensor, branches: dict[str, Branch], ents: ResolvedEntities | None,
             source: InpaintSource | None, size: tuple[int, int], guidance: torch.Tensor | None, combine: Callable,
             on_step_end: Callable) -> torch.Tensor:
        """Schedule, inpainting set-up and the shared loop from prepared latents ``(B, n_img, C)``."""
        if ents is not None and ents.cover.shape[-1] != latents.shape[1]:
            raise ValueError(f"`latents` hold {latents.shape[1]} tokens but the entity masks were rasterised for "
                             f"{ents.cover.shape[-1]} ({size[1]}x{size[0]}); pass matching height/width")
        assert call.num_inference_steps is not None  # filled by _fill_defaults
        mu = self._schedule_mu(latents.shape[1], call.num_inference_steps)
        scheduler, timesteps, steps = flow_timesteps(self.scheduler, call.num_inference_steps, call.sigmas,
                                                     call.shift_sigmas, latents.shape[1], latents.device, mu)
        lat_h, lat_w = latent_grid_size(*size, self.vae_scale_factor, self.family.patch_size)
        geometry = self.family.geometry(self, latents.shape[0], lat_h, lat_w, latents.device, latents.dtype)
        plan = None
        if source is not None and ents is not None:
            latents, timesteps, plan = self._fusion_plan(call, latents, ents, source, scheduler, timesteps, steps)
        self._num_timesteps = len(timesteps)
        branch_at = self._entity_step_plan(branches, ents, call.speed.entity_steps, len(timesteps))

        def velocity(z: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
            self._current_timestep = t
            timestep = t.expand(z.shape[0]).to(z.dtype)
            with cache_context(self.transformer, name):
                return self._velocity(z, timestep / 1000, branches[name], geometry, guidance)

        cfg = call.true_cfg_scale if "uncond" in branches else None
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            latents = denoise(velocity, latents, scheduler, timesteps, cfg, combine, plan, on_step_end, progress_bar,
                              lambda: self.interrupt, branch_at)
        self._current_timestep = None
        return latents

    def _fusion_plan(self, call: Call, latents: torch.Tensor, ents: ResolvedEntities, source: InpaintSource,
                     scheduler, timesteps: torch.Tensor, steps: int):
        """Inpainting: the input's latents, the soft union of the entity masks, and the start of the schedule
        (``strength`` below 1 starts from the partly noised input)."""
        options = call.inpainting
        z_init = self.encode_image_latents(source.work_rgb, latents.device, latents.dtype)
        z_init = z_init.expand(latents.shape[0], -1, -1)
        latent_union = soft_union(ents.latent_masks.cpu(), options.mask_dilate, options.mask_blur)
        patch = self.family.patch_size
        union = pack_mask(latent_union, latents.shape[-1] // patch**2, patch).to(latents.device, latents.dtype)
        t_start = len(timesteps) - max(1, int(steps * options.strength))
        scheduler.set_begin_index(t_start)
        sigma_start = scheduler.sigmas[t_start].to(device=latents.device, dtype=latents.dtype)
        latents = sigma_start * latents + (1 - sigma_start) * z_init
        return latents, timesteps[t_start:], Fusion(z_init, union, options.fusion, t_start)

    def _entity_step_plan(self, branches: dict[str, Branch], ents: ResolvedEntities | None, entity_steps: int | None,
                          steps: int) -> Callable[[int, str], str] | None:
        """``entity_steps=k``: each branch that carries entities runs them in the first ``k`` steps only, then
        without its entity segments and mask, i.e. the plain forward of its global prompt (the regional-prompting
        trade: late steps refine details, the layout is set early). Approximate; None when every step is exact.
        The entity-free branches are new names (``"cond-global"``), so a step cache keeps their state apart."""
        if entity_steps is None or ents is None or entity_steps >= steps:
            return None
        for name in [n for n, b in branches.items() if b.attention_mask is not None]:
            branch = branches[name]
            sequence = branch.sequence
            assert sequence is not None  # set by Branch.__post_init__
            late = dataclasses.replace(  # keeps the branch's other conditioning (a global IP-Adapter image)
                branch, context=sequence.global_part(branch.context), attention_mask=None,
                text_mask=None if branch.text_mask is None else sequence.global_part(branch.text_mask),
                sequence=sequence.global_only())
            if hasattr(late, "entity_ip"):
                late.entity_ip = None  # an entity's image goes with its entity
            if late.lora_tokens is not None:  # an entity's LoRA keeps its image tokens; its text is gone
                late.lora_tokens = late.lora_tokens.without_text(sequence.global_length)
            self._place(late)
            branches[f"{name}-global"] = late
        return lambda i, name: name if i < entity_steps or f"{name}-global" not in branches else f"{name}-global"

    # -- 4. the output --------------------------------------------------------------------------------------------

    def _output(self, call: Call, latents: torch.Tensor, ents: ResolvedEntities | None,
                source: InpaintSource | None, size: tuple[int, int]):
        """Decode (and for inpainting restore the input's size and paste the untouched pixels back)."""
        if call.output_type == "latent":
            return latents
        image = self.family.decode(self, latents, *size)
        if source is None or ents is None:
            return self.image_processor.postprocess(image, output_type=call.output_type)
        keep = None
        options = call.inpainting
        if options.paste_back:  # the union at pixel precision, grown and softened like the latent one
            f = self.vae_scale_factor
            keep = soft_union(ents.pixel_union(*source.size)[None], options.mask_dilate * f,
                              options.mask_blur * f).numpy()
        # the input is RGB: a decoder that gives RGBA has its alpha dropped
        images = self.image_processor.postprocess(image, output_type="np")[..., :3]
        images = restore((images * 255).round().astype(np.uint8), source, keep)  # as diffusers makes PIL images
        if call.output_type == "pil":
            return [Image.fromarray(im) for im in images]
        as_float = images.astype(np.float32) / 255
        return as_float if call.output_type == "np" else torch.from_numpy(as_float).permute(0, 3, 1, 2)

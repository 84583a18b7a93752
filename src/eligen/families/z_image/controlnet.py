"""EliGenZImageControlNetPipeline: diffusers' ZImageControlNetPipeline with entity prompts and regional attention, a
global control image and per-entity control images (docs/design.md section 23).

Z-Image's ControlNet returns per-layer hints over its own joint sequence ``[image | image padding | caption]``, which
the transformer adds to its unified stream after the main layers they name. The ControlNet runs in every transformer
call on that call's latents and its branch's global prompt (the CFG branches batched as ZImagePipeline batches them,
so without entities every step is stock ZImageControlNetPipeline, bit for bit); an entity's control image gives
hints that reach only the image tokens its mask covers (:func:`eligen.pipelines.controlnet.weighted`), and the
regional forward lays the summed hints onto its joint sequence (:func:`.model.hints_in_layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput
from diffusers.pipelines.z_image.pipeline_z_image_controlnet import ZImageControlNetPipeline, retrieve_latents

from ...entities import Entity
from ...pipelines.arguments import Call, eligen_call_doc
from ...pipelines.controlnet import ControlNetMixin, control_keep, masked_sum
from ..base import Branch
from .model import Z_IMAGE_CONTROLNET, Control
from .pipeline import ZImageHooks


# ZImageControlNetPipeline types its _guidance_scale float; the shared call's may be None before a call
class EliGenZImageControlNetPipeline(ControlNetMixin, ZImageHooks, ZImageControlNetPipeline):  # type: ignore[misc]
    """Z-Image with a ``ZImageControlNetModel`` and EliGen entity control; an entity may carry its own control
    image."""

    family = Z_IMAGE_CONTROLNET
    controlnet_class = "ZImageControlNetModel"
    multi_controlnet_class = None  # diffusers has no several-ControlNets wrapper for Z-Image

    def _control_condition(self, image: Any, batch: int, call: Call, size: tuple[int, int], device: torch.device,
                           dtype: torch.dtype) -> torch.Tensor:
        """ZImageControlNetPipeline's preparation: the image resized to the output size, its VAE latents' mode,
        shifted and scaled, one frame ``(B, C, 1, h, w)``, zero channels appended up to the ControlNet's
        ``control_in_dim`` (the 2.0 ControlNets)."""
        height, width = size
        image = self.prepare_image(image=image, width=width, height=height, batch_size=batch,
                                   num_images_per_prompt=call.num_images_per_prompt, device=device,
                                   dtype=self.vae.dtype)
        if tuple(image.shape[-2:]) != (height, width):
            raise ValueError(f"a control image tensor is {image.shape[-1]}x{image.shape[-2]} but the image is "
                             f"{width}x{height}; pass it at the output size (or as a PIL image, which is resized)")
        latents = retrieve_latents(self.vae.encode(image), generator=call.generator, sample_mode="argmax")
        latents = ((latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor).unsqueeze(2)
        extra = self.controlnet.config.control_in_dim - self.transformer.in_channels
        if extra:
            latents = torch.cat([latents, latents.new_zeros(latents.shape[0], extra, *latents.shape[2:])], dim=1)
        return latents

    def _velocity(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                  guidance: torch.Tensor | None) -> torch.Tensor:
        """Z-Image's own (its CFG batching); the hints come with each transformer call (:meth:`_control_hints`)."""
        return ZImageHooks._velocity(self, latents, timestep, branch, geometry, guidance)

    def _control_hints(self, latents: torch.Tensor) -> Control | None:
        """The ControlNet of the step whose latents are ``latents``: every control input at its scale times the
        step's keep, an entity's hints weighted by its token cover, summed layer by layer."""
        plan = self._control_plan
        if plan is None:
            return None
        if plan.latents is not latents:
            plan.step, plan.latents = plan.step + 1, latents
        keep = control_keep(plan.step, self._num_timesteps, plan.starts, plan.ends)[0]

        def control(images: list[torch.Tensor], time: torch.Tensor, captions: list[torch.Tensor]):
            parts, places = [], []
            for control_input in plan.inputs:
                scale = control_input.scale
                scale = (scale[0] if isinstance(scale, list) else scale) * keep
                cond = control_input.cond.repeat(len(images) // control_input.cond.shape[0], 1, 1, 1, 1)
                hints = self.controlnet(images, time, captions, cond, conditioning_scale=scale)
                places = list(hints)
                parts.append(((list(hints.values()),), control_input.weight))
            return dict(zip(places, masked_sum(parts)[0], strict=True))

        return control

    @torch.no_grad()
    @eligen_call_doc("diffusers' ZImageControlNetPipeline", """
        ControlNet (docs/design.md section 23): ``control_image`` and ``controlnet_conditioning_scale`` as in
        ZImageControlNetPipeline (the global control, hints on every image token and the global prompt's tokens;
        optional when an entity carries a control image), ``control_guidance_start`` / ``_end`` the fractions of
        the steps it acts in. An entity's ``control_image`` runs the same ControlNet at its ``control_scale``, and
        its hints reach only the image tokens it covers. The ControlNet reads each CFG branch's global prompt alone.
        CFG as in EliGenZImagePipeline (``guidance_scale`` or ``true_cfg_scale = 1 + guidance_scale``).
    """)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float = 0.75,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
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

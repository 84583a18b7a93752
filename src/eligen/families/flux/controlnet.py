"""EliGenFluxControlNetPipeline: diffusers' FluxControlNetPipeline with entity prompts and regional attention, a
global control image and per-entity control images (docs/design.md section 23).

The ControlNet reads the global prompt alone and stock attention, as diffusers runs it; an entity's control image
gives residuals that reach only the image tokens its mask covers (:mod:`eligen.pipelines.controlnet`). With no
entities and no entity control images every step is stock FluxControlNetPipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import FluxControlNetPipeline
from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipelineOutput
from diffusers.pipelines.flux.pipeline_flux_controlnet import retrieve_latents

from ...entities import Entity
from ...pipelines.arguments import Call, eligen_call_doc
from ...pipelines.controlnet import ControlNetMixin, Residuals
from ..base import Branch
from .model import FLUX_CONTROLNET
from .pipeline import FluxHooks


class EliGenFluxControlNetPipeline(ControlNetMixin, FluxHooks, FluxControlNetPipeline):
    """FLUX.1 with a ControlNet (one ``FluxControlNetModel``, or a ``FluxMultiControlNetModel`` for the global
    control images) and EliGen entity control; an entity may carry its own control image."""

    family = FLUX_CONTROLNET
    controlnet_class = "FluxControlNetModel"
    multi_controlnet_class = FluxMultiControlNetModel

    def _first_net(self):
        net = self.controlnet
        return net.nets[0] if isinstance(net, FluxMultiControlNetModel) else net

    def _control_condition(self, image: Any, batch: int, call: Call, size: tuple[int, int], device: torch.device,
                           dtype: torch.dtype) -> torch.Tensor:
        """FluxControlNetPipeline's step 3: the image resized to the output size; for a ControlNet without an input
        hint block, its VAE latents (sampled with the call's generator), normalised and packed."""
        height, width = size
        image = self.prepare_image(image=image, width=width, height=height, batch_size=batch,
                                   num_images_per_prompt=call.num_images_per_prompt, device=device,
                                   dtype=self.vae.dtype)
        if tuple(image.shape[-2:]) != (height, width):
            raise ValueError(f"a control image tensor is {image.shape[-1]}x{image.shape[-2]} but the image is "
                             f"{width}x{height}; pass it at the output size (or as a PIL image, which is resized)")
        if self._first_net().input_hint_block is not None:
            return image
        latents = retrieve_latents(self.vae.encode(image), generator=call.generator)
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return self._pack_latents(latents, batch, self.transformer.config.in_channels // 4, *latents.shape[2:])

    def _control_mode(self, mode: Any, rows: int, device: torch.device, count: int) -> Any:
        """FluxControlNetPipeline's ``control_mode``: an int (a union ControlNet's mode) or None; a list per ControlNet
        of a MultiControlNet (None there is -1)."""
        if isinstance(self.controlnet, FluxMultiControlNetModel):
            if isinstance(mode, list) and len(mode) != count:
                raise ValueError("For Multi-ControlNet, `control_mode` must be a list of the same  length as the "
                                 "number of controlnets (control images) specified")
            modes = mode if isinstance(mode, list) else [mode] * count
            return [torch.tensor(-1 if m is None else m).expand(rows).to(device, dtype=torch.long) for m in modes]
        if mode is None:
            return None
        if not isinstance(mode, int):
            raise ValueError(" For `FluxControlNet`, `control_mode` should be an `int` or `None`")
        return torch.tensor(mode).to(device, dtype=torch.long).view(-1, 1).expand(rows, 1)

    def _controlnet_forward(self, cond: Any, scale: Any, mode: Any, latents: torch.Tensor, timestep: torch.Tensor,
                            text: Branch, geometry) -> Residuals:
        use_guidance = self._first_net().config.guidance_embeds
        guidance = torch.tensor([self._guidance_scale], device=latents.device) if use_guidance else None
        guidance = guidance.expand(latents.shape[0]) if guidance is not None else None
        return tuple(self.controlnet(
            hidden_states=latents, controlnet_cond=cond, controlnet_mode=mode, conditioning_scale=scale,
            timestep=timestep, guidance=guidance, pooled_projections=text.pooled, encoder_hidden_states=text.context,
            txt_ids=text.positions, img_ids=geometry, joint_attention_kwargs=self._eligen_attention_kwargs,
            return_dict=False))

    def _residual_kwargs(self, residuals: Residuals) -> dict[str, Any]:
        blocks, single = residuals
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single,
                "controlnet_blocks_repeat": self._first_net().input_hint_block is not None}

    @torch.no_grad()
    @eligen_call_doc("diffusers' FluxControlNetPipeline", """
        ControlNet (docs/design.md section 23): ``control_image``, ``controlnet_conditioning_scale``,
        ``control_mode``, ``control_guidance_start`` / ``_end`` as in FluxControlNetPipeline (the global control,
        residuals everywhere; optional when an entity carries a control image). An entity's ``control_image`` runs
        the same ControlNet at its ``control_scale``, and its residuals reach only the image tokens it covers. The
        ControlNet reads the global prompt alone. IP-Adapter and entity images as in EliGenPipeline.
    """)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        entities: Sequence[Entity] | None = None,
        entity_prompts: Sequence[str] | None = None,
        entity_prompt_embeds: Sequence[torch.Tensor] | None = None,
        entity_masks: Sequence[Any] | None = None,
        entities_on_negative: bool = False,
        true_cfg_scale: float | None = None,
        cfg_mode: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        shift_sigmas: bool = True,
        guidance_scale: float | None = None,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        control_image: Any = None,
        control_mode: int | list[int] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: Any = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
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
    ) -> FluxPipelineOutput | tuple:
        return self._eligen_call(Call.of(locals(), "joint_attention_kwargs"))

"""EliGenQwenImageControlNetPipeline: diffusers' QwenImageControlNetPipeline with entity prompts and regional
attention, a global control image and per-entity control images (docs/design.md section 23).

The ControlNet reads the global prompt alone (its text and padding mask) and stock attention, as diffusers runs it;
an entity's control image gives residuals that reach only the image tokens its mask covers
(:mod:`eligen.pipelines.controlnet`). With no entities and no entity control images every step is stock
QwenImageControlNetPipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.models.controlnets.controlnet_qwenimage import QwenImageMultiControlNetModel
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.qwenimage.pipeline_qwenimage_controlnet import QwenImageControlNetPipeline, retrieve_latents

from ...entities import Entity
from ...pipelines.arguments import Call, eligen_call_doc
from ...pipelines.controlnet import ControlNetMixin, Residuals
from ..base import Branch, framed_latent_statistics
from .model import QWEN_IMAGE_CONTROLNET
from .pipeline import QwenImageHooks


class EliGenQwenImageControlNetPipeline(ControlNetMixin, QwenImageHooks, QwenImageControlNetPipeline):
    """Qwen-Image with a ControlNet (one ``QwenImageControlNetModel``, or a ``QwenImageMultiControlNetModel`` for the
    global control images) and EliGen entity control; an entity may carry its own control image."""

    family = QWEN_IMAGE_CONTROLNET
    controlnet_class = "QwenImageControlNetModel"
    multi_controlnet_class = QwenImageMultiControlNetModel

    def _control_condition(self, image: Any, batch: int, call: Call, size: tuple[int, int], device: torch.device,
                           dtype: torch.dtype) -> torch.Tensor:
        """QwenImageControlNetPipeline's step 3: the image resized to the output size, its VAE latents (one frame,
        sampled with the call's generator), normalised and packed."""
        height, width = size
        image = self.prepare_image(image=image, width=width, height=height, batch_size=batch,
                                   num_images_per_prompt=call.num_images_per_prompt, device=device,
                                   dtype=self.vae.dtype)
        if tuple(image.shape[-2:]) != (height, width):
            raise ValueError(f"a control image tensor is {image.shape[-1]}x{image.shape[-2]} but the image is "
                             f"{width}x{height}; pass it at the output size (or as a PIL image, which is resized)")
        if image.ndim == 4:
            image = image.unsqueeze(2)
        mean, inv_std = framed_latent_statistics(self.vae, device, torch.float32)
        latents = (retrieve_latents(self.vae.encode(image), generator=call.generator) - mean) * inv_std
        latents = latents.permute(0, 2, 1, 3, 4)
        return self._pack_latents(latents, batch_size=latents.shape[0], num_channels_latents=latents.shape[2],
                                  height=latents.shape[3], width=latents.shape[4]).to(dtype=dtype, device=device)

    def _controlnet_forward(self, cond: Any, scale: Any, mode: Any, latents: torch.Tensor, timestep: torch.Tensor,
                            text: Branch, geometry) -> Residuals:
        return (self.controlnet(
            hidden_states=latents, controlnet_cond=cond, conditioning_scale=scale, timestep=timestep,
            encoder_hidden_states=text.context, encoder_hidden_states_mask=text.text_mask, img_shapes=geometry,
            return_dict=False),)

    def _residual_kwargs(self, residuals: Residuals) -> dict[str, Any]:
        return {"controlnet_block_samples": residuals[0]}

    @torch.no_grad()
    @eligen_call_doc("diffusers' QwenImageControlNetPipeline", """
        ControlNet (docs/design.md section 23): ``control_image``, ``controlnet_conditioning_scale``,
        ``control_guidance_start`` / ``_end`` as in QwenImageControlNetPipeline (the global control, residuals
        everywhere; optional when an entity carries a control image). An entity's ``control_image`` runs the same
        ControlNet at its ``control_scale``, and its residuals reach only the image tokens it covers. The ControlNet
        reads the global prompt alone. The default ``cfg_mode`` is "rescaled" (diffusers').
    """)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
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
    ) -> QwenImagePipelineOutput | tuple:
        return self._eligen_call(Call.of(locals(), "attention_kwargs"))

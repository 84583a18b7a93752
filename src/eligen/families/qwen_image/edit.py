"""EliGenQwenImageEditPlusPipeline: diffusers' QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 / 2511, an
instruction-following edit model on Qwen-Image's transformer) with entity prompts and regional attention: each
entity is a local instruction and a mask, edited in one pass (docs/design.md section 21).

The pipeline appends the input images' packed latents (the reference tokens, one more frame each in ``img_shapes``)
after the image tokens of every forward and keeps only the image tokens' velocity; the global prompt is encoded with
the input images (Qwen2.5-VL sees them). For the regional rule the reference tokens are image tokens covered by every
entity. Entity instructions are encoded with the edit template and without the images. With ``keep_outside``
(default) and entities, latents outside the union of the entity masks end exactly at the input's (inpainting fusion);
with no entities every step is stock QwenImageEditPlusPipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as stock_module
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput

from ...entities import Entity
from ...inpaint import InpaintSource
from ...masks import reference_cover
from ...pipelines.arguments import Call, edit_arguments, eligen_call_doc
from ...pipelines.call import EliGenCallMixin
from ..base import Branch
from . import processor as _processor  # noqa: F401  (a saved tiny pipeline names its processor class there)
from .model import QWEN_IMAGE_EDIT_PLUS


@dataclasses.dataclass
class EditImages:
    """The input images as QwenImageEditPlusPipeline prepares them: the condition images the text encoder sees,
    the VAE images ``(1, 3, 1, H, W)`` and their token grids; after ``_initial_latents`` their packed latents."""

    condition: list[Any]
    vae: list[torch.Tensor]
    shapes: list[tuple[int, int, int]]
    packed: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return sum(f * h * w for f, h, w in self.shapes)


class EliGenQwenImageEditPlusPipeline(EliGenCallMixin, QwenImageEditPlusPipeline):
    """Qwen-Image-Edit (Plus) with EliGen: the global prompt is the overall instruction, each entity a local
    instruction and the region it applies to."""

    family = QWEN_IMAGE_EDIT_PLUS
    attention_kwargs_name = "attention_kwargs"
    output_class = QwenImagePipelineOutput
    _edit_images: EditImages | None = None

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        self.check_inputs(
            call.prompt, *size, negative_prompt=call.negative_prompt, prompt_embeds=call.prompt_embeds,
            negative_prompt_embeds=call.negative_prompt_embeds, prompt_embeds_mask=call.extra["prompt_embeds_mask"],
            negative_prompt_embeds_mask=call.extra["negative_prompt_embeds_mask"],
            callback_on_step_end_tensor_inputs=list(call.callback_on_step_end_tensor_inputs),
            max_sequence_length=call.max_sequence_length,
        )
        if call.batch_size > 1:
            raise ValueError(f"QwenImageEditPlusPipeline currently only supports batch_size=1, but received "
                             f"batch_size={call.batch_size}. Please process prompts one at a time.")
        self._edit_images = self._prepare_images(call.extra["edit_image"])

    def _prepare_images(self, image: Any) -> EditImages:
        """QwenImageEditPlusPipeline's step 3: each input at the condition area (the text encoder's view) and at
        the VAE area (the reference tokens)."""
        images = image if isinstance(image, list) else [image]
        condition, vae, shapes = [], [], []
        grid = self.vae_scale_factor * 2
        for img in images:
            width, height = img.size
            c_width, c_height = stock_module.calculate_dimensions(stock_module.CONDITION_IMAGE_SIZE, width / height)
            v_width, v_height = stock_module.calculate_dimensions(stock_module.VAE_IMAGE_SIZE, width / height)
            condition.append(self.image_processor.resize(img, c_height, c_width))
            vae.append(self.image_processor.preprocess(img, v_height, v_width).unsqueeze(2))
            shapes.append((1, v_height // grid, v_width // grid))
        return EditImages(condition, vae, shapes)

    def _regional_cover(self, cover: torch.Tensor) -> torch.Tensor:
        images = self._edit_images
        return cover if images is None else reference_cover(cover, images.tokens)

    def _encode_branch(self, call: Call, negative: bool, device: torch.device) -> Branch:
        side = "negative_" if negative else ""
        assert self._edit_images is not None  # prepared by _check_parent_inputs
        embeds, mask = self.encode_prompt(
            image=self._edit_images.condition, prompt=getattr(call, f"{side}prompt"),
            prompt_embeds=getattr(call, f"{side}prompt_embeds"),
            prompt_embeds_mask=call.extra[f"{side}prompt_embeds_mask"], device=device,
            num_images_per_prompt=call.num_images_per_prompt, max_sequence_length=call.max_sequence_length,
        )
        return Branch(embeds, text_mask=mask)

    def _initial_latents(self, call: Call, batch: int, size: tuple[int, int], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
        images = self._edit_images
        assert images is not None  # prepared by _check_parent_inputs
        latents, images.packed = self.prepare_latents(images.vae, batch, self.transformer.config.in_channels // 4,
                                                      *size, dtype, device, call.generator, call.latents)
        return latents

    def _velocity(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                  guidance: torch.Tensor | None) -> torch.Tensor:
        """The forward on ``[image | references]`` with one ``img_shapes`` frame each; the image tokens' velocity."""
        images = self._edit_images
        if images is None or images.packed is None:
            return super()._velocity(latents, timestep, branch, geometry, guidance)
        joined = torch.cat([latents, images.packed], dim=1)
        shapes = [[*sample, *images.shapes] for sample in geometry]
        return super()._velocity(joined, timestep, branch, shapes, guidance)[:, : latents.shape[1]]

    def _source_and_size(self, call: Call) -> tuple[InpaintSource | None, int, int, tuple[int, int]]:
        """With keep-outside: the input's size. Otherwise QwenImageEditPlusPipeline's: the last input's aspect ratio
        at about 1024x1024 unless given, on the patch grid."""
        if call.inpainting.active:
            return super()._source_and_size(call)
        image = call.extra["edit_image"]
        width, height = (image[-1] if isinstance(image, list) else image).size
        calculated = stock_module.calculate_dimensions(1024 * 1024, width / height)
        grid = self.vae_scale_factor * 2
        size = ((call.height or calculated[1]) // grid * grid, (call.width or calculated[0]) // grid * grid)
        return None, *size, size

    @torch.no_grad()
    @eligen_call_doc("diffusers' QwenImageEditPlusPipeline", """
        ``image`` is the input to edit (one image or a list, the stock argument). Entities: a local instruction
        (``prompt``) and a mask each, on the output (the last input's size with ``keep_outside``); the global
        ``prompt`` is the overall instruction. Entity instructions are encoded with the edit template, without the
        images; the inputs' tokens are image tokens covered by every entity (docs/design.md section 21).
        keep_outside: with entities (default True), the latents outside the union of the entity masks end exactly
            at the (last) input's and its pixels are pasted back there. False: the model may change the whole image.
    """)
    def __call__(
        self,
        image: Any = None,
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
        keep_outside: bool = True,
        strength: float = 1.0,
        fusion: str = "exact",
        mask_dilate: int = 0,
        mask_blur: float = 0.0,
        paste_back: bool = True,
        attention: str = "auto",
        entity_tokens: str = "full",
        compile: bool = False,
        entity_steps: int | None = None,
    ) -> Any:
        if image is None:
            raise ValueError("QwenImageEditPlusPipeline edits an input: pass `image`")
        try:
            return self._eligen_call(Call.of(edit_arguments(locals()), "attention_kwargs"))
        finally:
            self._edit_images = None

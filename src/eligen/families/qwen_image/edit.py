"""EliGen on Qwen-Image-Edit: diffusers' QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 / 2511, one or more input
images) and QwenImageEditPipeline (Qwen-Image-Edit, one input image), instruction-following edit models on
Qwen-Image's transformer, with entity prompts and regional attention: each entity is a local instruction and a mask,
edited in one pass (docs/design.md section 21).

Both pipelines append the input images' packed latents (the reference tokens, one more frame each in ``img_shapes``)
after the image tokens of every forward and keep only the image tokens' velocity; the global prompt is encoded with
the input images (Qwen2.5-VL sees them). For the regional rule the reference tokens are image tokens covered by every
entity. Entity instructions are encoded with the edit template and without the images. With ``keep_outside``
(default) and entities, latents outside the union of the entity masks end exactly at the input's (inpainting fusion);
with no entities every step is the stock pipeline's. :class:`QwenEditHooks` holds all of this; the two pipelines
differ only in how the inputs are sized (:meth:`QwenEditHooks._prepare_images`, :meth:`QwenEditHooks._default_size`)
and the Plus one's batch limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as single_module
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as stock_module
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput

from ...entities import Entity
from ...inpaint import InpaintSource
from ...masks import reference_cover
from ...pipelines.arguments import Call, edit_arguments, eligen_call_doc
from ...pipelines.call import EliGenCallMixin
from ..base import Branch, ReferenceTokens
from . import processor as _processor  # noqa: F401  (a saved tiny pipeline names its processor class there)
from .model import QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS

# diffusers' output size when none is given: the input's aspect ratio at about this many pixels (both pipelines)
DEFAULT_AREA = 1024 * 1024


@dataclasses.dataclass
class EditImages:
    """The input images as the stock pipeline prepares them: what the text encoder sees (``condition``), what the VAE
    encodes (``vae``, ``(1, 3, 1, H, W)`` each) and their token grids; after ``_initial_latents`` the reference
    tokens."""

    condition: Any
    vae: Any
    shapes: list[tuple[int, int, int]]
    joined: ReferenceTokens | None = None

    @property
    def tokens(self) -> int:
        return sum(f * h * w for f, h, w in self.shapes)

    def reference(self, packed: torch.Tensor, context: torch.Tensor | None = None) -> ReferenceTokens:
        """The packed latents appended after the image tokens, one ``img_shapes`` frame per input."""
        return ReferenceTokens(packed, lambda geometry: [[*sample, *self.shapes] for sample in geometry], context)


class QwenEditHooks(EliGenCallMixin):
    """The EliGen hooks both Qwen-Image-Edit pipelines share; a pipeline sizes its inputs
    (:meth:`_prepare_images`) and its default output (:meth:`_default_size`) as its parent does."""

    attention_kwargs_name = "attention_kwargs"
    output_class = QwenImagePipelineOutput
    _edit_images: EditImages | None = None

    def _prepare_images(self, image: Any) -> EditImages:
        """The parent's step 3: the input images for the text encoder and for the VAE."""
        raise NotImplementedError

    def _default_size(self, image: Any) -> tuple[int, int]:
        """``(width, height)`` of the output when the call gives none (before the patch grid)."""
        raise NotImplementedError

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        self.check_inputs(
            call.prompt, *size, negative_prompt=call.negative_prompt, prompt_embeds=call.prompt_embeds,
            negative_prompt_embeds=call.negative_prompt_embeds, prompt_embeds_mask=call.extra["prompt_embeds_mask"],
            negative_prompt_embeds_mask=call.extra["negative_prompt_embeds_mask"],
            callback_on_step_end_tensor_inputs=list(call.callback_on_step_end_tensor_inputs),
            max_sequence_length=call.max_sequence_length,
        )
        self._edit_images = self._prepare_images(call.extra["edit_image"])

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
        latents, packed = self.prepare_latents(images.vae, batch, self.transformer.config.in_channels // 4, *size,
                                               dtype, device, call.generator, call.latents)
        images.joined = images.reference(packed)
        return latents

    def edit_reference(self, image: Any, prompt: str, batch: int, device: torch.device,
                       dtype: torch.dtype) -> ReferenceTokens:
        """Training on edit records: the input image's reference tokens as a call prepares them (sized, VAE-encoded,
        packed) and ``prompt`` encoded with the input as the call encodes the global instruction."""
        images = self._prepare_images(image)
        no_noise = torch.empty(0)  # the noise is the trainer's: none is drawn here
        _, packed = self.prepare_latents(images.vae, batch, self.transformer.config.in_channels // 4,
                                         self.patch_grid, self.patch_grid, dtype, device, None, no_noise)
        # on the text encoder's execution device, as the trainer's text cache encodes the entity instructions
        context, _ = self.encode_prompt(image=images.condition, prompt=prompt)
        return images.reference(packed, context)

    def _velocity(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                  guidance: torch.Tensor | None) -> torch.Tensor:
        """The forward on ``[image | references]`` with one ``img_shapes`` frame each; the image tokens' velocity."""
        images = self._edit_images
        if images is None or images.joined is None:
            return super()._velocity(latents, timestep, branch, geometry, guidance)
        joined, shapes = images.joined.join(latents, geometry)
        return super()._velocity(joined, timestep, branch, shapes, guidance)[:, : latents.shape[1]]

    def _source_and_size(self, call: Call) -> tuple[InpaintSource | None, int, int, tuple[int, int]]:
        """With keep-outside: the input's size. Otherwise the parent's: the input's aspect ratio at about 1024x1024
        unless given, on the patch grid."""
        if call.inpainting.active:
            return super()._source_and_size(call)
        calculated = self._default_size(call.extra["edit_image"])
        grid = self.vae_scale_factor * 2
        size = ((call.height or calculated[1]) // grid * grid, (call.width or calculated[0]) // grid * grid)
        return None, *size, size

    @torch.no_grad()
    @eligen_call_doc("diffusers' QwenImageEditPlusPipeline (or QwenImageEditPipeline)", """
        ``image`` is the input to edit (the stock argument: one image, or a list for QwenImageEditPlusPipeline).
        Entities: a local instruction (``prompt``) and a mask each, on the output (the last input's size with
        ``keep_outside``); the global ``prompt`` is the overall instruction. Entity instructions are encoded with
        the edit template, without the images; the inputs' tokens are image tokens covered by every entity
        (docs/design.md section 21).
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
            raise ValueError(f"{self.family.card.title} edits an input: pass `image`")
        try:
            return self._eligen_call(Call.of(edit_arguments(locals()), "attention_kwargs"))
        finally:
            self._edit_images = None


class EliGenQwenImageEditPlusPipeline(QwenEditHooks, QwenImageEditPlusPipeline):
    """Qwen-Image-Edit-Plus with EliGen: the global prompt is the overall instruction, each entity a local
    instruction and the region it applies to."""

    family = QWEN_IMAGE_EDIT_PLUS

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        if call.batch_size > 1:
            raise ValueError(f"QwenImageEditPlusPipeline currently only supports batch_size=1, but received "
                             f"batch_size={call.batch_size}. Please process prompts one at a time.")
        super()._check_parent_inputs(call, size, do_true_cfg)

    def _prepare_images(self, image: Any) -> EditImages:
        """Each input at the condition area (the text encoder's view) and at the VAE area (the reference tokens)."""
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

    def _default_size(self, image: Any) -> tuple[int, int]:
        """The last input's aspect ratio."""
        width, height = (image[-1] if isinstance(image, list) else image).size
        return stock_module.calculate_dimensions(DEFAULT_AREA, width / height)


class EliGenQwenImageEditPipeline(QwenEditHooks, QwenImageEditPipeline):
    """Qwen-Image-Edit (one input image) with EliGen: the global prompt is the overall instruction, each entity a
    local instruction and the region it applies to."""

    family = QWEN_IMAGE_EDIT

    def _prepare_images(self, image: Any) -> EditImages:
        """The input resized once to its aspect ratio at about 1024x1024: that image is both what the text encoder
        sees (its template holds one vision block) and what the VAE encodes (one reference frame)."""
        width, height = self._default_size(image)
        resized = self.image_processor.resize(image, height, width)
        grid = self.vae_scale_factor * 2
        vae = self.image_processor.preprocess(resized, height, width).unsqueeze(2)
        return EditImages(resized, vae, [(1, height // grid, width // grid)])

    def _default_size(self, image: Any) -> tuple[int, int]:
        """The (first) input's aspect ratio."""
        width, height = (image[0] if isinstance(image, list) else image).size
        calculated_width, calculated_height, _ = single_module.calculate_dimensions(DEFAULT_AREA, width / height)
        return calculated_width, calculated_height

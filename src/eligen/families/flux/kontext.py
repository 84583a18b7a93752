"""EliGenFluxKontextPipeline: diffusers' FluxKontextPipeline (FLUX.1 Kontext, an instruction-following edit model)
with entity prompts and regional attention: each entity is a local instruction and a mask, edited in one pass
(docs/design.md section 21).

Kontext appends the input image's packed latents (the "reference tokens", ids ``(1, row, column)``) after the image
tokens of every forward and keeps only the image tokens' velocity. For the regional rule the reference tokens are
image tokens covered by every entity: every token may attend to them and they attend to every token. With
``keep_outside`` (default) and entities, the output is the input's size and the latents outside the union of the
entity masks end exactly at the input's (inpainting fusion, section 5), its pixels pasted back. With no entities
every step is stock FluxKontextPipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from ...entities import Entity
from ...inpaint import InpaintSource
from ...masks import reference_cover
from ...pipelines.arguments import Call, edit_arguments, eligen_call_doc
from ...pipelines.mixin import logger
from ..base import Branch, ReferenceTokens
from .model import FLUX_KONTEXT
from .pipeline import FluxHooks


@dataclasses.dataclass
class EditReference:
    """The input image as FluxKontextPipeline prepares it: ``pixels (B, 3, H, W)`` (resized to a Kontext
    resolution) or ``latents`` given directly ``(B, C, h, w)``; after ``_initial_latents`` its reference tokens."""

    image: torch.Tensor
    tokens: int
    joined: ReferenceTokens | None = None


class EliGenFluxKontextPipeline(FluxHooks, FluxKontextPipeline):
    """FLUX.1 Kontext with EliGen: the global prompt is the overall instruction, each entity a local instruction
    and the region it applies to."""

    family = FLUX_KONTEXT
    _edit_reference: EditReference | None = None

    # -- the reference image --------------------------------------------------------------------------------------

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        super()._check_parent_inputs(call, size, do_true_cfg)
        self._edit_reference = self._prepare_reference(call.extra["edit_image"], call.extra["_auto_resize"])

    def _prepare_reference(self, image: Any, auto_resize: bool) -> EditReference | None:
        """FluxKontextPipeline's step 3: the input resized to the nearest Kontext resolution (``_auto_resize``) on
        the patch grid and preprocessed; a tensor of ``latent_channels`` channels is taken as latents."""
        if image is None:
            return None
        if isinstance(image, torch.Tensor) and image.size(1) == self.latent_channels:
            return EditReference(image, (image.shape[2] // 2) * (image.shape[3] // 2))
        first = image[0] if isinstance(image, list) else image
        height, width = self.image_processor.get_default_height_width(first)
        if auto_resize:
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        multiple = self.vae_scale_factor * 2
        width, height = width // multiple * multiple, height // multiple * multiple
        pixels = self.image_processor.preprocess(self.image_processor.resize(image, height, width), height, width)
        return EditReference(pixels, (height // multiple) * (width // multiple))

    def _regional_cover(self, cover: torch.Tensor) -> torch.Tensor:
        reference = self._edit_reference
        return cover if reference is None else reference_cover(cover, reference.tokens)

    def _initial_latents(self, call: Call, batch: int, size: tuple[int, int], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
        reference = self._edit_reference
        latents, packed, _, ids = self.prepare_latents(
            None if reference is None else reference.image, batch, self.transformer.config.in_channels // 4, *size,
            dtype, device, call.generator, call.latents)
        if reference is not None:
            reference.joined = _reference_tokens(packed, ids)
        return latents

    def edit_reference(self, image: Any, prompt: str, batch: int, device: torch.device,
                       dtype: torch.dtype) -> ReferenceTokens:
        """Training on edit records: the input image's reference tokens as a call prepares them (resized to the
        nearest Kontext resolution, VAE-encoded, packed); ``prompt`` is encoded apart (Kontext's text encoders do
        not see the image)."""
        reference = self._prepare_reference(image, auto_resize=True)
        assert reference is not None  # an image was given
        no_noise = torch.empty(0)  # the noise is the trainer's: none is drawn here
        _, packed, _, ids = self.prepare_latents(reference.image, batch, self.transformer.config.in_channels // 4,
                                                 self.patch_grid, self.patch_grid, dtype, device, None, no_noise)
        return _reference_tokens(packed, ids)

    def _velocity(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                  guidance: torch.Tensor | None) -> torch.Tensor:
        """The forward on ``[image | reference]`` tokens, as FluxKontextPipeline runs it; the image tokens'
        velocity."""
        reference = self._edit_reference
        if reference is None or reference.joined is None:
            return super()._velocity(latents, timestep, branch, geometry, guidance)
        joined, ids = reference.joined.join(latents, geometry)
        return super()._velocity(joined, timestep, branch, ids, guidance)[:, : latents.shape[1]]

    # -- the size ---------------------------------------------------------------------------------------------------

    def _source_and_size(self, call: Call) -> tuple[InpaintSource | None, int, int, tuple[int, int]]:
        """With keep-outside: the input's size (inpainting). Otherwise FluxKontextPipeline's: the asked (else
        default) aspect ratio at ``max_area`` pixels, on the patch grid."""
        if call.inpainting.active:
            return super()._source_and_size(call)
        height = call.height or self.default_sample_size * self.vae_scale_factor
        width = call.width or self.default_sample_size * self.vae_scale_factor
        area, ratio, multiple = call.extra["max_area"], width / height, self.vae_scale_factor * 2
        sized = (round((area / ratio) ** 0.5) // multiple * multiple,
                 round((area * ratio) ** 0.5) // multiple * multiple)
        if sized != (height, width):
            logger.warning(f"Generation `height` and `width` have been adjusted to {sized[0]} and {sized[1]} to fit "
                           "the model requirements.")
        return None, *sized, sized

    @torch.no_grad()
    @eligen_call_doc("diffusers' FluxKontextPipeline", """
        ``image`` is the input to edit (the stock argument). Entities: a local instruction (``prompt``) and a mask
        each; the global ``prompt`` is the overall instruction. The input's tokens are image tokens covered by every
        entity (docs/design.md section 21).
        keep_outside: with entities (default True), the latents outside the union of the entity masks end exactly
            at the input's and its pixels are pasted back there (inpainting fusion at the input's size; ``strength``,
            ``fusion``, ``mask_dilate``, ``mask_blur`` and ``paste_back`` as for inpainting). False: the model may
            change the whole image, as Kontext does.
    """)
    def __call__(
        self,
        image: Any = None,
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
        max_area: int = 1024**2,
        _auto_resize: bool = True,
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
        try:
            return self._eligen_call(Call.of(edit_arguments(locals()), "joint_attention_kwargs"))
        finally:
            self._edit_reference = None


def _reference_tokens(packed: torch.Tensor, ids: torch.Tensor) -> ReferenceTokens:
    """Kontext's reference: its ids ``(n_ref, 3)`` (frame 1) follow the image's."""
    return ReferenceTokens(packed, lambda image_ids: torch.cat([image_ids, ids], dim=0))

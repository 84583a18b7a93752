"""EliGenQwenImage21Pipeline: diffusers' QwenImage21Pipeline with entity prompts and regional attention
(docs/design.md section 20).

Each entity prompt is encoded alone with the global prompt's template and keeps its true length; the text is
``[e_1 | ... | e_N | global]``, every segment's RoPE positions restart at the global prompt's, text attends causally
within its own segment and the image under the regional mask, and the text KV cache stays on. With no entities every
step is stock QwenImage21Pipeline. The call is the shared one (:class:`eligen.pipelines.call.EliGenCallMixin`); this
class holds Qwen-Image 2.1's hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import QwenImage21Pipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput

from ...entities import Entity
from ...pipelines.arguments import Call, eligen_call_doc
from ...pipelines.call import EliGenCallMixin
from ..base import Branch
from . import processor as _processor  # noqa: F401  (a saved pipeline may name its TextOnlyQwen3VLProcessor)
from .model import QWEN_IMAGE21, QwenImage21Branch

OUTPUT_RESOLUTION = 1024  # QwenImage21Pipeline's default output_resolution: the side of its default image
SLOT_PIXELS = 2  # tokens per side of one vision-language image slot: sizes are whole slots (2 x 16 = 32 pixels)


class EliGenQwenImage21Pipeline(EliGenCallMixin, QwenImage21Pipeline):
    """Qwen-Image 2.1 with EliGen entity control; loads any diffusers Qwen-Image 2.1 directory or hub id, and takes
    EliGen LoRAs (diffusers/peft keys) through :meth:`load_eligen_lora`."""

    family = QWEN_IMAGE21
    attention_kwargs_name = "attention_kwargs"
    output_class = QwenImagePipelineOutput

    # -- sizes: the pipeline renders whole 2x2-token slots (multiples of 32 pixels), rounding down -----------------

    def native_size(self) -> tuple[int, int]:
        width, height = self.eligen_defaults.get("native_size") or (OUTPUT_RESOLUTION, OUTPUT_RESOLUTION)
        return height, width

    @property
    def patch_grid(self) -> int:
        """Pixels per side of the smallest size step the model takes: one image slot (2x2 tokens of 16 pixels)."""
        return SLOT_PIXELS * self.vae_scale_factor * self.family.patch_size

    def _size(self, height: int | None, width: int | None, inpainting: bool = False) -> tuple[int, int]:
        height, width = super()._size(height, width, inpainting)
        if inpainting:  # the output keeps the input's size; the work size is already on the grid
            return height, width
        grid = self.patch_grid
        return height // grid * grid, width // grid * grid  # as QwenImage21Pipeline rounds them

    # -- hooks ------------------------------------------------------------------------------------------------------

    def _fill_defaults(self, call: Call) -> None:
        """The shared defaults, then the pipeline's own: its configured ``sample_sigmas`` when no ``sigmas`` are
        given, and a changed ``output_resolution`` as the default side."""
        super()._fill_defaults(call)
        if call.sigmas is None and self.config.sample_sigmas is not None:
            call.sigmas = self.config.sample_sigmas
        resolution = call.extra["output_resolution"]
        if resolution != OUTPUT_RESOLUTION:
            call.height, call.width = call.height or resolution, call.width or resolution

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        self.check_inputs(call.prompt, *size, call.prompt_embeds, list(call.callback_on_step_end_tensor_inputs))
        if call.extra["use_kv_cache"] and self.transformer.config.causal_condition and \
                self.transformer.is_cache_enabled:
            raise ValueError("the first-block cache cannot run with Qwen-Image 2.1's text KV cache (after the first "
                             "step the blocks see only the image tokens, so the cached residuals change shape); "
                             "pass use_kv_cache=False")

    def _encode_branch(self, call: Call, negative: bool, device: torch.device) -> Branch:
        side = "negative_" if negative else ""
        embeds, mask, _ = self.encode_prompt(
            prompt=getattr(call, f"{side}prompt"), prompt_embeds=getattr(call, f"{side}prompt_embeds"),
            prompt_embeds_mask=call.extra[f"{side}prompt_embeds_mask"], device=device,
            num_images_per_prompt=call.num_images_per_prompt,
        )
        return QwenImage21Branch(embeds, text_mask=mask, use_kv_cache=bool(call.extra["use_kv_cache"]))

    def _initial_latents(self, call: Call, batch: int, size: tuple[int, int], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
        latents, _ = self.prepare_latents(None, batch, self.transformer.config.in_channels, *size, dtype, device,
                                          call.generator, call.latents)
        return latents

    @torch.no_grad()
    @eligen_call_doc("diffusers' QwenImage21Pipeline", """
        ``image`` is the inpainting input here: Qwen-Image 2.1's condition images (image-conditioned generation) are
        not supported. Entity embeddings are ``(T_i, D)`` each, any length (segments are unpadded, so
        ``entity_tokens="trim"`` changes nothing); ``max_sequence_length`` caps each entity segment (the global
        prompt is never cut, as in diffusers). CFG is the plain ``neg + s (pos - neg)`` (off by default, as in
        diffusers); ``guidance_scale`` is not read (the transformer has no embedded guidance). ``use_kv_cache``
        (default on) keeps the text keys and values after the first step, with entities too.
    """)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
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
        output_resolution: int = OUTPUT_RESOLUTION,
        use_kv_cache: bool = True,
        max_sequence_length: int | None = None,
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

"""EliGenQwenImagePipeline: diffusers' QwenImagePipeline with entity prompts and regional attention
(docs/design.md section 11; the reference is DiffSynth-Studio's Qwen-Image EliGen).

Each entity prompt is encoded alone with the global prompt's template and keeps its true length; the text sequence
is ``[e_1 | ... | e_N | global]``, every segment's text RoPE restarts at the global prompt's offset, and the
regional mask (FLUX's rule) reaches every attention layer through ``attention_kwargs``. With no entities every step
is stock QwenImagePipeline. Inpainting fusion works here too (the reference has none for Qwen-Image). The call is
the shared one (:class:`eligen.pipelines.call.EliGenCallMixin`); this class holds Qwen-Image's hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput

from ...entities import Entity
from ...pipelines.arguments import Call, eligen_call_doc
from ...pipelines.call import EliGenCallMixin
from ..base import Branch
from .model import QWEN_IMAGE


class QwenImageHooks(EliGenCallMixin):
    """The Qwen-Image hooks of the shared call, for every pipeline whose ``check_inputs``, ``encode_prompt`` and
    ``prepare_latents`` are QwenImagePipeline's (QwenImageControlNetPipeline's are the same)."""

    attention_kwargs_name = "attention_kwargs"
    output_class = QwenImagePipelineOutput

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        self.check_inputs(
            call.prompt, *size, negative_prompt=call.negative_prompt, prompt_embeds=call.prompt_embeds,
            negative_prompt_embeds=call.negative_prompt_embeds, prompt_embeds_mask=call.extra["prompt_embeds_mask"],
            negative_prompt_embeds_mask=call.extra["negative_prompt_embeds_mask"],
            callback_on_step_end_tensor_inputs=list(call.callback_on_step_end_tensor_inputs),
            max_sequence_length=call.max_sequence_length,
        )

    def _encode_branch(self, call: Call, negative: bool, device: torch.device) -> Branch:
        side = "negative_" if negative else ""
        embeds, mask = self.encode_prompt(
            prompt=getattr(call, f"{side}prompt"), prompt_embeds=getattr(call, f"{side}prompt_embeds"),
            prompt_embeds_mask=call.extra[f"{side}prompt_embeds_mask"], device=device,
            num_images_per_prompt=call.num_images_per_prompt, max_sequence_length=call.max_sequence_length,
        )
        return Branch(embeds, text_mask=mask)

    def _initial_latents(self, call: Call, batch: int, size: tuple[int, int], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
        return self.prepare_latents(batch, self.transformer.config.in_channels // 4, *size, dtype, device,
                                    call.generator, call.latents)


class EliGenQwenImagePipeline(QwenImageHooks, QwenImagePipeline):
    """Qwen-Image with EliGen entity control; loads any diffusers Qwen-Image directory or hub id, and takes the
    Qwen-Image-EliGen (V1, V2, Poster) LoRAs through :meth:`load_eligen_lora`."""

    family = QWEN_IMAGE

    @torch.no_grad()
    @eligen_call_doc("diffusers' QwenImagePipeline", """
        Entity embeddings are ``(T_i, D)`` each, any length (Qwen-Image segments are unpadded, so
        ``entity_tokens="trim"`` changes nothing). The default ``cfg_mode`` is "rescaled" (diffusers'); "plain" is
        the reference's ``neg + s (pos - neg)``. Qwen-Image has no IP-Adapter in diffusers: entity images are refused.
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

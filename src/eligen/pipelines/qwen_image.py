"""EliGenQwenImagePipeline: diffusers' QwenImagePipeline with entity prompts and regional attention
(docs/design.md section 11; the reference is DiffSynth-Studio's Qwen-Image EliGen).

Each entity prompt is encoded alone with the global prompt's template and keeps its true length; the text sequence
is ``[e_1 | ... | e_N | global]``, every segment's text RoPE restarts at the global prompt's offset, and the
regional mask (FLUX's rule) reaches every attention layer through ``attention_kwargs``. With no entities every step
is stock QwenImagePipeline. Inpainting fusion works here too (the reference has none for Qwen-Image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput

from ..entities import Entity, LayoutError
from ..families.base import Branch
from ..families.qwen_image import QWEN_IMAGE
from .common import EliGenMixin, logger


class EliGenQwenImagePipeline(EliGenMixin, QwenImagePipeline):
    """Qwen-Image with EliGen entity control; loads any diffusers Qwen-Image directory or hub id, and takes the
    Qwen-Image-EliGen (V1, V2, Poster) LoRAs through :meth:`load_eligen_lora`."""

    family = QWEN_IMAGE

    @torch.no_grad()
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
        r"""Generate images with entity control; the arguments are diffusers' QwenImagePipeline's plus:

            entities / entity_prompts / entity_prompt_embeds / entity_masks / entities_on_negative, image / inpaint
                / strength / fusion / mask_dilate / mask_blur / paste_back, attention / compile: as in
                :class:`eligen.EliGenPipeline` (entity embeddings are ``(T_i, D)`` each, any length).
            cfg_mode: "rescaled" (diffusers' default: the combined prediction rescaled to the positive one's norm)
                or "plain" (the reference's ``neg + s (pos - neg)``). Default: "rescaled".
            entity_tokens: accepted for symmetry; Qwen-Image segments are unpadded already, so "trim" changes
                nothing.
            entity_steps: as in :class:`eligen.EliGenPipeline` (approximate, opt-in).
        """
        # 0. Validate; what the call leaves out comes from the model's declared defaults, else diffusers'.
        self._check_speed_options(attention, entity_tokens, output_type)
        for i, entity in enumerate(entities or []):
            if getattr(entity, "image", None) is not None:
                raise LayoutError("Qwen-Image has no IP-Adapter in diffusers, so an entity cannot carry a reference "
                                  "image here; drop 'image' (FLUX.1 takes it)", entity=i, field="image")
        negative_prompt = self._declared_negative(negative_prompt, negative_prompt_embeds, true_cfg_scale)
        num_inference_steps, true_cfg_scale, guidance_scale, max_sequence_length = self._call_defaults(
            dict(num_inference_steps=num_inference_steps, true_cfg_scale=true_cfg_scale,
                 guidance_scale=guidance_scale, max_sequence_length=max_sequence_length),
            dict(num_inference_steps=50, true_cfg_scale=4.0, guidance_scale=None, max_sequence_length=512),
        ).values()
        combine = self.family.combine(cfg_mode or self.family.default_cfg)
        self._check_finite(true_cfg_scale=true_cfg_scale, guidance_scale=guidance_scale, latents=latents,
                           prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                           entity_prompt_embeds=entity_prompt_embeds)
        source, height, width, work = self._source_and_size(image, inpaint, height, width, strength, fusion,
                                                            mask_dilate, mask_blur)
        self.check_inputs(
            prompt, *work, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
            negative_prompt_embeds_mask=negative_prompt_embeds_mask,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = self._eligen_attention_kwargs = dict(attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        batch = batch_size * num_images_per_prompt
        device = self._execution_device
        given_entities = bool(entities) or bool(entity_masks)
        self._check_memory(batch, work, given_entities and self.attention_mode(attention, device) == "dense", device)
        has_neg_prompt = negative_prompt is not None or negative_prompt_embeds is not None
        if true_cfg_scale > 1 and not has_neg_prompt:
            logger.warning(f"true_cfg_scale is {true_cfg_scale} but no negative prompt is given: CFG is off")
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt

        # 1. Text: global prompt (template, unpadded for one prompt), entity segments, negative prompt; branches.
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=prompt, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
        )
        ents = self._resolve_entities(
            entities, entity_prompts, entity_prompt_embeds, entity_masks, height, width, batch,
            max_sequence_length, device, prompt_embeds.dtype, grid=work, entity_tokens=entity_tokens,
        )
        if compile:
            self.compile_transformer()
        mode = self.attention_mode(attention, device)
        if source is not None and ents is None:
            raise ValueError("inpainting needs at least one entity: the entity masks mark what to repaint")
        positive = Branch(prompt_embeds, text_mask=self._padding(prompt_embeds_mask, ents))
        negative = None
        if do_true_cfg:
            negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt(
                prompt=negative_prompt, prompt_embeds=negative_prompt_embeds,
                prompt_embeds_mask=negative_prompt_embeds_mask, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            )
            on_negative = ents if entities_on_negative else None
            negative = Branch(negative_prompt_embeds, text_mask=self._padding(negative_prompt_embeds_mask, on_negative))
        branches = self._branches(ents, positive, negative, mode, entities_on_negative)

        # 2. Latents and (for guidance-distilled transformers) the embedded guidance.
        latents = self.prepare_latents(
            batch, self.transformer.config.in_channels // 4, *work, prompt_embeds.dtype, device, generator, latents
        )
        guidance = self._guidance(guidance_scale, latents.shape[0], device)

        on_step_end = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, branches, ents,
                                          prompt_embeds)

        # 3. The shared loop.
        latents = self._run(latents, branches, ents, source, work, num_inference_steps, sigmas, shift_sigmas,
                            guidance, true_cfg_scale, combine, strength, fusion, mask_dilate, mask_blur, on_step_end,
                            entity_steps)

        # 4. Decode.
        image = self._output(latents, ents, source, work, output_type, paste_back, mask_dilate, mask_blur)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return QwenImagePipelineOutput(images=image)

    @staticmethod
    def _padding(mask: torch.Tensor | None, ents) -> torch.Tensor | None:
        """The text padding mask of a branch's full sequence: None without padding (one prompt, or equal lengths);
        with entities, the segments are unpadded, so their positions are all valid."""
        if mask is None or ents is None:
            return mask
        ones = mask.new_ones(mask.shape[0], sum(ents.lengths))
        return torch.cat([ones, mask], dim=1)

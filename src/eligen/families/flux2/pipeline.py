"""EliGenFlux2Pipeline and EliGenFlux2KleinPipeline: diffusers' ``Flux2Pipeline`` ([dev]) and
``Flux2KleinPipeline`` ([klein]) with entity prompts and regional attention (docs/design.md section 17).

Each entity prompt is encoded exactly as the pipeline encodes its global prompt (template, hidden layers, padded to
``max_sequence_length``); the text sequence is ``[e_1 | ... | e_N | global]``, every segment's text positions count
from 0 as the global prompt's do without entities, and the regional mask, built once per call and CFG branch, reaches
every double- and single-stream block through the transformer's ``joint_attention_kwargs``. With no entities every
step is the stock pipeline's. The call itself is the shared one (:class:`eligen.pipelines.call.EliGenCallMixin`);
these classes hold FLUX.2's hooks.

The diffusers pipelines read ``image`` as reference images for editing; here ``image`` is the inpainting input
(with ``inpaint=True``), and reference images are refused by name (section 17).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput

from ...entities import Entity
from ...pipelines.arguments import Call, eligen_call_doc
from ...pipelines.call import EliGenCallMixin
from ...pipelines.mixin import logger
from ..base import Branch
from .model import FLUX2, FLUX2_KLEIN, LAYERS_ATTRIBUTE

DEV_LAYERS = (10, 20, 30)
KLEIN_LAYERS = (9, 18, 27)
REFERENCE_IMAGES = ("FLUX.2's reference images (`image` without inpaint=True, for editing) are not supported with "
                    "EliGen: their tokens would join the sequence with no place in the regional mask. Here `image` is "
                    "the inpainting input (pass inpaint=True); for editing use the diffusers pipeline")


def _check_reference_images(image: Any, inpaint: bool) -> None:
    if image is not None and not inpaint:
        raise ValueError(REFERENCE_IMAGES)


class _Flux2Hooks(EliGenCallMixin):
    """The hooks both FLUX.2 pipelines share."""

    attention_kwargs_name = "attention_kwargs"
    output_class = Flux2PipelineOutput

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        """The parent's ``check_inputs``, and the negative prompt's counterpart of its prompt checks."""
        self.check_inputs(prompt=call.prompt, height=size[0], width=size[1], prompt_embeds=call.prompt_embeds,
                          callback_on_step_end_tensor_inputs=list(call.callback_on_step_end_tensor_inputs),
                          **self._check_extra(call))
        if call.negative_prompt is not None and call.negative_prompt_embeds is not None:
            raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`. Please make sure to "
                             "only forward one of the two.")

    def _check_extra(self, call: Call) -> dict[str, Any]:
        return {}

    def _prompt(self, call: Call, negative: bool):
        """The branch's prompt (a negative string is repeated for a batch of prompts) and given embeddings."""
        if not negative:
            return call.prompt, call.prompt_embeds
        prompt = self._negative_prompt(call)
        if isinstance(prompt, str) and isinstance(call.prompt, list):
            prompt = [prompt] * len(call.prompt)
        return prompt, call.negative_prompt_embeds

    def _negative_prompt(self, call: Call):
        return call.negative_prompt

    def _encode_branch(self, call: Call, negative: bool, device: torch.device) -> Branch:
        layers = tuple(call.extra["text_encoder_out_layers"])
        self.__dict__[LAYERS_ATTRIBUTE] = layers  # the entity prompts of this call are read from the same layers
        prompt, embeds = self._prompt(call, negative)
        if not negative and call.extra.get("caption_upsample_temperature"):
            prompt = self.upsample_prompt(prompt, images=None, temperature=call.extra["caption_upsample_temperature"],
                                          device=device)
        embeds, _ = self.encode_prompt(
            prompt=prompt, prompt_embeds=embeds, device=device, num_images_per_prompt=call.num_images_per_prompt,
            max_sequence_length=call.max_sequence_length, text_encoder_out_layers=layers,
        )
        return Branch(embeds)

    def _initial_latents(self, call: Call, batch: int, size: tuple[int, int], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
        latents, _ = self.prepare_latents(batch, self.transformer.config.in_channels // 4, *size, dtype, device,
                                          call.generator, call.latents)
        return latents


class EliGenFlux2Pipeline(_Flux2Hooks, Flux2Pipeline):
    """FLUX.2 [dev] with EliGen entity control; loads any diffusers FLUX.2 [dev] directory or hub id.

    Guidance-distilled: the embedded ``guidance_scale`` (default 4) is the model's guidance, as in diffusers, and no
    negative branch runs. True CFG (``true_cfg_scale`` > 1 with a ``negative_prompt``) is an opt-in EliGen extra,
    as for FLUX.1: plain ``neg + s (pos - neg)``.
    """

    family = FLUX2

    @torch.no_grad()
    @eligen_call_doc("diffusers' Flux2Pipeline", """
        ``image`` is the inpainting input (``inpaint=True``); FLUX.2's reference images are refused. Entity prompts
        are encoded as the prompt is (Mistral-3 chat template with the system message, ``text_encoder_out_layers``,
        padded to ``max_sequence_length``); ``entity_prompt_embeds`` are such embeddings ``(T, 3 D)``. FLUX.2
        [dev] is guidance-distilled: ``guidance_scale`` is its embedded guidance (default 4); ``true_cfg_scale`` >
        1 with a ``negative_prompt`` adds a plain true-CFG negative branch (off by default, as in diffusers).
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
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        text_encoder_out_layers: tuple[int, ...] = DEV_LAYERS,
        caption_upsample_temperature: float | None = None,
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
    ) -> Flux2PipelineOutput | tuple:
        _check_reference_images(image, inpaint)
        return self._eligen_call(Call.of(locals(), "attention_kwargs"))


class EliGenFlux2KleinPipeline(_Flux2Hooks, Flux2KleinPipeline):
    """FLUX.2 [klein] with EliGen entity control; loads any diffusers FLUX.2 [klein] directory or hub id.

    As in diffusers, ``guidance_scale`` (default 4) is the true CFG scale and the negative prompt is empty, and a
    step-distilled checkpoint (``is_distilled``) runs no negative branch. ``true_cfg_scale`` and
    ``negative_prompt`` (EliGen's names, which the commands use) override them. The transformer takes no embedded
    guidance. ``output_type="latent"`` returns the VAE's latents ``(B, C, H/8, W/8)``, as diffusers does.
    """

    family = FLUX2_KLEIN

    def _fill_defaults(self, call: Call) -> None:
        """``guidance_scale`` is the CFG scale unless ``true_cfg_scale`` is given; a distilled checkpoint runs none."""
        if call.true_cfg_scale is None:
            call.true_cfg_scale = call.guidance_scale
        elif call.guidance_scale is not None and call.guidance_scale != call.true_cfg_scale:
            logger.warning(f"guidance_scale {call.guidance_scale} is ignored: FLUX.2 [klein] has no embedded "
                           f"guidance, and its CFG scale is true_cfg_scale ({call.true_cfg_scale})")
        call.guidance_scale = None
        super()._fill_defaults(call)
        assert call.true_cfg_scale is not None  # filled by the defaults
        if self.config.is_distilled and call.true_cfg_scale > 1:  # diffusers' warning
            logger.warning(f"Guidance scale {call.true_cfg_scale} is ignored for step-wise distilled models.")
            call.true_cfg_scale = 1.0

    def _begin(self, call: Call) -> None:
        super()._begin(call)
        self._guidance_scale = call.true_cfg_scale  # what diffusers' guidance_scale / do_classifier_free_guidance read

    def _negative_given(self, call: Call) -> bool:
        return True  # the empty prompt, as in diffusers, unless one is given

    def _negative_prompt(self, call: Call):
        return "" if call.negative_prompt is None else call.negative_prompt

    def _check_extra(self, call: Call) -> dict[str, Any]:
        return {"guidance_scale": call.true_cfg_scale}

    def _guidance(self, guidance_scale: float | None, batch: int, device: torch.device) -> torch.Tensor | None:
        return None  # diffusers passes no embedded guidance to the [klein] transformer

    def _output(self, call: Call, latents: torch.Tensor, ents, source, size: tuple[int, int]):
        if call.output_type == "latent":  # Flux2KleinPipeline unpacks and de-normalises before it returns latents
            return self.family.unpack(self, latents, *size)
        return super()._output(call, latents, ents, source, size)

    @torch.no_grad()
    @eligen_call_doc("diffusers' Flux2KleinPipeline", """
        ``image`` is the inpainting input (``inpaint=True``); FLUX.2's reference images are refused. Entity prompts
        are encoded as the prompt is (Qwen3 chat template, ``text_encoder_out_layers``, padded to
        ``max_sequence_length``). ``guidance_scale`` (default 4) is the true CFG scale against an empty negative
        prompt, as in diffusers; ``true_cfg_scale`` and ``negative_prompt`` override them; a distilled checkpoint
        runs no CFG. ``output_type="latent"`` gives the VAE's latents, as diffusers does.
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
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int | None = None,
        text_encoder_out_layers: tuple[int, ...] = KLEIN_LAYERS,
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
    ) -> Flux2PipelineOutput | tuple:
        _check_reference_images(image, inpaint)
        return self._eligen_call(Call.of(locals(), "attention_kwargs"))

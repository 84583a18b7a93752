"""EliGenPipeline: diffusers' FluxPipeline with entity prompts and regional attention (docs/design.md section 2).

The text sequence is ``[e_1 | ... | e_N | global]`` (each entity T5-encoded exactly like the global prompt),
all text RoPE ids are zero, the pooled CLIP vector comes from the global prompt alone, and the regional mask, built
once per call and CFG branch, reaches every attention layer through ``joint_attention_kwargs["attention_mask"]``.
With no entities every step is stock FluxPipeline. The call itself is the shared one
(:class:`eligen.pipelines.call.EliGenCallMixin`); this class holds FLUX's hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import FluxPipelineOutput

from ...entities import Entity
from ...pipelines.arguments import Call, eligen_call_doc
from ...pipelines.call import EliGenCallMixin
from .ip_adapter import EntityIPAdapterMixin
from .model import FLUX, FluxBranch


class FluxHooks(EntityIPAdapterMixin, EliGenCallMixin):
    """The FLUX.1 hooks of the shared call, for every pipeline on FLUX.1's transformer (FluxPipeline's and
    FluxKontextPipeline's ``check_inputs``, ``encode_prompt`` and IP-Adapter are the same)."""

    output_class = FluxPipelineOutput

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        """FluxPipeline's checks (``check_inputs``, and equal shapes of given positive and negative embeddings
        under true CFG), then the image prompts'."""
        x = call.extra
        self.check_inputs(
            call.prompt, x["prompt_2"], *size, negative_prompt=call.negative_prompt,
            negative_prompt_2=x["negative_prompt_2"], prompt_embeds=call.prompt_embeds,
            negative_prompt_embeds=call.negative_prompt_embeds, pooled_prompt_embeds=x["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=x["negative_pooled_prompt_embeds"],
            callback_on_step_end_tensor_inputs=list(call.callback_on_step_end_tensor_inputs),
            max_sequence_length=call.max_sequence_length,
        )
        given = (call.prompt_embeds, call.negative_prompt_embeds)
        if do_true_cfg and None not in given and given[0].shape != given[1].shape:
            raise ValueError("`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed "
                             f"directly, but got: `prompt_embeds` {given[0].shape} != `negative_prompt_embeds` "
                             f"{given[1].shape}.")
        self._check_image_prompts(call.entity.entities, x["ip_adapter_image"], x["ip_adapter_image_embeds"],
                                  x["negative_ip_adapter_image"], x["negative_ip_adapter_image_embeds"])

    def _negative_given(self, call: Call) -> bool:
        pooled = call.extra["negative_pooled_prompt_embeds"]
        return call.negative_prompt is not None or (call.negative_prompt_embeds is not None and pooled is not None)

    def _encode_branch(self, call: Call, negative: bool, device: torch.device) -> FluxBranch:
        side = "negative_" if negative else ""
        embeds, pooled, _ = self.encode_prompt(
            prompt=getattr(call, f"{side}prompt"), prompt_2=call.extra[f"{side}prompt_2"],
            prompt_embeds=getattr(call, f"{side}prompt_embeds"),
            pooled_prompt_embeds=call.extra[f"{side}pooled_prompt_embeds"], device=device,
            num_images_per_prompt=call.num_images_per_prompt, max_sequence_length=call.max_sequence_length,
            lora_scale=call.attention_kwargs.get("scale", None),
        )
        return FluxBranch(embeds, pooled)

    def _initial_latents(self, call: Call, batch: int, size: tuple[int, int], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
        latents, _ = self.prepare_latents(batch, self.transformer.config.in_channels // 4, *size, dtype, device,
                                          call.generator, call.latents)
        return latents

    def _image_prompts(self, call: Call, branches, ents, batch: int, size: tuple[int, int],
                       device: torch.device) -> None:
        x = call.extra
        self._image_prompt_branches(branches, call.entity.entities, ents, x["ip_adapter_image"],
                                    x["ip_adapter_image_embeds"], x["negative_ip_adapter_image"],
                                    x["negative_ip_adapter_image_embeds"], batch, size, device)



class EliGenPipeline(FluxHooks, FluxPipeline):
    """FLUX with EliGen entity control. Loads any diffusers FLUX directory or hub id via ``from_pretrained``, and
    ``"eligen-tiny"``: the small model trained on the shapes world that ships inside the package."""

    family = FLUX

    @torch.no_grad()
    @eligen_call_doc("diffusers' FluxPipeline", """
        IP-Adapter (after ``pipe.load_ip_adapter(...)``; docs/design.md section 14): ``ip_adapter_image`` /
        ``ip_adapter_image_embeds`` and their negatives as in FluxPipeline (one image per loaded adapter; with true
        CFG and no negative image the negative branch gets a black one). The regional mask governs the joint
        attention; the image-prompt branch reaches every image token. An entity's own ``image`` (at its
        ``image_scale``) reaches only the image tokens it covers, in the positive branch; both can be used at once.
        entity_prompt_embeds are T5 embeddings; ``entity_tokens="trim"`` keeps each entity's real tokens plus 8 pads.
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
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: Any = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
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

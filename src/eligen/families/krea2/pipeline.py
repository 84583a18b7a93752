"""EliGenKrea2Pipeline: diffusers' Krea2Pipeline with entity prompts and regional attention (docs/design.md section
19).

Each entity prompt is encoded exactly as Krea2Pipeline encodes its global prompt and keeps the tokens the model
attends to (its masked padding dropped); the text sequence is ``[e_1 | ... | e_N | global]``, every text position is
zero, and the regional mask (section 2's rule) reaches every single-stream block while the text refiner keeps the
segments apart. With no entities every step is stock Krea2Pipeline. Inpainting fusion works here too. The call is the
shared one (:class:`eligen.pipelines.call.EliGenCallMixin`); this class holds Krea 2's hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import Krea2Pipeline
from diffusers.pipelines.krea2.pipeline_output import Krea2PipelineOutput

from ...entities import Entity
from ...pipelines.arguments import Call, check_finite, eligen_call_doc
from ...pipelines.call import EliGenCallMixin
from ...pipelines.mixin import logger
from ..base import Branch
from .model import DISTILLED_SHIFT_MU, KREA2, Krea2Guidance, krea_g

NATIVE_SIDE = 1024  # Krea2Pipeline's default height and width


class EliGenKrea2Pipeline(EliGenCallMixin, Krea2Pipeline):
    """Krea 2 with EliGen entity control; loads any diffusers Krea 2 directory.

    CFG: ``guidance_scale`` is Krea2Pipeline's own (``g``: ``cond + g (cond - uncond)``, on when ``g > 0``, default
    4.5); eligen's ``true_cfg_scale`` ``s`` is the same thing as ``s = 1 + g`` (what the commands pass). Give one of
    them. Krea 2's transformer takes no embedded guidance.
    """

    family = KREA2
    attention_kwargs_name = "attention_kwargs"
    output_class = Krea2PipelineOutput

    @property
    def default_sample_size(self) -> int:
        """Krea2Pipeline's default size (1024 pixels) in latent pixels."""
        return NATIVE_SIDE // self.vae_scale_factor

    def _size(self, height: int | None, width: int | None, inpainting: bool = False) -> tuple[int, int]:
        """Krea2Pipeline rounds a size off its patch grid up (with a warning); inpainting restores the input's size
        itself."""
        if not inpainting and height and width:
            grid = self.patch_grid
            rounded = -(-height // grid) * grid, -(-width // grid) * grid
            if rounded != (height, width):
                logger.warning(f"`height` and `width` must be multiples of {grid}; rounding up from {height}x{width} "
                               f"to {rounded[0]}x{rounded[1]}.")
                height, width = rounded
        return super()._size(height, width, inpainting)

    def _fill_defaults(self, call: Call) -> None:
        """``guidance_scale`` is Krea 2's CFG scale ``g``: it becomes eligen's ``true_cfg_scale = 1 + g`` (keeping
        ``g`` exactly), then the shared defaults; with CFG on and no negative prompt the negative prompt is "", as in
        Krea2Pipeline."""
        g = call.guidance_scale
        call.guidance_scale = None  # no embedded guidance in Krea 2
        if g is not None:
            if call.true_cfg_scale is not None:
                raise ValueError("Krea 2 has one CFG scale and no embedded guidance: pass guidance_scale "
                                 "(Krea2Pipeline's g, cond + g (cond - uncond)) or true_cfg_scale (eligen's s = 1 + g; "
                                 "the commands' --true-cfg), not both")
            check_finite(guidance_scale=g)
            call.true_cfg_scale = Krea2Guidance(g)
        super()._fill_defaults(call)
        call.guidance_scale = None  # a declared "guidance" has no meaning here either
        assert call.true_cfg_scale is not None  # filled by the shared rule
        if call.true_cfg_scale > 1 and call.negative_prompt is None and call.negative_prompt_embeds is None:
            call.negative_prompt = ""

    def _begin(self, call: Call) -> None:
        super()._begin(call)
        assert call.true_cfg_scale is not None
        self._guidance_scale = krea_g(call.true_cfg_scale)  # Krea2Pipeline's `guidance_scale` property

    def _schedule_mu(self, image_seq_len: int, num_inference_steps: int) -> float:
        """Krea2Pipeline's fixed shift for the distilled checkpoint; the family's resolution shift otherwise."""
        if self.config.get("is_distilled", False):
            return DISTILLED_SHIFT_MU
        return super()._schedule_mu(image_seq_len, num_inference_steps)

    def _check_parent_inputs(self, call: Call, size: tuple[int, int], do_true_cfg: bool) -> None:
        if self.patch_size != self.family.patch_size:
            raise ValueError(f"this Krea 2 checkpoint packs {self.patch_size}x{self.patch_size} latent patches; "
                             f"eligen's Krea 2 family knows {self.family.patch_size}x{self.family.patch_size} only")
        self.check_inputs(
            call.prompt, *size, negative_prompt=call.negative_prompt, prompt_embeds=call.prompt_embeds,
            prompt_embeds_mask=call.extra["prompt_embeds_mask"], negative_prompt_embeds=call.negative_prompt_embeds,
            negative_prompt_embeds_mask=call.extra["negative_prompt_embeds_mask"],
            callback_on_step_end_tensor_inputs=list(call.callback_on_step_end_tensor_inputs),
            max_sequence_length=call.max_sequence_length,
        )

    def _encode_branch(self, call: Call, negative: bool, device: torch.device) -> Branch:
        """Krea2Pipeline's ``encode_prompt`` (a negative string repeated for every prompt, as there); a branch that
        will carry entities drops the padding its prompts do not attend to."""
        side = "negative_" if negative else ""
        prompt = getattr(call, f"{side}prompt")
        if negative and isinstance(prompt, str):
            prompt = [prompt] * call.batch_size
        embeds, mask = self.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=call.num_images_per_prompt,
            prompt_embeds=getattr(call, f"{side}prompt_embeds"),
            prompt_embeds_mask=call.extra[f"{side}prompt_embeds_mask"], max_sequence_length=call.max_sequence_length,
        )
        entities = call.entity.given and (not negative or call.entity.entities_on_negative)
        return self.family.branch(embeds, mask, entities)

    def _initial_latents(self, call: Call, batch: int, size: tuple[int, int], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
        return self.prepare_latents(batch, self.transformer.config.in_channels // self.patch_size**2, *size, dtype,
                                    device, call.generator, call.latents)

    @torch.no_grad()
    @eligen_call_doc("diffusers' Krea2Pipeline", """
        ``guidance_scale`` is Krea2Pipeline's CFG scale ``g`` (``cond + g (cond - uncond)``, on when ``g > 0``);
        ``true_cfg_scale`` is eligen's ``s = 1 + g`` for the same combination (give one; default: g = 4.5). Entity
        embeddings are ``(T_i, L * D)`` each: a token's stack of ``L`` encoder hidden states flattened, without
        padding, as ``encode_entity_prompts`` returns them (so ``entity_tokens="trim"`` changes nothing). Krea 2 has
        no IP-Adapter in diffusers: entity images are refused.
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
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        attention_kwargs: dict[str, Any] | None = None,
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
    ) -> Krea2PipelineOutput | tuple:
        return self._eligen_call(Call.of(locals(), "attention_kwargs"))

"""Qwen-Image (diffusers ``QwenImagePipeline``), the reference's Qwen-Image EliGen semantics (docs/design.md 11).

- every entity prompt is encoded alone with the global prompt's chat template (its leading tokens dropped, as
  diffusers does), unpadded: segments have their true lengths;
- the text RoPE positions restart for every segment at the global prompt's first position;
- the mask rule is FLUX's (:mod:`eligen.regional.rule`) over the variable-length segments, in every
  double-stream block through ``attention_kwargs``; padded prompt batches mask their padding;
- true CFG is diffusers' norm-rescaled combination by default, the reference's plain one on request;
- latents are normalised by the VAE's per-channel ``latents_mean`` / ``latents_std`` and have one frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0, apply_rotary_emb_qwen
from diffusers.utils.torch_utils import get_module_execution_device

from ...regional.parallel import context_parallel_mask, local_text_rope
from ...regional.processors import RegionalProcessor, attend
from ...regional.sequence import TokenSequence
from ...schedules import TrainingSchedule, exponential_training_schedule
from ..base import Branch, ModelFamily, encode_framed, framed_latent_statistics
from . import CARD, CONTROLNET_CARD, EDIT_CARD, EDIT_PLUS_CARD

TRAIN_SHIFT_MU = 0.8  # the reference's Qwen-Image training scheduler: exponential shift mu 0.8, terminal sigma 0.02
TRAIN_SHIFT_TERMINAL = 0.02


def _qwen_mask(attention_mask, encoder_hidden_states_mask: torch.Tensor | None, n_img: int):
    """The joint mask of a Qwen-Image layer: the regional mask, the text padding mask, both, or neither. A regional
    mask longer than the local sequence (context parallelism) already holds the padding (``_parallel_mask``)."""
    if encoder_hidden_states_mask is None:
        return attention_mask
    if isinstance(attention_mask, torch.Tensor) and \
            attention_mask.shape[-1] != encoder_hidden_states_mask.shape[1] + n_img:
        return attention_mask
    keys = torch.cat([encoder_hidden_states_mask.bool(),
                      encoder_hidden_states_mask.new_ones(encoder_hidden_states_mask.shape[0], n_img).bool()], dim=1)
    keys = keys[:, None, None, :]
    if attention_mask is None:
        return keys
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError("padded prompts (a prompt batch of unequal lengths) need attention='dense' with entities")
    return attention_mask & keys


class RegionalQwenAttnProcessor(RegionalProcessor, QwenDoubleStreamAttnProcessor2_0):
    """diffusers' Qwen-Image double-stream processor that accepts the regional mask (the stock one refuses an
    external mask) and per-segment text positions.

    ``text_positions`` ``(T,)`` long: the RoPE position of every text token counted from the text offset, so each
    segment can restart at the global prompt's first position (docs/design.md section 11).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, text_positions=None):
        if encoder_hidden_states is None:
            raise ValueError("the Qwen-Image attention needs encoder_hidden_states (the text stream)")
        attention_mask = _qwen_mask(attention_mask, encoder_hidden_states_mask, hidden_states.shape[1])
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        img_query, img_key, img_value = (
            p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v))
        txt_query, txt_key, txt_value = (
            p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            if text_positions is not None:
                txt_freqs = local_text_rope(txt_freqs, text_positions, self._parallel_config)
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)
        joint = attend(joint_query, joint_key, joint_value, attention_mask, self._attention_backend,
                       self._parallel_config, dropout_p=0.0, is_causal=False)
        joint = joint.flatten(2, 3).to(joint_query.dtype)
        img_out = attn.to_out[0](joint[:, seq_txt:, :].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(joint[:, :seq_txt, :].contiguous())


# which token stream each linear layer acts on (regional LoRA, docs/design.md section 22): two streams throughout
QWEN_LORA_STREAMS: tuple[tuple[str, str | None], ...] = (
    (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\.net\..+)|img_in|proj_out", "image"),
    (r"transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)|txt_mlp\.net\..+)|txt_in",
     "text"),
    (r"transformer_blocks\.\d+\.(img_mod|txt_mod)\.1|norm_out\.linear|time_text_embed\..+", None),
)


class QwenImageFamily(ModelFamily):
    card = CARD
    lora_streams = QWEN_LORA_STREAMS
    context_parallel = True
    processors: ClassVar[dict[type, type]] = {QwenDoubleStreamAttnProcessor2_0: RegionalQwenAttnProcessor}
    # the reference's lora_target_modules for Qwen-Image EliGen (rank 32, lr 1e-4)
    lora_targets = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                    "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")

    def lora_train_names(self, transformer: torch.nn.Module) -> list[str]:
        return [name for name in self.block_linear_names(transformer)
                if any(name.endswith("." + target) for target in self.lora_targets)]

    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        """One prompt at a time, so no segment carries padding."""
        return [pipe._get_qwen_prompt_embeds(text, device)[0][:, :max_sequence_length] for text in prompts]

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(pipe._get_qwen_prompt_embeds(text)[0][0, :max_sequence_length].cpu(), None) for text in prompts]

    def positions(self, sequence: TokenSequence, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """``(T,)`` long: ``0..T_i - 1`` for every segment (each starts where the global prompt starts); None without
        entities (the transformer's own positions are then the same)."""
        if not sequence.entities:
            return None
        return sequence.positions_restarting(device)

    def padding(self, sequence: TokenSequence, valid: torch.Tensor | None, regional: Any) -> tuple[Any, Any]:
        """Padding is masked: the text mask goes to the transformer as ``encoder_hidden_states_mask`` and each layer
        joins it to the regional mask (:func:`_qwen_mask`)."""
        return valid, regional

    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        return encode_framed(pipe, pixels)

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
        mean, inv_std = framed_latent_statistics(pipe.vae, latents.device, latents.dtype)
        latents = (latents / inv_std + mean).to(get_module_execution_device(pipe.vae))
        return pipe.vae.decode(latents, return_dict=False)[0][:, :, 0]

    def geometry(self, pipe, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        """``img_shapes``: ``[[(frames, token rows, token columns)]]`` per sample, for a latent grid ``height x width``
        (latent pixels)."""
        return [[(1, height // 2, width // 2)]] * batch

    def forward(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                guidance: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
        kwargs = dict(attention_kwargs or {})
        if branch.attention_mask is not None:
            kwargs["attention_mask"] = self._parallel_mask(transformer, branch, latents.shape[1])
        if branch.positions is not None:
            kwargs["text_positions"] = branch.positions
        return transformer(
            hidden_states=latents, timestep=timestep, guidance=guidance, encoder_hidden_states_mask=branch.text_mask,
            encoder_hidden_states=branch.context, img_shapes=geometry, attention_kwargs=kwargs, return_dict=False,
        )[0]

    @staticmethod
    def _parallel_mask(transformer, branch: Branch, n_img: int):
        """The branch's regional mask, under context parallelism joined with the text padding mask (each rank holds
        only its chunk of that) and reordered for Ulysses (docs/design.md section 24)."""
        config = getattr(transformer, "_parallel_config", None)
        if getattr(config, "context_parallel_config", None) is None:
            return branch.attention_mask
        mask = _qwen_mask(branch.attention_mask, branch.text_mask, n_img)
        return context_parallel_mask(mask, config, branch.context.shape[1], n_img)

    def training_schedule(self) -> TrainingSchedule:
        """The reference Qwen-Image trainer's: exponential shift mu 0.8, terminal sigma 0.02, bell-weighted."""
        return exponential_training_schedule(1000, TRAIN_SHIFT_MU, TRAIN_SHIFT_TERMINAL)


QWEN_IMAGE = QwenImageFamily()


class QwenImageEditPlusFamily(QwenImageFamily):
    """Qwen-Image-Edit-Plus (diffusers ``QwenImageEditPlusPipeline``): Qwen-Image's transformer, latents and mask
    rule; its text template is the edit one. Entity instructions are encoded with it and without the input images
    (docs/design.md section 21)."""

    card = EDIT_PLUS_CARD
    context_parallel = False  # untested with the input-image tokens (docs/design.md section 24)

    def instruction_embeds(self, pipe, text: str, device: torch.device | None = None) -> torch.Tensor:
        """``(1, T, D)``: one instruction encoded with the edit template, without the input images."""
        return pipe._get_qwen_prompt_embeds(text, image=None, device=device)[0]

    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        return [self.instruction_embeds(pipe, text, device)[:, :max_sequence_length] for text in prompts]

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(self.instruction_embeds(pipe, text)[0, :max_sequence_length].cpu(), None) for text in prompts]


QWEN_IMAGE_EDIT_PLUS = QwenImageEditPlusFamily()

# the single-image edit template's vision block (QwenImageEditPipeline.prompt_template_encode holds one)
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


class QwenImageEditFamily(QwenImageEditPlusFamily):
    """Qwen-Image-Edit (diffusers ``QwenImageEditPipeline``, one input image): as Qwen-Image-Edit-Plus, but its
    template holds the input's vision block itself. An entity instruction is encoded with the template less that
    block, which is then the Plus template, text for text: no image placeholder without its image, the same tokens
    dropped (docs/design.md section 21)."""

    card = EDIT_CARD

    def instruction_embeds(self, pipe, text: str, device: torch.device | None = None) -> torch.Tensor:
        template = pipe.prompt_template_encode
        if VISION_BLOCK not in template:
            raise ValueError("this QwenImageEditPipeline's prompt template has no vision block to leave out of the "
                             "entity instructions; EliGen reads diffusers' own template")
        pipe.prompt_template_encode = template.replace(VISION_BLOCK, "", 1)
        try:
            return super().instruction_embeds(pipe, text, device)
        finally:
            pipe.prompt_template_encode = template


QWEN_IMAGE_EDIT = QwenImageEditFamily()


class QwenImageControlNetFamily(QwenImageFamily):
    """Qwen-Image with a ControlNet (diffusers ``QwenImageControlNetPipeline``): Qwen-Image's transformer, text and
    latents; only the card differs. The residuals are the pipeline's (docs/design.md section 23)."""

    card = CONTROLNET_CARD
    context_parallel = False  # diffusers' ControlNet model is not context-parallel (docs/design.md section 24)


QWEN_IMAGE_CONTROLNET = QwenImageControlNetFamily()

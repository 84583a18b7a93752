"""Krea 2 (diffusers ``Krea2Pipeline``), EliGen on its single-stream MMDiT (docs/design.md section 19).

- Text: every segment, the global prompt's and each entity's, is the pipeline's own construction
  (``get_text_hidden_states``: Qwen-Image's system prefix, the prompt, padding to ``max_sequence_length``, the
  5-token assistant suffix after the padding, encoder positions counting real tokens only, hidden states stacked from
  the selected encoder layers), and holds the tokens the model attends to: the prompt's and the suffix's. The padding
  is dropped, which is exact: Krea 2 masks it as a key in every attention, its rows never reach the output and every
  text position is 0. A segment is ``(T_i, num_text_layers * text_hidden_dim)``: the stack flattened per token.
- Text positions are all zero (as the transformer's own ``position_ids`` have them), so every segment sits where the
  global prompt sits.
- The mask: the transformer ignores masks passed to it and builds its own text padding mask, so its attention
  processors are eligen's (:class:`RegionalKrea2AttnProcessor`). A forward pre-hook on the transformer hands them the
  regional mask and the segments from the call's ``attention_kwargs``: the single-stream blocks attend under
  section 2's rule joined with the model's padding mask; the text refiner, which attends across all text, attends
  within each segment only; the layer-wise fusion blocks attend within one token and need nothing.
- CFG is Krea2Pipeline's ``cond + g (cond - uncond)``, with eligen's true-CFG scale ``s = 1 + g``.
- Latents are Qwen-Image's VAE latents, normalised per channel, one frame, packed in 2x2 patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_krea2 import Krea2AttnProcessor
from diffusers.utils.torch_utils import get_module_execution_device

from ...regional.processors import RegionalProcessor, attend
from ...regional.sequence import TokenSequence
from ...schedules import TrainingSchedule, bell_weighted, resolution_shift
from ..base import Branch, ModelFamily, encode_framed, framed_latent_statistics
from . import CARD

TEXT_SEGMENTS = "text_segments"  # the attention_kwargs key of the text segments (the refiner keeps them apart)
# Training noise levels: the inference schedule's exponential shift at the native 1024x1024 (4096 tokens), with
# Krea2Pipeline's documented scheduler anchors (256 -> 0.5, 6400 -> 1.15): mu = 0.90625
TRAIN_SHIFT_MU = resolution_shift(4096, 256, 6400, 0.5, 1.15)
DISTILLED_SHIFT_MU = 1.15  # Krea2Pipeline's fixed shift of the few-step distilled checkpoint


class Krea2Guidance(float):
    """eligen's true-CFG scale ``s = 1 + g`` of Krea2Pipeline's ``guidance_scale`` ``g``, which keeps ``g`` itself so
    the combination ``cond + g (cond - uncond)`` uses exactly the number the caller gave (``1 + g - 1`` is not always
    ``g`` in floating point)."""

    g: float

    def __new__(cls, g: float) -> Krea2Guidance:
        scale = super().__new__(cls, 1.0 + g)
        scale.g = g
        return scale


def krea_g(scale: float) -> float:
    """Krea2Pipeline's ``g`` of eligen's scale ``s``: ``s - 1``, or the ``g`` a :class:`Krea2Guidance` was made of."""
    return scale.g if isinstance(scale, Krea2Guidance) else scale - 1.0


def krea_cfg(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """Krea2Pipeline's CFG, ``cond + g (cond - uncond)`` with ``g = s - 1`` (plain CFG of scale ``s``, in its order)."""
    return positive + krea_g(scale) * (positive - negative)


def rescaled_krea_cfg(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`krea_cfg` rescaled, token by token, to the positive prediction's norm."""
    combined = krea_cfg(positive, negative, scale)
    return combined * (torch.norm(positive, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


@dataclass(frozen=True)
class TextSegments:
    """The text refiner's rule: attention stays within each of these slices of the text (docs/design.md 19)."""

    slices: tuple[slice, ...]


def _join(regional: Any, padding: torch.Tensor | None) -> Any:
    """The regional mask (any form) joined with the transformer's key-padding mask ``(B, 1, 1, L)`` bool."""
    if padding is None:
        return regional
    if not isinstance(regional, torch.Tensor):
        raise ValueError("padded prompts (a prompt batch whose prompts differ in token length) need "
                         "attention='dense' with entities")
    return regional & padding.bool()


class RegionalKrea2AttnProcessor(RegionalProcessor, Krea2AttnProcessor):
    """diffusers' ``Krea2AttnProcessor`` whose attention call is :func:`attend`, under the regional state of the
    current transformer call (set by :func:`hand_over`): ``regional`` is the regional mask of a single-stream block (in
    any form, joined here with the transformer's text padding mask) or the :class:`TextSegments` of a text-refiner
    block (attention within each segment), None for the stock computation. ``unmasked``: the block attends without the
    regional mask (:func:`eligen.speedups.mask_only_in_blocks`), under the model's own padding mask only."""

    regional: Any = None
    unmasked: bool = False

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        query = attn.to_q(hidden_states).unflatten(-1, (attn.num_heads, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.num_kv_heads, attn.head_dim))
        gate = attn.to_gate(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        groups = attn.num_heads // attn.num_kv_heads
        if groups > 1:  # as diffusers: the key/value heads repeated, so every kernel and mask form takes them
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        state = None if self.unmasked else self.regional
        if isinstance(state, TextSegments):
            hidden_states = torch.cat([
                attend(query[:, s], key[:, s], value[:, s],
                       None if attention_mask is None else attention_mask[..., s], self._attention_backend,
                       self._parallel_config)
                for s in state.slices], dim=1)
        else:
            mask = attention_mask if state is None else _join(state, attention_mask)
            hidden_states = attend(query, key, value, mask, self._attention_backend, self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states * torch.sigmoid(gate)
        return attn.to_out[0](hidden_states)


def unwrap(model: torch.nn.Module) -> Any:
    """The transformer inside a ``DistributedDataParallel`` or ``torch.compile`` wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _processors(blocks, where: str, needed: bool) -> list[RegionalKrea2AttnProcessor]:
    """The blocks' eligen processors; with ``needed`` another processor is refused by name (the transformer gives the
    blocks only its padding mask, so any other processor would drop the regional state silently)."""
    found = []
    for i, block in enumerate(blocks):
        processor = block.attn.processor
        if isinstance(processor, RegionalKrea2AttnProcessor):
            found.append(processor)
        elif needed:
            raise ValueError(f"attention processor {type(processor).__name__} at {where}.{i} cannot take the EliGen "
                             "regional mask (Krea2Transformer2DModel passes its blocks only the text padding mask); "
                             "call `pipe.transformer.set_default_attn_processor()`")
    return found


def hand_over(module: Any, args: tuple, kwargs: dict) -> None:
    """The transformer's forward pre-hook: ``attention_kwargs["attention_mask"]`` (the regional mask) to the
    single-stream blocks' processors, ``attention_kwargs["text_segments"]`` to the text refiner's; None to both when the
    call carries neither (every call sets them, so no state outlives the call that gave it, except for a backward pass
    that recomputes the blocks: gradient checkpointing)."""
    extra = kwargs.get("attention_kwargs") or {}
    regional, segments = extra.get("attention_mask"), extra.get(TEXT_SEGMENTS)
    for processor in _processors(module.transformer_blocks, "transformer_blocks", regional is not None):
        processor.regional = regional
    for processor in _processors(module.text_fusion.refiner_blocks, "text_fusion.refiner_blocks",
                                 segments is not None):
        processor.regional = segments


def install_hand_over(transformer: torch.nn.Module) -> None:
    """Put :func:`hand_over` on the transformer once (idempotent)."""
    module = unwrap(transformer)
    if not getattr(module, "_eligen_hand_over", False):
        module.register_forward_pre_hook(hand_over, with_kwargs=True)
        module._eligen_hand_over = True


class _Unmasked:
    """The handle :meth:`Krea2Family.drop_mask_in` returns: ``remove()`` gives the block its regional mask back."""

    def __init__(self, processor: RegionalKrea2AttnProcessor) -> None:
        self.processor = processor

    def remove(self) -> None:
        self.processor.unmasked = False


# which token stream each linear layer acts on (regional LoRA, docs/design.md section 22): the layer-wise fusion runs
# every text token's stack of encoder layers as one row of a batch; the blocks run [text | image] as one sequence
KREA2_LORA_STREAMS: tuple[tuple[str, str | None], ...] = (
    (r"text_fusion\.layerwise_blocks\.\d+\..+", "text-rows"),
    (r"text_fusion\.(projector|refiner_blocks\.\d+\..+)|txt_in\..+", "text"),
    (r"img_in|final_layer\.linear", "image"),
    (r"transformer_blocks\.\d+\..+", "joint"),
    (r"time_embed\..+|time_mod_proj", None),
)


class Krea2Family(ModelFamily):
    card = CARD
    lora_streams = KREA2_LORA_STREAMS
    processors: ClassVar[dict[type, type]] = {Krea2AttnProcessor: RegionalKrea2AttnProcessor}
    block_kwargs: ClassVar[str] = "attention_kwargs"  # the transformer's; hand_over gives the blocks their mask
    lora_rank = 32  # no EliGen reference for Krea 2: the reference's Qwen-Image rank

    @staticmethod
    def text_shape(transformer: torch.nn.Module) -> tuple[int, int]:
        """``(num_text_layers, text_hidden_dim)``: one token's stack of encoder hidden states."""
        config = unwrap(transformer).config
        return config.num_text_layers, config.text_hidden_dim

    @staticmethod
    def branch(embeds: torch.Tensor, mask: torch.Tensor, entities: bool) -> Branch:
        """The pipeline's ``(B, T, layers, D)`` text and ``(B, T)`` mask as a branch; with ``entities`` the padding
        no sample attends to is dropped (the text mask stays only where a batch's prompts differ in length)."""
        if entities:
            keep = mask.any(0)
            embeds, mask = embeds[:, keep], mask[:, keep]
            if bool(mask.all()):
                return Branch(embeds.flatten(-2))
        return Branch(embeds.flatten(-2), text_mask=mask)

    def _segments(self, pipe, prompts: Sequence[str], max_sequence_length: int, device) -> list[torch.Tensor]:
        """``(1, T_i, layers * D)`` per prompt: Krea2Pipeline's encoding of it, without its padding."""
        hidden, mask = pipe.get_text_hidden_states(list(prompts), max_sequence_length, device)
        return [hidden[i:i + 1, mask[i]].flatten(-2) for i in range(len(prompts))]

    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        """Each entity prompt exactly as the pipeline encodes its global prompt; the padding (masked by the model)
        dropped, so each segment has its prompt's tokens and the 5 suffix tokens."""
        return self._segments(pipe, prompts, max_sequence_length, device)

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        segments = self._segments(pipe, prompts, max_sequence_length, pipe._execution_device)
        return [(segment[0].cpu(), None) for segment in segments]

    def positions(self, sequence: TokenSequence, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(T, 3)`` float32 zeros: every text token sits at the origin, as in Krea2Pipeline's ``position_ids``."""
        return torch.zeros(sequence.text_length, 3, device=device)

    def padding(self, sequence: TokenSequence, valid: torch.Tensor | None, regional: Any) -> tuple[Any, Any]:
        """Padding is masked: the text mask goes to the transformer as ``encoder_attention_mask`` (it masks the
        padding as a key everywhere) and the processors join it with the regional mask."""
        return valid, regional

    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        return encode_framed(pipe, pixels)

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        latents = pipe._unpack_latents(latents, height, width).to(pipe.vae.dtype)
        mean, inv_std = framed_latent_statistics(pipe.vae, latents.device, latents.dtype)
        latents = (latents / inv_std + mean).to(get_module_execution_device(pipe.vae))
        return pipe.vae.decode(latents, return_dict=False)[0][:, :, 0]

    def geometry(self, pipe, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        """The image tokens' ``(n_img, 3)`` float32 positions ``(0, row, column)`` for a latent grid ``height x
        width`` (latent pixels), as Krea2Pipeline's ``prepare_position_ids`` makes them."""
        return pipe.prepare_position_ids(0, height // self.patch_size, width // self.patch_size, device)

    def forward(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                guidance: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
        kwargs = dict(attention_kwargs or {})
        if branch.attention_mask is not None:
            kwargs["attention_mask"] = branch.attention_mask
        if branch.sequence is not None and branch.sequence.entities:
            kwargs[TEXT_SEGMENTS] = TextSegments(tuple(branch.sequence.slices()))
        install_hand_over(transformer)
        text = branch.context.unflatten(-1, self.text_shape(transformer))
        positions = branch.positions
        if positions is None:
            positions = torch.zeros(text.shape[1], 3, device=geometry.device)
        return transformer(
            hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
            position_ids=torch.cat([positions.to(geometry), geometry]), encoder_attention_mask=branch.text_mask,
            attention_kwargs=kwargs, return_dict=False,
        )[0]

    def combine(self, mode: str):
        """Krea2Pipeline's ``cond + g (cond - uncond)`` (``mode`` "plain"; plain CFG of scale ``s = 1 + g`` in the
        pipeline's order) or that rescaled to the positive prediction's norm ("rescaled")."""
        super().combine(mode)  # checks the mode
        return krea_cfg if mode == "plain" else rescaled_krea_cfg

    def drop_mask_in(self, block: Any) -> _Unmasked:
        """The block's processor attends under the model's padding mask only (until the handle's ``remove()``)."""
        processor = block.attn.processor
        if not isinstance(processor, RegionalKrea2AttnProcessor):
            raise ValueError(f"{type(processor).__name__} at a Krea 2 block is not eligen's regional processor; "
                             "the block has no regional mask to drop")
        processor.unmasked = True
        return _Unmasked(processor)

    def training_schedule(self) -> TrainingSchedule:
        """No EliGen reference trainer exists for Krea 2: the inference schedule's exponential shift at the native
        size (mu 0.906) over 1000 uniform levels, with the reference's bell weights."""
        sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
        return bell_weighted(math.exp(TRAIN_SHIFT_MU) / (math.exp(TRAIN_SHIFT_MU) + (1 / sigmas - 1)))


KREA2 = Krea2Family()

"""Qwen-Image 2.1 (diffusers ``QwenImage21Pipeline`` / ``QwenImage21Transformer2DModel``) with EliGen
(docs/design.md section 20).

The transformer is single-stream and block-causal: one sequence ``[text | image]``, text tokens strictly causal (so
text never sees the image), the image bidirectional and seeing all the text before it. EliGen on it:

- every entity prompt is encoded alone with the global prompt's template (the system tokens dropped, as diffusers
  does), unpadded; the text is ``[e_1 | ... | e_N | global]``, then the image;
- text RoPE positions restart for every segment at the global prompt's first position, and the image keeps the
  positions it has after the global prompt alone;
- text rows: causal within their own segment only (segments never see each other); image rows: the shared rule
  (:mod:`eligen.regional.rule`), i.e. every image token, the global prompt and each entity covering it, in any mask
  form; padded text keys stay masked;
- the text KV cache (diffusers' default) stays valid: text rows never depend on the image or the step, so after the
  first step only the image rows run, with the image rows of the same mask;
- one token is one latent pixel (``patch_size = 1``); latents are normalised by the VAE's per-channel statistics;
- true CFG is the plain ``neg + s (pos - neg)`` of the stock pipeline (which runs without CFG by default).

``attention_kwargs`` never reaches the blocks in this transformer, so the family routes the regional mask itself: a
forward pre-hook on every block (installed once, first in line) hands the block's processor a dict in its
``attention_mask`` argument, ``{"model": <the model's own mask>, "rotary": ..., "sequence": ..., "attention_mask":
<the regional mask>}``, read from the call's :class:`RegionalContext` that :meth:`QwenImage21Family.forward` sets
for the one forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor,
    QwenImage21KVCache,
    QwenImage21TransformerBlock,
    _qwenimage21_prepare_qkv,
)
from diffusers.utils.torch_utils import get_module_execution_device

from ...regional.processors import RegionalProcessor, attend
from ...regional.sequence import TokenSequence
from ...schedules import TrainingSchedule, exponential_training_schedule
from ..base import Branch, ModelFamily
from . import CARD

TRAIN_SHIFT_MU = 0.8  # no reference trainer for 2.1: Qwen-Image's (exponential shift mu 0.8, terminal sigma 0.02)
TRAIN_SHIFT_TERMINAL = 0.02
SLOT_TOKENS = 4  # one vision-language image slot stands for a 2x2 group of latent tokens

# diffusers' First Block Cache finds a block's input and output through this registry; the 2.1 block (one tensor in,
# one out) is not registered in diffusers 0.42, so the cache could not run on it at all.
if QwenImage21TransformerBlock not in TransformerBlockRegistry._registry:
    TransformerBlockRegistry.register(QwenImage21TransformerBlock, TransformerBlockMetadata(  # diffusers passes
        return_hidden_states_index=0, return_encoder_hidden_states_index=None))  # type: ignore[arg-type]  # None too


@dataclass
class RegionalContext:
    """What one forward with entities hands every block: the regional mask (any form, None without), the branch's
    :class:`TokenSequence` and the rotary embedding of the whole ``[text | image]`` sequence with EliGen's
    positions."""

    mask: Any
    sequence: TokenSequence
    rotary: torch.Tensor


class _Holder:
    """The context of the forward in progress (None outside one), read by the block hooks."""

    context: RegionalContext | None = None


@dataclass
class BranchState:
    """A CFG branch's state over one call: its text KV cache (diffusers' ``QwenImage21KVCache``, filled by the
    branch's first forward) and its regional context (built once)."""

    cache: QwenImage21KVCache | None = None
    context: RegionalContext | None = None
    geometry: Any = None


@dataclass
class QwenImage21Branch(Branch):
    """A branch with its KV-cache state. The state is not an init field, so ``dataclasses.replace`` (``entity_steps``'
    entity-free branches) gives the new branch a fresh, empty state instead of sharing the cache of another text."""

    use_kv_cache: bool = True
    state: BranchState = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.state = BranchState()


def _unwrapped(transformer: torch.nn.Module) -> Any:
    """The transformer itself under a DDP wrapper (``.module``) or a torch.compile one (``._orig_mod``)."""
    for name in ("module", "_orig_mod"):
        inner = getattr(transformer, name, None)
        if isinstance(inner, torch.nn.Module):
            transformer = inner
    return transformer


def _holder(transformer: Any) -> _Holder:
    """The transformer's context holder; the first call puts the carrying pre-hook on every block (first in line, so
    hooks added later, e.g. ``eligen.speedups.mask_only_in_blocks``, see what it hands on). Each block keeps the
    holder in its own ``__dict__`` (so a deep copy of the transformer gets one holder of its own, shared by its
    blocks)."""
    holder = transformer.__dict__.get(HOLDER)
    if holder is None:
        holder = _Holder()
        for block in transformer.transformer_blocks:
            block.__dict__[HOLDER] = holder
            block.register_forward_pre_hook(_carry, with_kwargs=True, prepend=True)
        transformer.__dict__[HOLDER] = holder
    return holder


HOLDER = "_eligen_regional"
ATTENTION_MASK_ARG = 3  # a block's positional arguments under gradient checkpointing: hidden, modulation, rope, mask


def _carried(block, mask) -> dict[str, Any] | None:
    """``{"model": mask, ...the forward's context}`` for eligen's processor; None where the block's processor is
    another or the mask is carried already."""
    holder = block.__dict__.get(HOLDER)
    if holder is None or isinstance(mask, dict) or not isinstance(block.attn.processor,
                                                                   RegionalQwenImage21AttnProcessor):
        return None
    carried: dict[str, Any] = {"model": mask}
    context = holder.context
    if context is not None:
        carried.update(rotary=context.rotary, sequence=context.sequence, attention_mask=context.mask)
    return carried


@torch.compiler.disable  # a few dict entries; traced, it would guard on every block argument and recompile
def _carry(block, args, kwargs):
    """The block's ``attention_mask`` (a keyword, or the fourth positional argument) -> :func:`_carried`."""
    positional = "attention_mask" not in kwargs and len(args) > ATTENTION_MASK_ARG
    carried = _carried(block, args[ATTENTION_MASK_ARG] if positional else kwargs.get("attention_mask"))
    if carried is None:
        return None
    if positional:
        args = (*args[:ATTENTION_MASK_ARG], carried, *args[ATTENTION_MASK_ARG + 1:])
    else:
        kwargs["attention_mask"] = carried
    return args, kwargs


def _checkpoint_carrying(checkpoint, block, *args):
    """Gradient checkpointing of a block with the context bound into its arguments: the backward pass recomputes the
    block after the forward has cleared the context, from these same arguments."""
    if len(args) > ATTENTION_MASK_ARG:
        carried = _carried(block, args[ATTENTION_MASK_ARG])
        if carried is not None:
            args = (*args[:ATTENTION_MASK_ARG], carried, *args[ATTENTION_MASK_ARG + 1:])
    return checkpoint(block, *args)


class RegionalQwenImage21AttnProcessor(RegionalProcessor, QwenImage21AttnProcessor):
    """diffusers' Qwen-Image 2.1 processor that applies EliGen's mask (docs/design.md section 20).

    Without a context it is the stock processor. With one (the dict the block hook hands it as ``attention_mask``):
    the rotary embedding is EliGen's (positions restarting per segment); with the regional mask, text rows attend
    causally within their own segment, image rows under the regional mask's image rows (dense, flex or segmented),
    padded text keys masked. With the context but no mask (a block ``mask_only_in_blocks`` leaves out) the block
    attends as the model does, block-causally over the whole sequence.
    """

    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                 kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
        if isinstance(attention_mask, dict):
            carried, attention_mask = attention_mask, attention_mask.get("model")
            if carried.get("rotary") is not None:  # the transformer's rotary rows of the same tokens, re-positioned
                rotary_emb = carried["rotary"][-hidden_states.shape[1]:]
            if carried.get("attention_mask") is not None:
                return self._regional(attn, hidden_states, carried["attention_mask"], carried["sequence"],
                                      attention_mask, rotary_emb, layer_cache, kv_cache_mode, cache_write_slice,
                                      key_valid)
        return super().__call__(attn, hidden_states, attention_mask, rotary_emb, layer_cache, kv_cache_mode,
                                cache_write_slice, segments, key_valid)

    def _regional(self, attn, hidden_states, regional, sequence: TokenSequence, model_mask, rotary_emb, layer_cache,
                  kv_cache_mode, cache_write_slice, key_valid):
        query, key, value, seq_len_q = _qwenimage21_prepare_qkv(attn, hidden_states, rotary_emb, layer_cache,
                                                                  kv_cache_mode, cache_write_slice)
        n_text = sequence.text_length
        if key.shape[1] <= n_text:
            raise ValueError(f"the sequence has {key.shape[1]} tokens, not the {n_text} text tokens and an image "
                             "its regional mask was built for")
        # valid keys (B, L): the prefill gets them as key_valid, the cached steps as the (B, 1, 1, L) padding mask
        keys = key_valid if key_valid is not None else (
            model_mask[:, 0, 0, :] if isinstance(model_mask, torch.Tensor) else None)
        image = self._image_rows(query[:, -(key.shape[1] - n_text):], key, value, regional, n_text, keys)
        if seq_len_q < key.shape[1]:  # cached: the text rows ran at the first step
            out = image
        else:
            out = torch.cat([self._text_rows(query, key, value, sequence, keys), image], dim=1)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _text_rows(self, query, key, value, sequence: TokenSequence, keys) -> torch.Tensor:
        """Each segment's rows: causal over its own tokens (the model's text rule, segments kept apart)."""
        outs = []
        for part in sequence.slices():
            if keys is None:
                mask, causal = None, True
            else:
                size = part.stop - part.start
                triangle = torch.ones(size, size, dtype=torch.bool, device=query.device).tril()
                mask, causal = triangle[None, None] & keys[:, None, None, part].bool(), False
            outs.append(dispatch_attention_fn(query[:, part], key[:, part], value[:, part], attn_mask=mask,
                                              dropout_p=0.0, is_causal=causal, backend=None,
                                              parallel_config=self._parallel_config))
        return torch.cat(outs, dim=1)

    def _image_rows(self, image_query, key, value, regional, n_text: int, keys) -> torch.Tensor:
        """The image rows of the regional mask over all ``[text | image]`` keys. A dense mask gives its image rows;
        the flex and segmented forms run over the whole sequence with zero text queries (rows dropped after)."""
        if isinstance(regional, torch.Tensor):
            mask = regional[:, :, n_text:, :]
            if keys is not None:
                mask = mask & keys[:, None, None, :].bool()
            return attend(image_query, key, value, mask, self._attention_backend, self._parallel_config,
                          dropout_p=0.0, is_causal=False)
        if keys is not None:
            raise ValueError("padded prompts (a prompt batch of unequal lengths) need attention='dense' with entities")
        batch, _, heads, dim = image_query.shape
        query = torch.cat([image_query.new_zeros(batch, n_text, heads, dim), image_query], dim=1)
        return attend(query, key, value, regional, self._attention_backend, self._parallel_config)[:, n_text:]


# which token stream each linear layer acts on (regional LoRA, docs/design.md section 22): one sequence [text | image]
# through every block and the output projection (the cached steps run its image rows alone)
QWEN21_LORA_STREAMS: tuple[tuple[str, str | None], ...] = (
    (r"txt_in\.(in_layer|out_layer)", "text"),
    (r"img_in", "image"),
    (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\..+)|proj_out", "joint"),
    (r"modulation\.1|norm_out\.linear|time_text_embed\..+", None),
)


class QwenImage21Family(ModelFamily):
    card = CARD
    lora_streams = QWEN21_LORA_STREAMS
    patch_size = 1  # the transformer takes latents unpatched: one token is one latent pixel (16 pixels)
    lora_rank = 32  # no 2.1 reference: Qwen-Image's reference rank
    block_kwargs = "attention_mask"  # the block argument that carries the mask (a dict, see the module doc)
    processors: ClassVar[dict[type, type]] = {QwenImage21AttnProcessor: RegionalQwenImage21AttnProcessor,
                                              QwenImage21FlexAttnProcessor: RegionalQwenImage21AttnProcessor}

    # -- text ----------------------------------------------------------------------------------------------------

    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        """One prompt at a time with the global prompt's template and encoder output, so no segment is padded; at
        most ``max_sequence_length`` tokens each."""
        return [pipe._get_qwen_prompt_embeds(text, device=device)[0][:, :max_sequence_length] for text in prompts]

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [(pipe._get_qwen_prompt_embeds(text)[0][0, :max_sequence_length].cpu(), None) for text in prompts]

    def positions(self, sequence: TokenSequence, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """``(T,)`` long: ``0..T_i - 1`` for every segment; None without entities (the model's own positions)."""
        if not sequence.entities:
            return None
        return sequence.positions_restarting(device)

    def padding(self, sequence: TokenSequence, valid: torch.Tensor | None, regional: Any) -> tuple[Any, Any]:
        """Padding is masked as the model masks it: the text mask goes in as ``encoder_hidden_states_mask``."""
        return valid, regional

    # -- latents -------------------------------------------------------------------------------------------------

    def _statistics(self, vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and std, ``(1, C, 1, 1, 1)``, as the pipeline makes them."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(device, dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(device, dtype)
        return mean, std

    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """RGB pixels become opaque RGBA (the VAE reads four channels, as the pipeline's RGBA condition images)."""
        if pipe.vae.config.in_channels == 4 and pixels.shape[1] == 3:
            pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
        z = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()  # (B, C, 1, h, w)
        mean, std = self._statistics(pipe.vae, z.device, z.dtype)
        z = ((z - mean) / std)[:, :, 0]
        return pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Exactly the pipeline's decode; the VAE gives RGBA (four channels)."""
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
        mean, std = self._statistics(pipe.vae, latents.device, latents.dtype)
        latents = (latents * std + mean).to(get_module_execution_device(pipe.vae))
        return pipe.vae.decode(latents, return_dict=False)[0][:, :, 0]

    def geometry(self, pipe, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        """``img_shapes``: ``[[(1, rows, columns)]]`` per sample, one token per latent pixel."""
        return [[(1, height, width)]] * batch

    # -- the transformer -----------------------------------------------------------------------------------------

    def _context(self, transformer, branch: Branch, geometry, device: torch.device) -> RegionalContext:
        """The mask, the sequence and the rotary embedding of ``[text | image]``: the text rows at the branch's
        positions, the image rows as after the global prompt alone."""
        sequence = branch.sequence
        assert sequence is not None and branch.positions is not None  # a branch with entities has both
        rope = transformer.pos_embed
        shapes = geometry[0]
        n_img = sum(f * h * w for f, h, w in shapes)
        layout = torch.zeros(sequence.global_length + n_img, dtype=torch.bool, device=device)
        layout[sequence.global_length:] = True
        plain = rope(shapes, layout, device=device)  # the global prompt alone, then the image
        text = torch.cat([freqs[branch.positions.to(device)] for freqs in rope.freqs], dim=-1)
        return RegionalContext(branch.attention_mask, sequence, torch.cat([text, plain[sequence.global_length:]]))

    def forward(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                guidance: torch.Tensor | None, attention_kwargs: dict | None = None) -> torch.Tensor:
        """One forward as the pipeline makes it (the image slots appended to the text's, the KV cache filled by the
        branch's first forward and read after), with EliGen's context when the branch has entities."""
        inner = _unwrapped(transformer)
        holder = _holder(inner)
        n_img, device = latents.shape[1], latents.device
        text = branch.context
        # one slot per 2x2 group of image tokens after the text's (which hold no image): row 0 is read
        img_mask = torch.cat([torch.zeros(1, text.shape[1], dtype=torch.bool, device=device),
                              torch.ones(1, n_img // SLOT_TOKENS, dtype=torch.bool, device=device)], dim=1)
        state = branch.state if isinstance(branch, QwenImage21Branch) else BranchState()
        cache, mode = None, None
        if isinstance(branch, QwenImage21Branch) and branch.use_kv_cache and inner.config.causal_condition:
            mode = "cached" if state.cache is not None else "extract"
            if state.cache is None:
                state.cache = QwenImage21KVCache(len(inner.transformer_blocks))
            cache = state.cache
        context = None
        if branch.attention_mask is not None or branch.positions is not None:
            self._check_processors(inner)
            if state.context is None or state.geometry != geometry:
                state.context, state.geometry = self._context(inner, branch, geometry, device), geometry
            context = state.context
        checkpoint = None
        if context is not None and getattr(inner, "gradient_checkpointing", False) and torch.is_grad_enabled():
            checkpoint = inner._gradient_checkpointing_func
            inner._gradient_checkpointing_func = partial(_checkpoint_carrying, checkpoint)
        holder.context = context
        try:
            out = transformer(
                hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                encoder_hidden_states_mask=branch.text_mask, img_shapes=geometry, img_mask=img_mask,
                attention_kwargs=attention_kwargs, kv_cache=cache, kv_cache_mode=mode, return_dict=False,
            )[0]
        finally:
            holder.context = None
            if checkpoint is not None:
                inner._gradient_checkpointing_func = checkpoint
        return out[:, -n_img:]

    @staticmethod
    def _check_processors(transformer) -> None:
        for index, block in enumerate(transformer.transformer_blocks):
            if not isinstance(block.attn.processor, RegionalQwenImage21AttnProcessor):
                raise ValueError(f"attention processor {type(block.attn.processor).__name__} at transformer_blocks."
                                 f"{index} cannot take the EliGen regional mask; use the model's stock processor "
                                 "(eligen replaces it by its regional one)")

    # -- training ------------------------------------------------------------------------------------------------

    def training_schedule(self) -> TrainingSchedule:
        """Qwen-Image's reference noise levels (exponential shift mu 0.8, terminal sigma 0.02), bell-weighted."""
        return exponential_training_schedule(1000, TRAIN_SHIFT_MU, TRAIN_SHIFT_TERMINAL)


QWEN_IMAGE21 = QwenImage21Family()

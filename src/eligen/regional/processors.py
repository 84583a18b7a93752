"""Regional attention as attention processors set on the transformer (no global state).

The regional mask reaches every attention layer as ``attention_mask`` (through ``joint_attention_kwargs`` /
``attention_kwargs``) in one of three exact forms, and :func:`attend` runs the form it is given:

- a bool tensor ``(B, 1, L, L)``: diffusers' attention dispatcher, with the layer's own backend;
- a FlexAttention ``BlockMask``: :func:`eligen.regional.flex.flex_attend`;
- a :class:`~eligen.regional.segmented.SegmentedMask`: unmasked calls merged by log-sum-exp.

Nothing is swapped in diffusers' backend registry, so two pipelines (or threads) never see each other's masks.
Without a mask the processors compute exactly what diffusers' stock processors compute.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxIPAdapterAttnProcessor,
    _get_qkv_projections,
)
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0, apply_rotary_emb_qwen

from .flex import BlockMask, flex_attend
from .segmented import SegmentedMask, segmented_attention

# Backends that apply an arbitrary (B, 1, Lq, Lk) boolean mask. The flash, sage and xformers backends either
# ignore ``attn_mask`` or read it as a key-padding mask, which would silently drop the regional layout.
MASK_CAPABLE_BACKENDS = frozenset(
    {
        AttentionBackendName.NATIVE,
        AttentionBackendName._NATIVE_MATH,
        AttentionBackendName._NATIVE_EFFICIENT,
        AttentionBackendName._NATIVE_CUDNN,
        AttentionBackendName.FLEX,
    }
)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, backend=None, parallel_config=None,
           **kwargs) -> torch.Tensor:
    """Attention of ``(B, L, H, D)`` query/key/value under ``mask`` in whichever form it comes (None: none)."""
    if isinstance(mask, SegmentedMask):
        return segmented_attention(query, key, value, mask)
    if BlockMask is not None and isinstance(mask, BlockMask):
        return flex_attend(query, key, value, mask)
    return dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend, parallel_config=parallel_config,
                                 **kwargs)


class RegionalFluxAttnProcessor(FluxAttnProcessor):
    """diffusers' ``FluxAttnProcessor`` whose attention call is :func:`attend` (every form of the regional mask)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:  # double-stream block: text first, as diffusers concatenates
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = attend(query, key, value, attention_mask, self._attention_backend, self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def _qwen_mask(attention_mask, encoder_hidden_states_mask: torch.Tensor | None, n_img: int):
    """The joint mask of a Qwen-Image layer: the regional mask, the text padding mask, both, or neither."""
    if encoder_hidden_states_mask is None:
        return attention_mask
    keys = torch.cat([encoder_hidden_states_mask.bool(),
                      encoder_hidden_states_mask.new_ones(encoder_hidden_states_mask.shape[0], n_img).bool()], dim=1)
    keys = keys[:, None, None, :]
    if attention_mask is None:
        return keys
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError("padded prompts (a prompt batch of unequal lengths) need attention='dense' with entities")
    return attention_mask & keys


class RegionalQwenAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
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
                txt_freqs = txt_freqs[text_positions]
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


REGIONAL_PROCESSORS = {FluxAttnProcessor: RegionalFluxAttnProcessor,
                       QwenDoubleStreamAttnProcessor2_0: RegionalQwenAttnProcessor}
KNOWN_PROCESSORS = (FluxAttnProcessor, FluxIPAdapterAttnProcessor, RegionalQwenAttnProcessor)
OWN_PROCESSORS = tuple(REGIONAL_PROCESSORS.values())


def install_regional_processors(transformer) -> None:
    """Replace diffusers' stock FLUX / Qwen-Image processors of ``transformer`` by the regional ones (a backend
    pinned on a layer is kept). Other processors (IP-Adapter, user-made) stay; idempotent."""
    current = transformer.attn_processors
    if not any(type(p) in REGIONAL_PROCESSORS for p in current.values()):
        return
    processors = {}
    for name, processor in current.items():
        regional = REGIONAL_PROCESSORS.get(type(processor))
        if regional is not None:
            replacement = regional()
            for pinned in ("_attention_backend", "_parallel_config"):
                if pinned in vars(processor):
                    setattr(replacement, pinned, vars(processor)[pinned])
            processor = replacement
        processors[name] = processor
    transformer.set_attn_processor(processors)


def _backend_of(processor: object) -> AttentionBackendName:
    backend = getattr(processor, "_attention_backend", None)
    if backend is None:
        backend, _ = _AttentionBackendRegistry.get_active_backend()
    return AttentionBackendName(backend)


def check_regional_attention_support(transformer, backend: str = "dense") -> None:
    """Raise ``ValueError`` unless every attention layer of ``transformer`` applies the regional mask in full.

    ``backend`` is the mask's form: ``dense`` (a bool tensor: any processor taking ``attention_mask`` on a
    mask-capable backend), ``flex`` or ``segmented`` (only eligen's processors run those; a layer pinned to
    another backend is refused rather than silently overridden).
    """
    required = {"flex": AttentionBackendName.FLEX, "segmented": AttentionBackendName.NATIVE}.get(backend)
    for name, processor in transformer.attn_processors.items():
        if not isinstance(processor, KNOWN_PROCESSORS):
            params = inspect.signature(processor.__call__).parameters
            if "attention_mask" not in params:
                raise ValueError(
                    f"attention processor {type(processor).__name__} at {name} takes no `attention_mask`, so the "
                    "EliGen regional mask would be dropped; call `pipe.transformer.set_default_attn_processor()` "
                    "or use the model's stock processor"
                )
        if required is not None:
            if not isinstance(processor, OWN_PROCESSORS):
                raise ValueError(
                    f"attention processor {type(processor).__name__} at {name} cannot run the {backend} regional "
                    "mask; pass attention='dense'"
                )
            pinned = vars(processor).get("_attention_backend")
            if pinned is not None and AttentionBackendName(pinned) != required:
                raise ValueError(
                    f"attention layer {name} is pinned to backend '{AttentionBackendName(pinned).value}', which "
                    f"cannot take the {backend} regional mask; pass attention='dense' or reset it with "
                    "`pipe.transformer.reset_attention_backend()`"
                )
            continue
        resolved = _backend_of(processor)
        if resolved not in MASK_CAPABLE_BACKENDS:
            allowed = ", ".join(sorted(b.value for b in MASK_CAPABLE_BACKENDS))
            raise ValueError(
                f"attention backend '{resolved.value}' (at {name}) cannot apply a full query-by-key mask, so the "
                f"EliGen regional mask would be dropped; use one of: {allowed}, e.g. "
                "`pipe.transformer.set_attention_backend('native')`"
            )

"""Regional attention as attention processors set on the transformer (no global state); each family module
defines its processor (:class:`RegionalProcessor`), this module the attention call they share and the checks.

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
from typing import Any

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn

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


class RegionalProcessor:
    """Marks eligen's attention processors: they run every form of the regional mask through :func:`attend`.
    Each model family defines its own (in its family module) and names the stock processor it replaces."""


def attention_processors(transformer) -> dict[str, Any]:
    """``transformer.attn_processors`` (``"<module>.processor" -> processor``); a transformer without diffusers'
    ``AttentionMixin`` gets the same walk over its attention modules."""
    if hasattr(transformer, "attn_processors"):
        return transformer.attn_processors
    return {f"{name}.processor": module.get_processor() for name, module in transformer.named_modules()
            if hasattr(module, "get_processor")}


def set_attention_processors(transformer, processors: dict[str, Any]) -> None:
    """``transformer.set_attn_processor(processors)``, or the same per attention module without ``AttentionMixin``."""
    if hasattr(transformer, "set_attn_processor"):
        transformer.set_attn_processor(processors)
        return
    for name, module in transformer.named_modules():
        if hasattr(module, "set_processor"):
            module.set_processor(processors[f"{name}.processor"])


def install_regional_processors(transformer, replacements: dict[type, type]) -> None:
    """Replace the stock processors of ``transformer`` by the family's regional ones (``replacements``: stock class
    -> regional class); a backend pinned on a layer is kept. Other processors (user-made) stay; idempotent."""
    current = attention_processors(transformer)
    if not any(type(p) in replacements for p in current.values()):
        return
    processors = {}
    for name, processor in current.items():
        regional = replacements.get(type(processor))
        if regional is not None:  # a processor holding weights (IP-Adapter) is rebuilt around them
            replacement = regional.from_stock(processor) if hasattr(regional, "from_stock") else regional()
            for pinned in ("_attention_backend", "_parallel_config"):
                if pinned in vars(processor):
                    setattr(replacement, pinned, vars(processor)[pinned])
            processor = replacement
        processors[name] = processor
    set_attention_processors(transformer, processors)


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
    for name, processor in attention_processors(transformer).items():
        if not isinstance(processor, RegionalProcessor):
            params = inspect.signature(processor.__call__).parameters
            if "attention_mask" not in params:
                raise ValueError(
                    f"attention processor {type(processor).__name__} at {name} takes no `attention_mask`, so the "
                    "EliGen regional mask would be dropped; call `pipe.transformer.set_default_attn_processor()` "
                    "or use the model's stock processor"
                )
        if required is not None:
            if not isinstance(processor, RegionalProcessor):
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

"""Checks that the transformer's attention will honour a full query-by-key regional mask."""

from __future__ import annotations

import inspect

from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

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
KNOWN_PROCESSORS = (FluxAttnProcessor, FluxIPAdapterAttnProcessor)


def _backend_of(processor: object) -> AttentionBackendName:
    backend = getattr(processor, "_attention_backend", None)
    if backend is None:
        backend, _ = _AttentionBackendRegistry.get_active_backend()
    return AttentionBackendName(backend)


def check_regional_attention_support(transformer) -> None:
    """Raise ``ValueError`` unless every attention layer of ``transformer`` applies ``attention_mask`` in full."""
    for name, processor in transformer.attn_processors.items():
        if not isinstance(processor, KNOWN_PROCESSORS):
            params = inspect.signature(processor.__call__).parameters
            if "attention_mask" not in params:
                raise ValueError(
                    f"attention processor {type(processor).__name__} at {name} takes no `attention_mask`, so the "
                    "EliGen regional mask would be dropped; call `pipe.transformer.set_default_attn_processor()` "
                    "or use diffusers' FluxAttnProcessor"
                )
        backend = _backend_of(processor)
        if backend not in MASK_CAPABLE_BACKENDS:
            allowed = ", ".join(sorted(b.value for b in MASK_CAPABLE_BACKENDS))
            raise ValueError(
                f"attention backend '{backend.value}' (at {name}) cannot apply a full query-by-key mask, so the "
                f"EliGen regional mask would be dropped; use one of: {allowed}, e.g. "
                "`pipe.transformer.set_attention_backend('native')`"
            )

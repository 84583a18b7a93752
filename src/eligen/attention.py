"""Checks that the transformer's attention will honour a full query-by-key regional mask."""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager

import torch
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


def check_regional_attention_support(transformer, backend: str = "dense") -> None:
    """Raise ``ValueError`` unless every attention layer of ``transformer`` applies ``attention_mask`` in full.

    ``backend`` is the mask's form: ``dense`` (any mask-capable backend), ``flex`` (a BlockMask: layers must
    follow the active backend, which the pipeline sets to flex) or ``segmented`` (likewise, set to native).
    """
    required = {"flex": AttentionBackendName.FLEX, "segmented": AttentionBackendName.NATIVE}.get(backend)
    for name, processor in transformer.attn_processors.items():
        if not isinstance(processor, KNOWN_PROCESSORS):
            params = inspect.signature(processor.__call__).parameters
            if "attention_mask" not in params:
                raise ValueError(
                    f"attention processor {type(processor).__name__} at {name} takes no `attention_mask`, so the "
                    "EliGen regional mask would be dropped; call `pipe.transformer.set_default_attn_processor()` "
                    "or use diffusers' FluxAttnProcessor"
                )
        if required is not None:
            pinned = getattr(processor, "_attention_backend", None)
            if pinned is not None and AttentionBackendName(pinned) != required:
                raise ValueError(
                    f"attention layer {name} is pinned to backend '{AttentionBackendName(pinned).value}', which "
                    f"cannot take the {backend} regional mask; pass attention='dense' or reset it with "
                    "`pipe.transformer.reset_attention_backend()`"
                )
            continue
        backend = _backend_of(processor)
        if backend not in MASK_CAPABLE_BACKENDS:
            allowed = ", ".join(sorted(b.value for b in MASK_CAPABLE_BACKENDS))
            raise ValueError(
                f"attention backend '{backend.value}' (at {name}) cannot apply a full query-by-key mask, so the "
                f"EliGen regional mask would be dropped; use one of: {allowed}, e.g. "
                "`pipe.transformer.set_attention_backend('native')`"
            )


class _CompiledFlexModule:
    """Stands in for ``torch.nn.attention.flex_attention`` inside diffusers' dispatcher with a compiled kernel."""

    def __init__(self, module, compiled):
        self._module = module
        self.flex_attention = compiled

    def __getattr__(self, name: str):
        return getattr(self._module, name)


_COMPILED_FLEX = None


@contextmanager
def flex_backend(compiled: bool):
    """Route attention through diffusers' ``flex`` backend for the duration of the block.

    Eager ``flex_attention`` materialises the whole score matrix; with ``compiled`` (use it on CUDA) the
    dispatcher calls a ``torch.compile``-d ``flex_attention`` instead, which generates the fused,
    block-sparse kernel. Inside an already compiled transformer the inner compile is simply inlined.
    """
    import diffusers.models.attention_dispatch as dispatch

    global _COMPILED_FLEX
    original = dispatch.flex_attention
    if compiled:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(original.flex_attention, dynamic=False)
        dispatch.flex_attention = _CompiledFlexModule(original, _COMPILED_FLEX)
    try:
        with dispatch.attention_backend(AttentionBackendName.FLEX), warnings.catch_warnings():
            # Off CUDA the unfused reference path is the point (exact, no compile): do not warn about it.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            yield
    finally:
        dispatch.flex_attention = original

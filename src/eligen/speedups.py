"""Opt-in accelerators that work with entities; each is measured against the exact output by
``benchmarks/generate_e2e.py`` (README "Speed"). None is on by default, and only ``first_block_cache(pipe, 0)``
is exact.

- :func:`enable_first_block_cache`: diffusers' First Block Cache on the transformer. Its state is kept per CFG
  branch: the shared loop runs each branch inside ``transformer.cache_context(name)`` (``"cond"``, ``"uncond"``),
  so the entity branch (a longer text sequence) and the plain negative branch never compare residuals with each
  other. A step whose first-block residual changed by less than ``threshold`` (relative mean absolute change)
  reuses the rest of the network's residual from the branch's last full step. diffusers 0.42 ships no TeaCache
  (its other caches need per-model calibration); First Block Cache is TeaCache's simpler, model-agnostic relative.
- :func:`quantize_fp8`: fp8 weight-only linear layers (``torch.float8_e4m3fn`` storage, one scale per output
  channel, dequantised in ``forward``) for exactly the named layers; by default every linear of the transformer
  blocks. Halves their weight memory against bf16; written here rather than taken from torchao, whose compiled
  kernels do not load with torch 2.13 and whose import makes diffusers and transformers print warnings.
- ``entity_steps=k`` (a pipeline argument) and :func:`mask_only_in_blocks`: the regional-prompting trade, both
  approximate. ``entity_steps`` runs the entities in the first ``k`` steps only, then the plain forward of the
  global prompt (the plain model's cost for the remaining steps); ``mask_only_in_blocks`` applies the regional mask in
  the named blocks only, the others attending over the whole sequence unmasked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


# -- First Block Cache ----------------------------------------------------------------------------------------------

def enable_first_block_cache(pipe, threshold: float = 0.05) -> None:
    """diffusers' First Block Cache on ``pipe.transformer``, one cache state per CFG branch (see the module doc).

    ``threshold`` 0 recomputes every step (exact); larger values skip more steps. Undo with
    :func:`disable_step_cache`.
    """
    from diffusers.hooks import FirstBlockCacheConfig

    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"the first-block cache threshold is a number >= 0 (0: exact), got {threshold!r}")
    if getattr(pipe.transformer, "_eligen_compiled", False):
        raise ValueError("enable the first-block cache before compiling the transformer (compile=True)")
    from .families import family_of_transformer, get_family

    name = family_of_transformer(pipe.transformer)  # an EliGen pipeline's family, or a stock pipeline's
    family = get_family(name) if name is not None else None
    why = family.unsupported.get("first_block_cache") if family is not None else None
    if family is not None and why is not None:
        raise ValueError(f"the first-block cache is not available for {family.card.title}: {why}")
    if not hasattr(pipe.transformer, "enable_cache"):
        raise ValueError(f"diffusers' {type(pipe.transformer).__name__} has no step cache (it is not a CacheMixin: no "
                         "enable_cache, no cache_context), so the first-block cache cannot be put on it")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=float(threshold)))


def disable_step_cache(pipe) -> None:
    """Remove the cache :func:`enable_first_block_cache` put on the transformer."""
    pipe.transformer.disable_cache()


# -- fp8 weight-only linear layers ----------------------------------------------------------------------------------

class Fp8Linear(torch.nn.Module):
    """``y = x (s * W_8)^T + b``: the weight ``(out, in)`` stored as ``float8_e4m3fn`` ``W_8`` with one scale per
    output channel ``s (out, 1)`` (the row's absolute maximum over 448), dequantised to the input's dtype in every
    forward. The bias stays as it was."""

    weight_fp8: torch.Tensor  # buffers, registered in __init__
    weight_scale: torch.Tensor

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, scale = fp8_quantize(weight)
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", scale.to(weight.dtype))
        self.bias = linear.bias

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``(out, in)`` as this layer computes with it."""
        return self.weight_fp8.to(dtype) * self.weight_scale.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (for code that reads ``.weight``, e.g. its dtype or shape)."""
        return self.dequantized(self.weight_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3fn weight-only"


def fp8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, in)`` -> ``(W_8, s)``: ``float8_e4m3fn`` values and float32 per-row scales ``(out, 1)`` with
    ``W ~ s * W_8`` (a zero row gets scale 1)."""
    scale = weight.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def default_fp8_names(pipe) -> list[str]:
    """Every linear layer of the transformer blocks (attention, MLPs, AdaLN), LoRA matrices excluded: the
    embedders and the final projection stay in their precision."""
    return [n for n in pipe.family.block_linear_names(pipe.transformer) if ".lora_" not in n]


def quantize_fp8(pipe, names: Iterable[str] | None = None) -> list[str]:
    """Replace the named ``nn.Linear`` layers of ``pipe.transformer`` by :class:`Fp8Linear` (approximate).

    ``names``: module names in the transformer (default :func:`default_fp8_names`); a LoRA-wrapped layer is named
    by its ``.base_layer``. Load LoRAs first (peft cannot wrap an fp8 layer). Returns the names replaced.
    """
    transformer = pipe.transformer
    names = default_fp8_names(pipe) if names is None else list(names)
    modules = dict(transformer.named_modules())
    for name in names:
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            what = "no module" if module is None else f"a {type(module).__name__}, not an nn.Linear"
            raise ValueError(f"fp8: the transformer has {what} named {name!r}; name its linear layers")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent) if parent else transformer, child, Fp8Linear(modules[name]))
    return names


# -- the regional mask in some blocks only --------------------------------------------------------------------------

@dataclass
class MaskedBlocks:
    """The hooks :func:`mask_only_in_blocks` set; ``remove()`` restores the mask in every block."""

    masked: list[str]
    unmasked: list[str]
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def mask_dropper(block_kwargs: str):
    """A forward pre-hook that takes the regional mask out of a block's ``block_kwargs`` (the family's
    :attr:`~eligen.families.base.ModelFamily.block_kwargs`)."""

    def drop_mask(module, args, kwargs):
        given = kwargs.get(block_kwargs)
        if given and "attention_mask" in given:
            kwargs[block_kwargs] = {k: v for k, v in given.items() if k != "attention_mask"}
        return args, kwargs

    return drop_mask


def transformer_block_names(pipe) -> list[str]:
    """``["transformer_blocks.0", ..., "single_transformer_blocks.37"]``: the transformer's blocks in order."""
    transformer = pipe.transformer
    return [f"{kind}.{i}" for kind in pipe.family.block_lists
            for i in range(len(getattr(transformer, kind, [])))]


def every_nth_block(pipe, n: int) -> list[str]:
    """Block names ``0, n, 2n, ...`` of each kind (double- and single-stream counted separately)."""
    if n < 1:
        raise ValueError(f"every_nth_block needs n >= 1, got {n}")
    return [name for name in transformer_block_names(pipe) if int(name.rsplit(".", 1)[1]) % n == 0]


def mask_only_in_blocks(pipe, blocks: Sequence[str]) -> MaskedBlocks:
    """Apply the regional mask only in ``blocks`` (names from :func:`transformer_block_names`); every other block
    attends over the whole ``[entities | global | image]`` sequence unmasked (approximate: entity prompts then
    reach all image tokens there). Returns the hooks; ``.remove()`` undoes it."""
    known = transformer_block_names(pipe)
    unknown = sorted(set(blocks) - set(known))
    if unknown:
        raise ValueError(f"mask_only_in_blocks: no block named {unknown[0]!r}; the blocks are {known[0]} .. "
                         f"{known[-1]}")
    unmasked = [name for name in known if name not in set(blocks)]
    hooks = MaskedBlocks([n for n in known if n in set(blocks)], unmasked)
    for name in unmasked:  # the family says how (by default a forward pre-hook from mask_dropper)
        hooks.handles.append(pipe.family.drop_mask_in(pipe.transformer.get_submodule(name)))
    return hooks


__all__ = ["Fp8Linear", "MaskedBlocks", "default_fp8_names", "disable_step_cache", "enable_first_block_cache",
           "every_nth_block", "fp8_quantize", "mask_only_in_blocks", "quantize_fp8", "transformer_block_names"]

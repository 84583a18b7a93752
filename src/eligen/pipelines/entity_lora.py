"""Entity LoRAs in a pipeline call (docs/design.md section 22).

Each entity's ``lora`` becomes a peft adapter of the transformer: the name of one already loaded, or a file loaded
once as ``entity_lora_<hash>`` and left inactive outside calls. For one call, :class:`EntityLoraScope` switches these
adapters on in the layers that act on tokens (the family's :meth:`~eligen.families.base.ModelFamily.lora_stream`)
and puts a forward hook on each of their ``lora_B`` layers that multiplies the update, token by token, by the
running branch's weights (:class:`~eligen.regional.lora.LoraTokens`); on leaving, the hooks go and every layer's
active adapters are what they were. No attention processor and no global state is involved, so the scope works with
every attention form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..entities import LayoutError
from ..lora import LoraFormatError, load_lora_adapter, resolve_lora_path
from ..regional.lora import LoraTokens
from .mixin import logger

ENTITY_ADAPTER_PREFIX = "entity_lora_"


def tuner_layers(transformer: torch.nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every peft LoRA layer of ``transformer`` (those with ``lora_B`` adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in transformer.named_modules()
            if isinstance(module, BaseTunerLayer) and hasattr(module, "lora_B")]


def active_adapters(transformer: torch.nn.Module) -> set[str]:
    """Every adapter active in some layer of ``transformer`` (the global LoRAs)."""
    return {name for _, layer in tuner_layers(transformer) for name in layer.active_adapters}


def file_adapter_name(path: Path) -> str:
    """The adapter name of a LoRA file: its resolved path, size and modification time hashed (a changed file is
    loaded again)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return ENTITY_ADAPTER_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]


def _load_file(pipe, lora: Any, index: int, loaded: set[str]) -> str:
    """The adapter of an entity's LoRA file, loaded (inactive) unless it already is."""
    try:
        path = resolve_lora_path(lora)
    except (FileNotFoundError, LoraFormatError) as exc:
        raise LayoutError(f"{exc}; give a LoRA file, folder or hub id, or the name of an adapter loaded into the "
                          "pipeline", entity=index, field="lora") from None
    name = file_adapter_name(path)
    if name not in loaded:
        try:
            load_lora_adapter(pipe, path, name, 1.0, None, pipe.family.name, activate=False)
        except LoraFormatError as exc:
            raise LayoutError(str(exc), entity=index, field="lora") from None
        loaded.add(name)
    return name


def entity_adapters(pipe, entities: Sequence[Any] | None) -> list[str | None]:
    """Each entity's adapter (None: no LoRA). ``lora`` names a loaded adapter, else a LoRA file, folder or hub id
    loaded once. An adapter active globally stays global: the entity's ``lora`` adds nothing (warned)."""
    if not any(getattr(entity, "lora", None) is not None for entity in entities or []):
        return [None] * len(entities or [])
    transformer = pipe.transformer
    loaded = set(getattr(transformer, "peft_config", None) or {})
    on_everywhere = active_adapters(transformer) if loaded else set()
    adapters: list[str | None] = []
    for index, entity in enumerate(entities or []):
        lora = getattr(entity, "lora", None)
        if lora is None:
            adapters.append(None)
            continue
        if not pipe.family.lora_streams:
            raise LayoutError(f"{pipe.family.card.title} has no regional LoRA yet: drop 'lora' from the entity and "
                              "load the LoRA globally (--lora) instead", entity=index, field="lora")
        name = str(lora) if str(lora) in loaded else _load_file(pipe, lora, index, loaded)
        if name in on_everywhere:
            logger.warning(f"entity {index}: the LoRA {lora} is active globally, so it stays global (it already "
                           "reaches every token); deactivate it to make it the entity's")
        adapters.append(None if name in on_everywhere else name)
    return adapters


class EntityLoraScope:
    """The entity adapters of one call, switched on where they act on tokens and scoped by hooks.

    Use as a context manager; set :attr:`current` to the running branch's :class:`LoraTokens` before each forward
    (None: the entity LoRAs reach no token).
    """

    def __init__(self, transformer: torch.nn.Module, family, adapters: set[str]):
        self.transformer, self.family, self.adapters = transformer, family, adapters
        self.current: LoraTokens | None = None
        self._saved: list[tuple[Any, list[str]]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> EntityLoraScope:
        try:
            for name, layer in tuner_layers(self.transformer):
                present = sorted(a for a in self.adapters if a in layer.lora_B)
                if present:
                    self._scope_layer(name, layer, present)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _scope_layer(self, name: str, layer: Any, present: list[str]) -> None:
        merged = sorted(set(present) & set(getattr(layer, "merged_adapters", ())))
        if merged:
            raise ValueError(f"the entity LoRA {merged[0]} is fused into the weights of {name}; unfuse it "
                             "(pipe.unfuse_lora()) so it can be scoped to its entity")
        stream = self.family.lora_stream(name)
        if stream is None:  # no token axis: the entity LoRA is not applied here (docs/design.md section 22)
            return
        before = list(layer.active_adapters)
        self._saved.append((layer, before))
        layer.set_adapter([*before, *(a for a in present if a not in before)], inference_mode=True)
        for adapter in present:
            self._handles.append(layer.lora_B[adapter].register_forward_hook(self._hook(name, adapter, stream)))

    def _hook(self, name: str, adapter: str, stream: str):
        def scope(module, args, output: torch.Tensor) -> torch.Tensor:
            tokens = self.current
            if tokens is None or adapter not in tokens.image:
                return torch.zeros_like(output)
            try:
                weight = tokens.weight(adapter, stream, output.shape)
            except ValueError as exc:
                raise ValueError(f"regional LoRA at {name}: {exc}") from None
            return output * weight.to(output.device, output.dtype)

        return scope

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for layer, before in reversed(self._saved):
            layer.set_adapter(before, inference_mode=True)
        self._handles, self._saved, self.current = [], [], None

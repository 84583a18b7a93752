"""Configs as validated dataclasses, and the one mapping from their fields to CLI flags.

A field's ``metadata`` holds its ``help`` text and optionally ``flag`` (default ``--field-name``), ``short``,
``choices``, ``metavar``, ``repeat`` (a list filled by repeating the flag), ``positional`` (with ``order``) and
``required``.
The CLI builds its parser from these fields, so every flag is a config field and every config field is a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from .choices import DTYPE_NAMES


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16`` (torch is imported here, when a model is about to be loaded)."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {name!r}")
    return getattr(torch, name)


def jsonable(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON values: numbers stay numbers, paths become text."""
    return {k: str(v) if isinstance(v, Path) else [str(x) if isinstance(x, Path) else x for x in v]
            if isinstance(v, list) else v for k, v in dataclasses.asdict(config).items()}


def option(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A dataclass field with CLI metadata."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _scalar_type(annotation: Any) -> type:
    """``int | None`` -> int, ``list[str]`` -> str, ``bool`` -> bool."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])
    if origin is list:
        return _scalar_type(typing.get_args(annotation)[0])
    return annotation


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, shown: Mapping[str, str] | None = None) -> None:
    """One argparse argument per field of ``cls``; only given flags appear in the namespace (positionals: None).
    ``shown``: for fields whose default is filled at run time, what it is where it helps (appended to the help)."""
    hints = typing.get_type_hints(cls)
    declared = [name for klass in cls.__mro__ for name in vars(klass).get("__annotations__", {})]
    order = {name: declared.index(name) for name in declared[::-1]}  # the class's own fields first, then its bases'
    fields = sorted(dataclasses.fields(cls), key=lambda f: order.get(f.name, len(order)))
    positional = sorted((f for f in fields if f.metadata.get("positional")), key=lambda f: f.metadata.get("order", 0))
    for f in [*positional, *(f for f in fields if not f.metadata.get("positional"))]:
        meta = f.metadata
        kind = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else cast(Callable[[], Any], f.default_factory)()
        help_text = meta.get("help", "")
        if default not in (None, [], False):
            help_text += f" (default: {default})"
        if shown and f.name in shown:
            help_text += f" [{shown[f.name]}]"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": f.name}
        if meta.get("positional"):
            kwargs.pop("dest")
            kwargs["default"] = None  # argparse would run type() on SUPPRESS; None means "not given"
            parser.add_argument(f.name, nargs=None if meta.get("required") else "?", type=kind, **kwargs)
            continue
        names = [meta.get("flag", "--" + f.name.replace("_", "-"))]
        if "short" in meta:
            names.insert(0, meta["short"])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = meta.get("metavar", f.name.upper())
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
                kwargs.pop("metavar")
            if meta.get("repeat"):
                kwargs["action"] = "append"
        if meta.get("required"):
            kwargs["required"] = True
        parser.add_argument(*names, **kwargs)


def _type_error(name: str, value: Any, annotation: Any) -> str | None:
    """Why ``value`` does not fit the field ``name`` of type ``annotation`` (None when it fits). Numbers are finite,
    and a boolean is never a number."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _type_error(name, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            return f"option '{name}' must be a list, got {value!r}"
        return next((e for e in (_type_error(name, v, args[0]) for v in value) if e), None)
    if annotation is bool:
        return None if isinstance(value, bool) else f"option '{name}' must be true or false, got {value!r}"
    if annotation in (int, float):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (annotation is int and not isinstance(value, int)):
            kind = "an integer" if annotation is int else "a number"
            return f"option '{name}' must be {kind}, got {value!r}"
        if not math.isfinite(value):
            return f"option '{name}' must be a finite number, got {value!r}"
        return None
    if annotation is str and not isinstance(value, str):
        return f"option '{name}' must be text, got {value!r}"
    if annotation is Path and not isinstance(value, (str, Path)):
        return f"option '{name}' must be a path, got {value!r}"
    return None


def config_from_mapping(cls: type, *layers: Mapping[str, Any]):
    """Build ``cls`` from defaults overlaid by each mapping in turn (later wins); unknown keys, values of the wrong
    type and non-finite numbers are errors that name the option."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        if not isinstance(layer, Mapping):
            raise ValueError(f"{cls.__name__} options must be a mapping of names to values, got {layer!r}")
        unknown = sorted(set(layer) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
        for name, value in layer.items():
            problem = _type_error(name, value, hints[name])
            if problem:
                raise ValueError(problem)
        values.update(layer)
    return cls(**values)

"""Model names and what a model declares about itself (torch-free).

``"eligen-tiny"`` names the pipeline directory shipped inside the package (the embedded default, trained by
``eligen tiny build``). A model directory may declare its own defaults in ``eligen_defaults.json``: the sampling
options of :class:`eligen.options.SamplingOptions` (``steps``, ``true_cfg``, ``guidance``,
``max_sequence_length``), its ``native_size`` ``[width, height]`` and its EliGen ``lora`` (a file in the folder).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TINY_MODEL_NAME = "eligen-tiny"
TINY_MODEL_DIR = Path(__file__).parent / "tiny" / "model"
DEFAULTS_FILE = "eligen_defaults.json"


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # what a hub id looks like (owner/name); anything else is a path


def offline_hint(*names: Any) -> str:
    """The end of a 'cannot load' message: how to fetch ``names`` when downloads are off."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no"):
        return "; check the name and the network"
    fetch = " and ".join(f"hf download {name}" for name in names)
    return f"; downloads are off (HF_HUB_OFFLINE): fetch it first ({fetch})"


@contextmanager
def loading(what: str, name: Any, *also: Any) -> Iterator[None]:
    """A load of ``name`` (a local folder or file, or a hub id) that fails for want of files becomes one line
    naming it and how to fetch it (with ``also``, the other downloads it needs)."""
    try:
        yield
    except OSError:
        raise ValueError(f"cannot load {what} {name}: it is neither a complete local folder or file nor a cached "
                         f"download{offline_hint(name, *also)}") from None


def check_model_name(name: Any, flag: str = "--model") -> None:
    """A model that is neither an existing folder nor a hub id (owner/name) is refused as a missing folder."""
    text = str(name)
    if text != TINY_MODEL_NAME and not Path(text).exists() and not HUB_ID.fullmatch(text):
        raise ValueError(f"{flag} {text}: no such folder (a model is a diffusers pipeline folder or a hub id, "
                         "owner/name)")


DECLARED = {"steps": int, "true_cfg": float, "guidance": float, "max_sequence_length": int, "native_size": list,
            "lora": str}  # what eligen_defaults.json may hold


def _check_declared(defaults: dict[str, Any], file: Path) -> None:
    """Every declared default of the right kind (numbers finite, ``native_size`` two positive integers), each
    error naming the file and the key."""
    import math

    for key, value in defaults.items():
        kind = DECLARED.get(key)
        if kind is None:
            raise ValueError(f"{file}: unknown key {key!r}; a model declares {', '.join(DECLARED)}")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and not (isinstance(value, int) and number and value >= 1):
            raise ValueError(f"{file}: {key!r} must be a positive integer, got {value!r}")
        if kind is float and not (number and math.isfinite(value) and value >= 0):
            raise ValueError(f"{file}: {key!r} must be a finite number >= 0, got {value!r}")
        if kind is list and not (isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ValueError(f"{file}: {key!r} must be [width, height] in pixels, got {value!r}")
        if kind is str and not (isinstance(value, str) and value):
            raise ValueError(f"{file}: {key!r} must be the name of a file in the model folder, got {value!r}")


def resolve_model(name_or_path: Any) -> Any:
    """``"eligen-tiny"`` -> the shipped directory; anything else unchanged (a directory or a hub id)."""
    if str(name_or_path) != TINY_MODEL_NAME:
        return name_or_path
    if not (TINY_MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(f"the shipped tiny model is missing from {TINY_MODEL_DIR}; rebuild it with "
                                "`eligen tiny build -o <dir>` and pass --model <dir>")
    return str(TINY_MODEL_DIR)


def portable_name(name_or_path: Any) -> Any:
    """A name that resolves on any install: the shipped model's directory as ``"eligen-tiny"``, a file inside it as
    ``"eligen-tiny/<file>"`` (what records store); anything else unchanged."""
    text = str(name_or_path)
    try:
        path = Path(text).resolve()
        inside = path.exists() and path.is_relative_to(TINY_MODEL_DIR.resolve())
    except (OSError, ValueError):
        return name_or_path
    if not inside:
        return name_or_path
    relative = path.relative_to(TINY_MODEL_DIR.resolve()).as_posix()
    return TINY_MODEL_NAME if relative == "." else f"{TINY_MODEL_NAME}/{relative}"


def resolve_file(name_or_path: Any) -> Any:
    """``"eligen-tiny/<file>"`` -> that file of the shipped model on this install; anything else unchanged."""
    text = str(name_or_path)
    if text.startswith(f"{TINY_MODEL_NAME}/") and not Path(text).exists():
        return str(TINY_MODEL_DIR / text.removeprefix(f"{TINY_MODEL_NAME}/"))
    return name_or_path


def model_defaults(name_or_path: Any) -> dict[str, Any]:
    """What a model directory declares in ``eligen_defaults.json`` (empty for other models and hub ids).

    A ``lora`` entry is turned into a list holding its path inside the model directory.
    """
    path = Path(str(resolve_model(name_or_path)))
    file = path / DEFAULTS_FILE
    if not file.is_file():
        return {}
    try:
        defaults = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not a readable JSON object of model defaults ({exc}); fix or delete it") from None
    if not isinstance(defaults, dict):
        raise ValueError(f"{file} must hold a JSON object of model defaults, got {type(defaults).__name__}")
    _check_declared(defaults, file)
    if "lora" in defaults:
        defaults["lora"] = [str(path / defaults["lora"])]
    return defaults


def model_loras(name_or_path: Any) -> list[str]:
    """The EliGen LoRA a model declares (a list of one path, or empty): what the commands load when no ``--lora``
    is given, so a record that names none reproduces with the model's own anywhere."""
    return list(model_defaults(name_or_path).get("lora", []))

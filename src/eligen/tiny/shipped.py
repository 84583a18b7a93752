"""The embedded default model: ``"eligen-tiny"`` resolves to the pipeline directory shipped in the package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_MODEL_NAME = "eligen-tiny"
TINY_MODEL_DIR = Path(__file__).with_name("model")
DEFAULTS_FILE = "eligen_defaults.json"


def resolve_model(name_or_path: Any) -> Any:
    """``"eligen-tiny"`` -> the shipped directory; anything else unchanged (a directory or a hub id)."""
    if str(name_or_path) != TINY_MODEL_NAME:
        return name_or_path
    if not (TINY_MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(f"the shipped tiny model is missing from {TINY_MODEL_DIR}; rebuild it with "
                                "`eligen tiny build -o <dir>` and pass --model <dir>")
    return str(TINY_MODEL_DIR)


def model_defaults(name_or_path: Any) -> dict[str, Any]:
    """Generation defaults a model directory declares in ``eligen_defaults.json`` (empty for other models).

    A ``lora`` entry is turned into a path inside the model directory.
    """
    path = Path(str(resolve_model(name_or_path)))
    file = path / DEFAULTS_FILE
    if not file.is_file():
        return {}
    defaults = json.loads(file.read_text())
    if "lora" in defaults:
        defaults["lora"] = [str(path / defaults["lora"])]
    return defaults

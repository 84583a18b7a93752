"""The layering of docs/design.md section 1, read from the source: the inference core imports nothing from the layers
above it, and only the family packages and the registry name a family."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from eligen.families import cards

SRC = Path(__file__).resolve().parents[1] / "src" / "eligen"
CORE = ("regional", "sampling", "families", "pipelines", "lora", "entities", "masks", "inpaint", "schedules",
        "speedups", "choices", "config", "files", "overlay", "models", "options", "__init__")
ABOVE = ("tiny", "train", "data", "evals", "scale", "ui", "cli", "generate")
TEST_SUPPORT = re.compile(r"^families(\.[a-z_0-9]+)?\.testing$")  # tiny test pipelines, loaded only by tests


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every eligen module ``path`` imports (at any depth), relative to the package."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").startswith("eligen"):
                target = (node.module or "").removeprefix("eligen").lstrip(".")
            else:
                continue
            out.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.removeprefix("eligen").lstrip(".")) for a in node.names
                    if a.name.startswith("eligen")]
    return out


def in_layer(module: str, layer: tuple[str, ...]) -> bool:
    return module.split(".")[0] in layer


def upward_imports() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        if not in_layer(name, CORE) or TEST_SUPPORT.match(name):
            continue
        found += [f"{path.relative_to(SRC.parent)}:{line} imports eligen.{target}" for line, target in imported(path)
                  if in_layer(target, ABOVE)]
    return found


def test_the_core_imports_nothing_from_above():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a core module that imports the toy model is caught."""
    fake = tmp_path / "eligen"
    (fake / "pipelines").mkdir(parents=True)
    (fake / "pipelines" / "bad.py").write_text("from ..tiny.world import sample\nimport eligen.train.loss\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert len(upward_imports()) == 2


def family_words() -> re.Pattern:
    """Every registered family's name, title and class names (FLUX.1 -> flux, Qwen-Image -> qwen_image, ...)."""
    words = set()
    for card in cards().values():
        words |= {card.name, card.title, *card.pipelines, *card.transformers}
    return re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)), re.IGNORECASE)


OUTSIDE_OK = ("families/",  # the family packages and the registry
              "tiny/build.py",  # the shipped model's recipe: a FLUX.1 pipeline trained here
              )


@pytest.mark.parametrize("path", [p for p in sorted(SRC.rglob("*.py"))
                                  if not str(p.relative_to(SRC)).startswith(OUTSIDE_OK)],
                         ids=lambda p: str(p.relative_to(SRC)))
def test_no_family_is_named_outside_its_package(path):
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if family_words().search(line)]
    assert hits == []

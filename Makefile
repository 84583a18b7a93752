# eligen: `make demo` and `make test` work on a fresh machine with Python 3.11 and no GPU.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned, so nothing else can pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

.PHONY: demo test lint install install-dev browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[dev]"  # dev includes the train extra: the tests train
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

# The reference package's four modules (FLUX and Qwen-Image DiTs, from its PyPI wheel, no dependencies): the equivalence
# tests run on them.
.diffsynth-min/diffsynth/models/qwen_image_dit.py: | $(BIN)/python
	PYTHON=$(BIN)/python bash benchmarks/diffsynth_min.sh .diffsynth-min

# The web app's browser tests drive Debian's Chromium and ChromeDriver (root installs them; otherwise through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
/usr/bin/chromedriver:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver

browser: /usr/bin/chromedriver

test: lint browser .diffsynth-min/diffsynth/models/qwen_image_dit.py
	$(OFFLINE) PYTHONPATH=.diffsynth-min ELIGEN_REQUIRE_DIFFSYNTH=1 ELIGEN_REQUIRE_BROWSER=1 $(BIN)/python -m pytest

# The main job on the shipped tiny model (eligen-tiny, trained on the shapes world by `eligen tiny build`).
demo: $(VENV)/.installed
	$(OFFLINE) $(BIN)/eligen generate examples/tiny_two_shapes.json -o outputs/demo.png --overlay

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache .hypothesis

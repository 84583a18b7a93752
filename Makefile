# eligen: `make demo` and `make test` work on a fresh machine with Python 3.11 and no GPU.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Every install takes its versions from the lock, constraints.txt (`make lock` refreshes it), so a fresh clone gets
# the set the tests passed with. torch comes first, at the lock's version: on Linux, PyPI's torch wheel is the CUDA
# build (with about 20 NVIDIA wheels, several GB); a CPU-only machine takes the CPU build from PyTorch's CPU index:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
LOCK   := constraints.txt
TORCH_INDEX ?=
PIP    := $(BIN)/pip install --quiet -c $(LOCK)
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

.PHONY: demo test lint install install-dev browser clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: $(LOCK) | $(BIN)/python
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch
	touch $@

$(VENV)/.installed: pyproject.toml $(LOCK) $(VENV)/.torch
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(LOCK) $(VENV)/.torch
	$(PIP) -e ".[dev]"  # dev includes the train extra: the tests train
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

# The suite runs on every core (pytest-xdist, at most TEST_WORKERS processes; each test is single-threaded); the
# tests of one xdist_group (the browser's, Ray's) share one process, so one browser and one local Ray serve them.
TEST_WORKERS ?= 4
test: lint browser .diffsynth-min/diffsynth/models/qwen_image_dit.py
	$(OFFLINE) PYTHONPATH=.diffsynth-min ELIGEN_REQUIRE_DIFFSYNTH=1 ELIGEN_REQUIRE_BROWSER=1 $(BIN)/python -m pytest \
		-n auto --maxprocesses $(TEST_WORKERS) --dist loadgroup

# Refresh the lock: resolve pyproject.toml's ranges afresh (torch at its pin) in a scratch environment, freeze it.
# Then run `make test`: the lock lands only with the suite passing on it (tests/test_install.py checks the pairing of
# transformers and peft that diffusers' text-encoder LoRA loading needs).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==$$(sed -n 's/^torch==//p' $(LOCK))"
	.venv-lock/bin/pip install --quiet -e ".[dev]"
	(sed -n '1,/^$$/p' $(LOCK); .venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//') > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

# The main job on the shipped tiny model (eligen-tiny, trained on the shapes world by `eligen tiny build`).
demo: $(VENV)/.installed
	$(OFFLINE) $(BIN)/eligen generate examples/tiny_two_shapes.json -o outputs/demo.png --overlay

clean:
	rm -rf $(VENV) .venv-lock outputs .pytest_cache .ruff_cache .hypothesis

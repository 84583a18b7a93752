# eligen: `make demo` and `make test` work on a fresh machine with Python 3.11 and no GPU.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned, so nothing else can pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

.PHONY: demo test lint install install-dev clean

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
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks examples

test: lint
	$(OFFLINE) $(BIN)/python -m pytest

# Until the trained tiny model ships, the demo builds a tiny *random* FLUX pipeline locally and renders the
# example layout with it: the full code path (layout, masks, regional attention, PNG metadata, overlay) on
# weights that draw noise.
demo: $(VENV)/.installed
	$(OFFLINE) $(BIN)/python examples/make_random_model.py outputs/tiny-random-flux
	$(OFFLINE) $(BIN)/eligen generate examples/three_entities.json -o outputs/demo.png \
		--model outputs/tiny-random-flux --steps 8 --max-sequence-length 64 --overlay

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache .hypothesis

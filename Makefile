# The README's commands. `make test` sets up .venv (once; reruns skip the install while setup.py and
# constraints.txt are unchanged), then runs ruff and pytest.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command as everything else: unpinned, or installed in a later command,
# pip pulls a multi-GB CUDA build on CPU machines. PIP_CONSTRAINT also reaches pip's isolated build
# environments (DeepSpeed builds from source), so no build pulls another torch.
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.ctld-installed
# DeepSpeed JIT-builds its CPU ops on first use; keep them inside .venv so they are built once.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Child processes (accelerate launch, DeepSpeed's JIT build via ninja) use the venv's tools, not the system's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

# Supported Python: 3.11 or newer (setup.py's python_requires; the pins in constraints.txt need it). Checked before
# the venv is created, so an older python3 fails in one line instead of deep inside pip.
PYTHON_MIN := 3.11
PYTHON_CHECK := import sys; need = tuple(map(int, "$(PYTHON_MIN)".split("."))); \
	sys.exit(0 if sys.version_info >= need else "ctld needs Python $(PYTHON_MIN) or newer; $(PYTHON) is " \
	+ sys.version.split()[0] + ": run make with PYTHON=python$(PYTHON_MIN) (or newer)")

.PHONY: test test-slow lint venv clean demo check-python

venv: $(STAMP)

check-python:
	@test -x $(BIN)/python || $(PYTHON) -c '$(PYTHON_CHECK)'

$(STAMP): setup.py constraints.txt | check-python
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check ctld tests benchmarks

# One multi-process launch of each kind runs here; their other variants are marked `slow` (CI runs them after).
test: lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The whole chain on a 2-core CPU in ~4 minutes after set-up: phantom DICOM studies -> shards -> VAE ->
# diffusion (2-process DDP) -> ctld-infer -> ctld-eval, into demo_out/ (reruns reuse finished stages).
# `make demo DATA=/path/to/dicom` runs it on your own DICOM/NIfTI folder(s); DEMO_ARGS passes more flags,
# e.g. DEMO_ARGS="--fresh --diffusion_steps 1000" (see `.venv/bin/ctld-demo --help`).
DATA ?=
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/ctld-demo $(if $(DATA),--data $(DATA)) $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

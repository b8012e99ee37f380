# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The three most useful things to know about the Gemma language models are
TORCH := torch==2.13.0

.PHONY: run test test-slow test-ports lint docs clean

# torch first, pinned: it takes the CPU wheel; an unpinned torch would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/gemmakit run "$(PROMPT)" --max-new-tokens 48

test: $(VENV)/.dev
	$(BIN)/python -m pytest

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -m slow

# The native kernels built for ARM64 (gcc and clang, run under qemu) and without OpenMP, each checked bit for bit
# against the scalar build (tests/ports/run.sh; installs its Debian packages when run as root).
test-ports:
	bash tests/ports/run.sh

docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict    # into build/site; `$(BIN)/mkdocs serve` to browse

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info

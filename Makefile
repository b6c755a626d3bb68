# The README's commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.metafed-setup

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first: pinned, so that pip takes the CPU build this machine has (a CUDA
# build on a GPU machine) instead of pulling the newest release with its CUDA
# packages to satisfy `torch>=2.4`. Then the project, editable, with test tools.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'torch==2.13.*'
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/metafed simulate --config simulations/configs/default.yaml

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m simulations.bench_inner_loop
	$(BIN)/python -m simulations.bench_rounds
	$(BIN)/python -m simulations.bench_robustness

clean:
	rm -rf runs .pytest_cache

# The README's commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.metafed-setup

.PHONY: setup system-deps demo test bench clean

setup: $(STAMP)

# torch first: pinned, so that pip takes the CPU build this machine has (a CUDA
# build on a GPU machine) instead of pulling the newest release with its CUDA
# packages to satisfy `torch>=2.4`. Then the project, editable, with test tools.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'torch==2.13.*'
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# What the tests need from Debian: nginx (the Fleet proxy of deploy/), openssl
# and ssh-keygen (certificates and site keys). Installs only what is missing.
system-deps:
	@command -v nginx >/dev/null 2>&1 || command -v /usr/sbin/nginx >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; }
	@command -v openssl >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl; }
	@command -v ssh-keygen >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-client; }

demo: setup
	$(BIN)/metafed simulate --config simulations/configs/default.yaml

test: setup system-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m simulations.bench_inner_loop
	$(BIN)/python -m simulations.bench_rounds
	$(BIN)/python -m simulations.bench_robustness

clean:
	rm -rf runs .pytest_cache

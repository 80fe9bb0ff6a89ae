# Two commands do all set-up on a fresh machine: `make test` and `make bench`.
# Each creates (or reuses) .venv and installs the pinned requirements into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2
export FASTATTN_BUILD_CUDA ?= 0

.PHONY: venv test test-py test-full bench bench-quick lint format info clean compile-check

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Extra test targets (native builds) come from mk/*.mk and are added to TEST_DEPS there.
TEST_DEPS := compile-check
-include mk/*.mk

# The Triton kernels compiled for Turing, Ampere (A100 and the 99 KB sm_86/89 parts) and Hopper without a GPU: fails on a compile
# error, any spill, shared memory over the arch's limit, or fp16/bf16 without tensor-core MMA.
compile-check: $(VENV_STAMP)
	$(VENV)/bin/fastattn compile-check --arch sm_75,sm_80,sm_86,sm_90

test: $(VENV_STAMP) lint $(TEST_DEPS) test-py

test-py: $(VENV_STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not full" tests

test-full: $(VENV_STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

lint: $(VENV_STAMP)
	$(PY) -m ruff check fastattn tests benchmarks
	$(PY) -m ruff format --check fastattn tests benchmarks

format: $(VENV_STAMP)
	$(PY) -m ruff check --fix fastattn tests benchmarks
	$(PY) -m ruff format fastattn tests benchmarks

bench: $(VENV_STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-quick: $(VENV_STAMP)
	$(PY) benchmarks/run.py --quick

info: $(VENV_STAMP)
	$(VENV)/bin/fastattn info

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache

# Benchmarks (included by the top-level Makefile; `make bench` and `make bench-quick` are there).
#
#   make gpu-check      on a GPU machine with torch and triton installed and no network: builds the
#                       CUDA extension, runs the GPU tests, then the benchmark suite for the main
#                       points, all inside 8 minutes, writing benchmarks/results/<gpu>-<date>.{json,md,png}.
#                       Uses the system python (GPU_PY, default python3), never the venv.
#                       Knobs: GPU_CHECK_MINUTES, GPU_TESTS, GPU_TEST_WORKERS, GPU_BENCH_ARGS, GPU_BENCH_BACKENDS, GPU_RESULTS.
#   make bench-pytest   the same points as pytest-benchmark cases (FASTATTN_BENCH_QUICK=1 for --quick's).

GPU_PY ?= python3

.PHONY: gpu-check bench-pytest

gpu-check:
	GPU_PY="$(GPU_PY)" bash benchmarks/gpu_check.sh

bench-pytest: $(VENV_STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -p no:cacheprovider

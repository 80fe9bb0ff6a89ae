# The GPU preflight (included by the top-level Makefile).
#
#   make gpu-preflight   the exact flow of a GPU run, here on the CPU, with the GPU machine's versions
#                        (mk/device-versions.txt, in .venv-device): Triton's compile-checks for sm_90 (attention: --all,
#                        every mask kind and packed build at every head dim; graph; 0 spills),
#                        the tuning candidates present for that Triton, the CUDA extension built against that
#                        torch for sm_90 (tensor-core SASS, no spills but those mk/known-spills.json lists, each
#                        with its bytes and reason: a new or grown spill fails), then `make gpu-check` as a dry run
#                        (GPU_CHECK_DEVICE=cpu: the GPU suite under the interpreter and the emulator, the
#                        benchmark and tuning flows at toy sizes), and the torch.compile tests under that torch
#                        (its dynamo and inductor refuse things the newer one takes: id() of a computed tensor,
#                        importlib.util.find_spec, a bool tensor viewed as uint8). Green means a GPU run will not
#                        spend its minutes on a version problem. Not part of `make test` (about 12 minutes).

DEVICE_VENV := .venv-device
DEVICE_PY := $(DEVICE_VENV)/bin/python
DEVICE_STAMP := $(DEVICE_VENV)/.installed
DEVICE_ARCH ?= 90
PREFLIGHT_OUT ?= $(CURDIR)/.preflight

.PHONY: gpu-preflight device-venv

device-venv: $(DEVICE_STAMP)

$(DEVICE_STAMP): mk/device-versions.txt
	test -x $(DEVICE_PY) || $(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_PY) -m pip install -q -r mk/device-versions.txt
	touch $@

gpu-preflight: $(DEVICE_STAMP)
	@rm -rf $(PREFLIGHT_OUT) && mkdir -p $(PREFLIGHT_OUT)
	PYTHONPATH=$(CURDIR) $(DEVICE_PY) -m fastattn.cli compile-check --arch sm_$(DEVICE_ARCH) --all
	PYTHONPATH=$(CURDIR) $(DEVICE_PY) -m fastattn.graph.compile_check --arch $(DEVICE_ARCH) --all
	PYTHONPATH=$(CURDIR) $(DEVICE_PY) -c "import sys, triton; from fastattn.backends.triton import tuning as t; \
		p = t.TABLE_DIR / f'candidates-sm$(DEVICE_ARCH)-triton{t.TRITON_VERSION[0]}.{t.TRITON_VERSION[1]}.json'; \
		print('tuning candidates:', p, 'present' if p.exists() else 'MISSING'); sys.exit(0 if p.exists() else 1)"
	FASTATTN_CACHE_DIR=$(PREFLIGHT_OUT)/ext PYTHONPATH=$(CURDIR) $(DEVICE_PY) -m fastattn._ext.ci_check \
		--arch "$(DEVICE_ARCH:%0=%).0" --strict-spills --known-spills mk/known-spills.json
	PYTHONPATH=$(CURDIR) $(DEVICE_PY) -m pytest -q -m "not full" -p no:cacheprovider -k "compile or fullgraph" tests
	GPU_CHECK_DEVICE=cpu GPU_PY=$(CURDIR)/$(DEVICE_PY) GPU_RESULTS=$(PREFLIGHT_OUT)/results GPU_TEST_WORKERS=2 \
		FASTATTN_CACHE_DIR=$(PREFLIGHT_OUT)/ext GPU_CHECK_MINUTES=15 bash benchmarks/gpu_check.sh
	@echo "gpu-preflight: green (results of the dry run in $(PREFLIGHT_OUT)/results)"

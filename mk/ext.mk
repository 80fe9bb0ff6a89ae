# Native checks of the CUDA extension groundwork (included by the top-level Makefile).
#
#   make test-ext-native   the emulator's C++ test binary under AddressSanitizer (primitive layouts,
#                          the test GEMM in forward/reversed/random fiber orders, the broken GEMM
#                          variants must fail), then the real nvcc build of the extension for sm_80
#                          and sm_90 with the SASS HMMA and no-spill checks (skipped with a message
#                          when nvcc is missing), and the nvcc build of the primitive tests (run when
#                          a GPU is visible). No Python or torch is needed for the first part.
#   make test-ext-emulate  only the emulator test binary.
#   make test-ext-cuda     only the nvcc build + SASS/spill check.
#   make test-ext-cuda-prims  the primitive tests built with nvcc; run when a GPU is visible.

EXT_CXX ?= g++
EXT_BUILD := csrc/.build
EXT_ASAN := -fsanitize=address -fno-omit-frame-pointer
EXT_EMU_FLAGS := -std=c++17 -O1 -g -Wall -Wextra -Wno-unknown-pragmas -DFASTATTN_EMULATE $(EXT_ASAN)
EXT_EMU_HDRS := $(wildcard csrc/cuda/*.h csrc/cuda/*.cuh csrc/emulate/*.h)
EXT_GEMM_VARIANTS := 0 1 2 3
EXT_CUDA_ARCHS ?= 8.0;9.0

.PHONY: test-ext-native test-ext-emulate test-ext-cuda test-ext-cuda-prims

TEST_DEPS += test-ext-native

# With nvcc present, the primitive tests are also built for the GPU (and run when one is visible),
# so that the hardware check of the emulator's layouts keeps compiling.
EXT_HAVE_NVCC := $(shell command -v nvcc 2>/dev/null)
test-ext-native: test-ext-emulate test-ext-cuda $(if $(EXT_HAVE_NVCC),test-ext-cuda-prims)

$(EXT_BUILD)/emu/emulate.o: csrc/emulate/emulate.cpp $(EXT_EMU_HDRS)
	@mkdir -p $(@D)
	$(EXT_CXX) $(EXT_EMU_FLAGS) -c $< -o $@

$(EXT_BUILD)/emu/test_primitives.o: csrc/tests/test_primitives.cu $(EXT_EMU_HDRS)
	@mkdir -p $(@D)
	$(EXT_CXX) $(EXT_EMU_FLAGS) -x c++ -c $< -o $@

# The broken variants are the same source with FASTATTN_TEST_BREAK set (see csrc/cuda/test_gemm.cu).
$(EXT_BUILD)/emu/test_gemm_%.o: csrc/cuda/test_gemm.cu $(EXT_EMU_HDRS)
	@mkdir -p $(@D)
	$(EXT_CXX) $(EXT_EMU_FLAGS) -DFASTATTN_TEST_BREAK=$* -x c++ -c $< -o $@

$(EXT_BUILD)/emu/test_primitives: $(EXT_BUILD)/emu/emulate.o $(EXT_BUILD)/emu/test_primitives.o \
		$(foreach v,$(EXT_GEMM_VARIANTS),$(EXT_BUILD)/emu/test_gemm_$(v).o)
	$(EXT_CXX) $(EXT_ASAN) $^ -o $@

$(EXT_BUILD)/emu/asan_oob: csrc/tests/asan_oob.cu $(EXT_BUILD)/emu/emulate.o $(EXT_EMU_HDRS)
	$(EXT_CXX) $(EXT_EMU_FLAGS) -x c++ $< -x none $(EXT_BUILD)/emu/emulate.o -o $@

# GCC's ASan does not instrument function-local statics, which is what a static __shared__ array
# becomes under the emulator; clang's does. Kernels keep their shared memory dynamic
# (FA_DYNAMIC_SMEM), which both compilers check.
EXT_OOB_KINDS := dynamic global $(if $(shell $(EXT_CXX) --version 2>/dev/null | grep -i clang),static)

# The test binary must pass; each out-of-bounds kernel must be stopped by ASan's report.
test-ext-emulate: $(EXT_BUILD)/emu/test_primitives $(EXT_BUILD)/emu/asan_oob
	ASAN_OPTIONS=detect_leaks=1 $<
	@for kind in $(EXT_OOB_KINDS); do \
		if ASAN_OPTIONS=detect_leaks=0 $(EXT_BUILD)/emu/asan_oob $$kind > $(EXT_BUILD)/emu/asan_$$kind.log 2>&1; then \
			cat $(EXT_BUILD)/emu/asan_$$kind.log; echo "FAIL asan_oob $$kind: out-of-bounds access not caught"; exit 1; \
		elif grep -q "ERROR: AddressSanitizer: .*-buffer-overflow" $(EXT_BUILD)/emu/asan_$$kind.log; then \
			echo "PASS asan_oob $$kind: $$(grep -o 'AddressSanitizer: [a-z-]*' $(EXT_BUILD)/emu/asan_$$kind.log | head -1)"; \
		else cat $(EXT_BUILD)/emu/asan_$$kind.log; echo "FAIL asan_oob $$kind: failed without an ASan report"; exit 1; fi; \
	done

# The real extension, built by fastattn's own JIT path (the same code users run), then checked.
test-ext-cuda: $(VENV_STAMP)
	$(PY) -m fastattn._ext.ci_check --arch "$(EXT_CUDA_ARCHS)"

$(EXT_BUILD)/cuda/test_primitives: csrc/tests/test_primitives.cu csrc/cuda/test_gemm.cu $(EXT_EMU_HDRS)
	@mkdir -p $(@D)
	nvcc -std=c++17 -O2 -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
		csrc/tests/test_primitives.cu csrc/cuda/test_gemm.cu -o $@

test-ext-cuda-prims: $(EXT_BUILD)/cuda/test_primitives
	@if nvidia-smi -L >/dev/null 2>&1; then $<; else echo "test-ext-cuda-prims: built $<; no GPU visible, not run"; fi

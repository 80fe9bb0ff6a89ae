#!/usr/bin/env bash
# `make gpu-check`: one command for a GPU machine that has torch and triton but no network.
#
# Uses the system python (GPU_PY, default python3) with this checkout on PYTHONPATH, no venv.
# Steps, all inside GPU_CHECK_MINUTES (default 8) of wall time:
#   1. build the CUDA extension (where fastattn/_ext exists), then the CUDA primitive tests
#      (make test-ext-cuda-prims, where that target exists);
#   2. the GPU tests: GPU_TESTS (the triton/cuda test files and the suite's own CUDA test) and
#      every test marked `gpu`, default selection (not `full`);
#   3. the benchmark suite for the main points, with the time that is left, writing
#      benchmarks/results/<gpu>-<date>.{json,md,png} (the png needs matplotlib; without it
#      `benchmarks/run.py --from-json FILE --plot FILE.png` draws it later on another machine).
# Every step runs even if an earlier one failed; the summary lists PASS / FAIL / NOT RUN and the
# exit status is 1 if any step failed.
set -u
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
MINUTES=${GPU_CHECK_MINUTES:-8}
RESULTS=${GPU_RESULTS:-benchmarks/results}
BENCH_ARGS=${GPU_BENCH_ARGS:---seqlens 1024,4096,16384 --head-dims 128 --dtypes bfloat16 --modes fwd,bwd --causal false,true}
BENCH_BACKENDS=${GPU_BENCH_BACKENDS:-}
# A dry run of this script's own flow without a GPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_STEPS="tests bench".
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=" ${GPU_CHECK_STEPS:-build tests bench} "
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTATTN_SKIP_CUDA_BUILD=0
START=$(date +%s)
DEADLINE=$((START + MINUTES * 60))
declare -a SUMMARY=()
FAILED=0

left() { echo $((DEADLINE - $(date +%s))); }
note() { SUMMARY+=("$1"); echo "== gpu-check: $1"; }
step() { # step NAME SECONDS CMD...: run CMD under a timeout of at most SECONDS (and the time left)
    local name=$1 limit=$2 rc
    shift 2
    local remaining
    remaining=$(left)
    if ((remaining < 20)); then note "NOT RUN  $name (time budget spent)"; return 0; fi
    ((limit > remaining)) && limit=$remaining
    echo "== gpu-check: $name (at most ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if ((rc == 0)); then note "PASS     $name"
    elif ((rc == 124 || rc == 137)); then note "FAIL     $name (timed out after ${limit}s)"; FAILED=1
    else note "FAIL     $name (exit $rc)"; FAILED=1; fi
    return 0
}

if [ "$DEVICE" = cuda ]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu-check: $PY sees no CUDA device (torch.cuda.is_available() is False, or torch is missing)" >&2
        exit 1
    fi
    "$PY" -c "import torch; print('gpu-check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
fi

# 1. the CUDA extension and the primitive tests on real hardware
if [[ $STEPS != *" build "* ]]; then
    note "NOT RUN  build and primitive tests (not in GPU_CHECK_STEPS)"
elif [ -d fastattn/_ext ]; then
    if "$PY" -m fastattn.cli build --help >/dev/null 2>&1; then
        step "build the CUDA extension" 240 "$PY" -m fastattn.cli build
    else
        step "build the CUDA extension" 240 "$PY" -m fastattn._ext.cli build
    fi
else
    note "NOT RUN  build the CUDA extension (fastattn/_ext does not exist yet)"
fi
if [[ $STEPS != *" build "* ]]; then
    :
elif grep -qs '^test-ext-cuda-prims:' mk/*.mk; then
    step "CUDA primitive tests (make test-ext-cuda-prims)" 120 make --no-print-directory test-ext-cuda-prims
else
    note "NOT RUN  CUDA primitive tests (no test-ext-cuda-prims target yet)"
fi

# 2. the GPU tests
if [[ $STEPS != *" tests "* ]]; then
    note "NOT RUN  GPU tests (not in GPU_CHECK_STEPS)"
elif "$PY" -c "import pytest" 2>/dev/null; then
    XDIST=()
    WORKERS=${GPU_TEST_WORKERS:-8}
    ((WORKERS > 1)) && "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$WORKERS")
    mapfile -t FILES < <(ls tests/test_triton_*.py tests/test_cuda_*.py tests/test_ext_cuda*.py 2>/dev/null)
    GPU_TESTS_LIST=${GPU_TESTS:-${FILES[*]} tests/test_benchmarks.py::test_quick_run_on_cuda}
    # shellcheck disable=SC2086
    step "GPU tests" 240 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -m "not full" $GPU_TESTS_LIST
    # Tests marked `gpu` anywhere else (exit 5: none are marked, which is fine).
    remaining=$(left)
    if ((remaining > 20)); then
        timeout "$remaining" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -m "gpu and not full" tests
        rc=$?
        if ((rc == 0)); then note "PASS     tests marked gpu"
        elif ((rc == 5)); then note "PASS     tests marked gpu (none are marked)"
        else note "FAIL     tests marked gpu (exit $rc)"; FAILED=1; fi
    fi
else
    note "NOT RUN  GPU tests (pytest is not installed for $PY)"
fi

# 3. the benchmark suite with the time left (30 s kept for writing the results)
remaining=$(left)
if [[ $STEPS != *" bench "* ]]; then
    note "NOT RUN  benchmark suite (not in GPU_CHECK_STEPS)"
elif ((remaining > 60)); then
    budget=$(((remaining - 30) / 60))
    ((budget < 1)) && budget=1
    BACKENDS=()
    [ -n "$BENCH_BACKENDS" ] && BACKENDS=(--backends "$BENCH_BACKENDS")
    # shellcheck disable=SC2086
    step "benchmark suite (main points)" "$remaining" "$PY" benchmarks/run.py --device "$DEVICE" $BENCH_ARGS \
        "${BACKENDS[@]}" --max-minutes "$budget" --save-results "$RESULTS" --strict
else
    note "NOT RUN  benchmark suite (time budget spent)"
fi

echo
echo "gpu-check summary ($(($(date +%s) - START)) s of ${MINUTES} min):"
printf '  %s\n' "${SUMMARY[@]}"
ls -1 "$RESULTS"/*"$(date -u +%F)"* 2>/dev/null | sed 's/^/  wrote /'
exit $FAILED

#!/usr/bin/env bash
# `make gpu-check`: everything a lent GPU machine should do, in one command of at most GPU_CHECK_MINUTES.
#
# The machine has torch and triton (its own versions) but no network and no venv: this uses its python
# (GPU_PY, default python3) with this checkout on PYTHONPATH. Only GPU_RESULTS comes back from such a
# machine, so every file goes there (default benchmarks/results), at most 8 files:
#   build.log           the CUDA extension's build (ptxas registers and spills)
#   gpu-tests.jsonl     where each GPU-suite case ran (checked: every case on cuda, no interpreter/emulator)
#   bench-decode.md     kvcache_attention (triton, cuda; contiguous, paged) as bandwidth against the measured
#                       HBM bandwidth and SDPA's kernels (benchmarks/decode.py; issue #21's GPU bar)
#   bench-main.json     fastattn triton and cuda against SDPA's flash, cudnn and efficient kernels
#   bench-flex.json     FlexAttention at the head-dim-128 points
#   bench-softcap.json  Gemma-2-shaped softcap attention (D=256, GQA, window): fastattn against Flex's score_mod
#   sm<arch>-triton<v>.json   the tuned tile table (benchmarks/tune.py), to commit under fastattn/backends/triton/tuned/
#   bench-tuned.json    the Triton backend again with the tuned table
# (`benchmarks/run.py --from-json F --markdown F.md --plot F.png` redraws the tables and plots elsewhere.)
#
# Steps, in order, each under its own time cap and the time left (every step runs even if one before it
# failed; GPU_CHECK_STEPS selects):
#   build      the CUDA extension, in the background while the Triton half of the GPU suite runs
#   tests      tests/test_gpu.py on cuda tensors (Triton, then CUDA once built), then the record check
#   sanitizer  compute-sanitizer memcheck on a small CUDA-backend forward and backward
#   decode     decoding over a key/value cache as bandwidth (benchmarks/decode.py's covering set of points)
#   bench      the main points; then FlexAttention at head dim 128; then the softcap points against Flex
#   tune       benchmarks/tune.py with the time left (minus what rebench needs)
#   rebench    the Triton backend at the main head-dim-128 points with the tuned table
# A short table of the results is printed last, so that a run cut off by its limit still reports.
#
# Dry run of this flow on the CPU (no GPU; `make gpu-preflight` does it): GPU_CHECK_DEVICE=cpu.
set -u
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
MINUTES=${GPU_CHECK_MINUTES:-9}
RESULTS=${GPU_RESULTS:-benchmarks/results}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=" ${GPU_CHECK_STEPS:-build tests sanitizer decode bench tune rebench} "
WORKERS=${GPU_TEST_WORKERS:-8}
# The dry run's interpreter and emulator are slower than a GPU: its steps get longer caps.
CAP_SCALE=${GPU_CHECK_CAP_SCALE:-$([ "$DEVICE" = cuda ] && echo 1 || echo 4)}
if [ "$DEVICE" = cuda ]; then
    POINTS="--dtypes bfloat16 --modes fwd,bwd --causal false,true"
    BENCH_ARGS=${GPU_BENCH_ARGS:---seqlens 1024,4096,16384 --head-dims 64,128 $POINTS}
    FLEX_ARGS=${GPU_FLEX_ARGS:---seqlens 4096,16384 --head-dims 128 $POINTS}
    REBENCH_ARGS=${GPU_REBENCH_ARGS:---seqlens 4096,16384 --head-dims 128 $POINTS}
    SOFTCAP_ARGS=${GPU_SOFTCAP_ARGS:---backends cuda,triton,flex}
    DECODE_ARGS=${GPU_DECODE_ARGS:---rounds 15}
else  # the dry run: the same steps at sizes the interpreter and the emulator finish quickly
    POINTS="--dtypes float16 --modes fwd,bwd --causal false,true --tokens 128 --hidden 128 --rep-seconds 0.01"
    BENCH_ARGS=${GPU_BENCH_ARGS:---seqlens 64 --head-dims 64 $POINTS}
    FLEX_ARGS=${GPU_FLEX_ARGS:---seqlens 64 --head-dims 64 $POINTS}
    REBENCH_ARGS=${GPU_REBENCH_ARGS:---seqlens 64 --head-dims 64 $POINTS}
    SOFTCAP_ARGS=${GPU_SOFTCAP_ARGS:---dry-run --backends cuda,triton,flex}
    DECODE_ARGS=${GPU_DECODE_ARGS:---points 1:80:fp16 --heads-kv 2 --head-dim 32 --page-size 16 --rounds 2
        --backends triton,cuda --sdpa-kernels flash,efficient,cudnn}
fi
BENCH_BACKENDS=${GPU_BENCH_BACKENDS:-triton,cuda,flash,cudnn,efficient}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + MINUTES * 60))
declare -a SUMMARY=()
FAILED=0

left() { echo $((DEADLINE - $(date +%s))); }
note() { SUMMARY+=("$1"); echo "== gpu-check: $1 ($(($(date +%s) - START)) s)"; }
wants() { [[ $STEPS == *" $1 "* ]]; }
step() { # step NAME SECONDS CMD...: run CMD under a timeout of at most SECONDS x CAP_SCALE (and the time left)
    local name=$1 limit=$(($2 * CAP_SCALE)) rc remaining
    shift 2
    remaining=$(left)
    if ((remaining < 15)); then note "NOT RUN  $name (time budget spent)"; return 0; fi
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
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv || true
    TESTS_ENV=(env -u TRITON_INTERPRET -u FASTATTN_CUDA_EMULATE FASTATTN_TEST_DEVICE=cuda)
    BENCH_ENV=(env -u TRITON_INTERPRET -u FASTATTN_CUDA_EMULATE)
    BENCH_DEVICE=cuda
else
    TESTS_ENV=(env FASTATTN_TEST_DEVICE=cpu)
    BENCH_ENV=(env TRITON_INTERPRET=1 FASTATTN_CUDA_EMULATE=1)
    BENCH_DEVICE=cpu
fi
"$PY" -c "import sys, torch, triton; print('gpu-check: python', sys.version.split()[0], 'torch', torch.__version__,
 'triton', triton.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

# 1. The CUDA extension builds in the background while the Triton half of the suite runs.
BUILD_PID=
if wants build && [ "$DEVICE" = cuda ]; then
    echo "== gpu-check: building the CUDA extension in the background (log: $RESULTS/build.log)"
    timeout --kill-after=10 300 "$PY" -m fastattn.cli build --verbose >"$RESULTS/build.log" 2>&1 &
    BUILD_PID=$!
elif wants build; then
    note "NOT RUN  CUDA extension build (the dry run uses the emulator)"
fi
wait_build() {
    [ -z "$BUILD_PID" ] && return 0
    local rc
    wait "$BUILD_PID"
    rc=$?
    BUILD_PID=
    grep -E "registers|spill|error" "$RESULTS/build.log" | tail -n 20
    if ((rc == 0)); then note "PASS     CUDA extension build"; else note "FAIL     CUDA extension build (exit $rc)"; FAILED=1; fi
}

# 2. The GPU correctness suite: Triton first (no build needed), then CUDA.
RECORD="$RESULTS/gpu-tests.jsonl"
if wants tests; then
    rm -f "$RECORD"
    XDIST=()
    ((WORKERS > 1)) && "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$WORKERS")
    step "GPU suite, triton backend" 200 "${TESTS_ENV[@]}" FASTATTN_GPU_RECORD="$RECORD" \
        "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests/test_gpu.py -k triton
    wait_build
    step "GPU suite, cuda backend" 150 "${TESTS_ENV[@]}" FASTATTN_GPU_RECORD="$RECORD" \
        "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests/test_gpu.py -k "cuda and not triton"
    step "GPU suite ran on $DEVICE (record check)" 30 "$PY" benchmarks/gpu_record.py "$RECORD" --device "$DEVICE"
fi
wait_build

# 3. compute-sanitizer memcheck on a small CUDA-backend case (forward and backward).
if wants sanitizer && [ "$DEVICE" = cuda ]; then
    if command -v compute-sanitizer >/dev/null 2>&1; then
        step "compute-sanitizer memcheck (cuda backend)" 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
            --target-processes all "$PY" benchmarks/sanitize_case.py
    else
        note "NOT RUN  compute-sanitizer (not on the PATH)"
    fi
elif wants sanitizer; then
    step "sanitizer case (dry run, emulator)" 120 env FASTATTN_CUDA_EMULATE=1 "$PY" benchmarks/sanitize_case.py --device cpu
fi

# 4. Decoding over a key/value cache: issue #21's GPU bar (>= 80% of the measured HBM bandwidth for long caches,
#    faster than SDPA's kernels), the one measurement that issue still lacks.
if wants decode; then
    # shellcheck disable=SC2086
    step "benchmark: decode over a key/value cache" 120 "${BENCH_ENV[@]}" "$PY" benchmarks/decode.py \
        --device "$BENCH_DEVICE" $DECODE_ARGS --out "$RESULTS/bench-decode.md"
fi

# 5. The benchmark's main points, then FlexAttention (it compiles per shape: fewer points).
if wants bench; then
    # shellcheck disable=SC2086
    step "benchmark: main points" 240 "${BENCH_ENV[@]}" "$PY" benchmarks/run.py --device "$BENCH_DEVICE" $BENCH_ARGS \
        --backends "$BENCH_BACKENDS" --max-minutes 3 --json "$RESULTS/bench-main.json" --strict
    # shellcheck disable=SC2086
    step "benchmark: FlexAttention" 90 "${BENCH_ENV[@]}" "$PY" benchmarks/run.py --device "$BENCH_DEVICE" $FLEX_ARGS \
        --backends flex --max-minutes 1 --json "$RESULTS/bench-flex.json"
    # Each backend's output passes the float64 oracle check at every point before it is timed (--strict).
    # shellcheck disable=SC2086
    step "benchmark: Gemma-2 softcap against FlexAttention" 150 "${BENCH_ENV[@]}" "$PY" benchmarks/softcap_flex.py \
        --device "$BENCH_DEVICE" $SOFTCAP_ARGS --max-minutes 2 --strict --json "$RESULTS/bench-softcap.json"
fi

# 6. Tuning with the time left, keeping 60 s for the rebench.
if wants tune; then
    budget=$(($(left) - 75))
    if ((budget > 30)); then
        DRY=()
        [ "$DEVICE" = cuda ] || DRY=(--dry-run --head-dims 64 --families none,causal --max-candidates 2)
        step "tune Triton tiles" "$budget" "${BENCH_ENV[@]}" "$PY" benchmarks/tune.py --out-dir "$RESULTS" \
            --max-minutes "$(awk "BEGIN {print ($budget - 30) / 60}")" "${DRY[@]}"
    else
        note "NOT RUN  tune Triton tiles (time budget spent)"
    fi
fi

# 7. The Triton backend again with the tuned table (copied where the launchers look for it).
if wants rebench; then
    table=$(ls "$RESULTS"/sm*-triton*.json 2>/dev/null | head -n 1)
    if [ -n "$table" ] && [ "$DEVICE" = cuda ]; then
        cp "$table" fastattn/backends/triton/tuned/
        # shellcheck disable=SC2086
        step "benchmark: triton with the tuned table" 90 "${BENCH_ENV[@]}" "$PY" benchmarks/run.py --device cuda $REBENCH_ARGS \
            --backends triton --max-minutes 1 --json "$RESULTS/bench-tuned.json"
    else
        note "NOT RUN  rebench (no tuned table in $RESULTS, or a dry run)"
    fi
fi

echo
echo "gpu-check summary ($(($(date +%s) - START)) s of ${MINUTES} min):"
printf '  %s\n' "${SUMMARY[@]}"
"$PY" benchmarks/gpu_summary.py "$RESULTS" || true
[ -f "$RESULTS/bench-decode.md" ] && grep -E '^\| ([0-9]|B )' "$RESULTS/bench-decode.md"
[ -f "$RESULTS/bench-softcap.json" ] && { "$PY" benchmarks/softcap_flex.py --from-json "$RESULTS/bench-softcap.json" || true; }
ls -1 "$RESULTS" | sed 's/^/  wrote /'
exit $FAILED

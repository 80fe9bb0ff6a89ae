"""The suite's points as pytest-benchmark cases: ``pytest benchmarks --benchmark-only``.

Same shapes, backends and modes as ``python benchmarks/run.py`` with no options (on this
machine's best device), or as ``--quick`` with ``FASTATTN_BENCH_QUICK=1``. Cases are grouped per
(mode, dtype, causal); each case's ``extra_info`` holds its TFLOP/s (from the median) and peak
memory. A backend that cannot run a case skips it with its reason. Not part of ``make test``
(``tests/`` is what that collects).
"""

from __future__ import annotations

import importlib.util
import itertools
import os

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("fastattn_bench_run", os.path.join(_HERE, "run.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # puts the helper modules beside it on sys.path

import _measure  # noqa: E402
import _points  # noqa: E402
import _runners  # noqa: E402

ARGS = bench.parse_args(["--quick"] if os.environ.get("FASTATTN_BENCH_QUICK") == "1" else [])
DEVICE = ARGS.device
RUNNERS = _runners.all_runners()
CASES = [
    (shape, name, mode) for shape in bench.shapes_for(ARGS) for name in bench.backend_names(ARGS) for mode in ARGS.modes
]


def _id(case) -> str:
    shape, name, mode = case
    return f"{name}-{mode}-" + shape.label().replace(" ", "-").replace("=", "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_attention(benchmark, case):
    shape, name, mode = case
    runner = RUNNERS[name]
    reason = runner.unavailable_reason(DEVICE)
    if reason:
        pytest.skip(reason)
    maskin = _points.build_mask(shape, DEVICE)
    pairs = None if shape.mask == "none" else _points.attended_pairs(shape, maskin)
    sets = _measure.make_inputs(shape, DEVICE, _measure.rotation_count(shape, DEVICE))
    reason = runner.unsupported_reason(shape, mode, maskin, *sets[0][:3])
    if reason:
        pytest.skip(reason)
    fn, extra = runner.make_call(shape, maskin, DEVICE)
    timed, mem_step, _keep = _measure.steps(mode, fn, sets)
    _, exc, warns = _runners.quiet_trial(bench._first_call, timed, DEVICE)
    if exc is not None:
        row = {}
        bench._classify(row, exc, warns)
        if row["status"] == "error":
            raise exc
        pytest.skip(f"{row['status']}: {row['reason']}")
    live = _measure.tensor_bytes([t for t in sets[0]] + bench._mask_tensors(maskin) + list(extra))
    peak = _measure.peak_extra_cuda(mem_step) if DEVICE.type == "cuda" else _measure.peak_extra_cpu(mem_step)
    counter = itertools.count(1)

    def call():
        timed(next(counter) % len(sets))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{mode} {shape.dtype} {'causal' if shape.causal else 'non-causal'}"
    benchmark.extra_info.update(shape.asdict(), backend=name, mode=mode)
    benchmark.extra_info["peak_mem_mb"] = round((live + peak) / 2**20, 3)
    benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["tflops"] = _points.flops(shape, mode, pairs) / stats.stats.median / 1e12

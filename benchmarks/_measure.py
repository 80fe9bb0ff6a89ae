"""Timing and peak memory of one call, the same way for every backend.

Timing. GPU: the median of CUDA-event timings after warm-up, as ``triton.testing.do_bench`` does
(rep count from a first estimate, the L2 cache cleared before each rep outside the timed
region), with rotating input sets so no rep reuses the cache lines of the one before.
CPU: the median of ``time.perf_counter`` timings after warm-up, over rotating input sets.

Peak memory of one call, inputs included: the bytes of the point's live tensors (one input set,
the mask, what the backend prepared such as SDPA's dense mask or Flex's block mask) plus the
highest extra allocation during the call. GPU: ``torch.cuda.max_memory_allocated`` minus the
allocation before the call. CPU: the same walk over ``torch.profiler``'s allocation events
(``profile_memory=True``), which see every tensor allocated through torch's CPU allocator (so an
``Lq x Lk`` score buffer is never missed) but not memory a library mallocs on its own (BLAS or
OpenMP scratch). ``bwd`` reports the peak of forward then backward: backward's saved state is the
forward's.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch
from _points import Shape
from torch import Tensor

Step = Callable[[int], object]


def make_inputs(shape: Shape, device: torch.device, n_sets: int, seed: int = 0) -> list[tuple[Tensor, ...]]:
    """``n_sets`` independent ``(q, k, v, grad_out)`` sets, standard normal, q/k/v requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    b, h, lq, lk, d = shape.batch, shape.heads, shape.seqlen, shape.seqlen_k, shape.head_dim
    for _ in range(n_sets):
        q = torch.randn(b, h, lq, d, generator=gen, device=device, dtype=shape.torch_dtype)
        k = torch.randn(b, h, lk, d, generator=gen, device=device, dtype=shape.torch_dtype)
        v = torch.randn(b, h, lk, d, generator=gen, device=device, dtype=shape.torch_dtype)
        do = torch.randn(b, h, lq, d, generator=gen, device=device, dtype=shape.torch_dtype)
        sets.append((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do))
    return sets


def input_set_bytes(shape: Shape) -> int:
    elems = shape.batch * shape.heads * shape.head_dim * (2 * shape.seqlen + 2 * shape.seqlen_k)
    return elems * torch.empty((), dtype=shape.torch_dtype).element_size()


def rotation_count(shape: Shape, device: torch.device, max_sets: int = 8) -> int:
    """Enough input sets to overflow the last-level cache twice (GPU: 256 MiB; CPU: 64 MiB)."""
    target = (256 if device.type == "cuda" else 64) * 2**20
    return max(1, min(max_sets, math.ceil(target / input_set_bytes(shape))))


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and broadcasts count once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def steps(mode: str, fn, sets: list[tuple[Tensor, ...]]) -> tuple[Step, Step, list]:
    """``(timed_step, memory_step, keep)``: callables of the set index for ``mode``.

    ``fwd`` is inference (no autograd graph); ``fwd+bwd`` is a forward and ``torch.autograd.grad``;
    ``bwd`` replays ``autograd.grad`` over a forward graph built once per set (``retain_graph``).
    """

    def fwd(i):
        q, k, v, _ = sets[i]
        with torch.no_grad():
            # Detached views: inference inputs (FlexAttention on the CPU refuses inputs requiring grad).
            return fn(q.detach(), k.detach(), v.detach())

    def fwd_bwd(i):
        q, k, v, do = sets[i]
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), do)

    if mode == "fwd":
        return fwd, fwd, []
    if mode == "fwd+bwd":
        return fwd_bwd, fwd_bwd, []
    if mode != "bwd":
        raise ValueError(f"mode: expected fwd, bwd or fwd+bwd, got {mode!r}")
    outs: list[Optional[Tensor]] = [None] * len(sets)

    def bwd(i):
        q, k, v, do = sets[i]
        if outs[i] is None:
            outs[i] = fn(q, k, v)
        return torch.autograd.grad(outs[i], (q, k, v), do, retain_graph=True)

    return bwd, fwd_bwd, outs


def time_cpu(step: Step, n_sets: int, target_s: float = 0.25, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median milliseconds of ``step`` after warm-up (``step`` has run once already)."""
    for i in range(1, n_sets):  # every set once: bwd builds each set's forward graph here, untimed
        step(i)
    t0 = time.perf_counter()
    step(0)
    est = max(time.perf_counter() - t0, 1e-6)
    for i in range(min(10, int(0.05 / est))):
        step(i % n_sets)
    reps = max(min_reps, min(max_reps, math.ceil(target_s / est)))
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        step((i + 1) % n_sets)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_cuda(
    step: Step, n_sets: int, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000
) -> float:
    """Median milliseconds over CUDA events, ``triton.testing.do_bench``-style."""
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for i in range(1, n_sets):  # every set once: bwd builds each set's forward graph here, untimed
        step(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        step(i % n_sets)
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-4)
    for i in range(max(1, int(warmup_ms / est))):
        step(i % n_sets)
    reps = max(min_reps, min(max_reps, int(rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        cache.zero_()  # evict L2 outside the timed region
        starts[i].record()
        step((i + 1) % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def peak_extra_cuda(step: Step) -> int:
    """Highest allocation above the current one during ``step(0)``, in bytes."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(0)
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before)


def peak_extra_cpu(step: Step) -> int:
    """Highest allocation above the current one during ``step(0)``, from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(0)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()  # positive for an allocation, negative for a free
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silences file descriptor 2 (the profiler's C++ start/stop lines would break the progress bar)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text

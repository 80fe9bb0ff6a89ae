"""Context-parallel points: ring attention across N local processes against single-process attention.

``python benchmarks/run.py --context-parallel N`` (or this file directly) runs each sequence length
once in one process (``fastattn.scaled_dot_product_attention``) and once across ``N`` gloo
processes (``fastattn.distributed.ring_attention``), and reports the median time and the peak
memory of the busiest rank. On the CPU the memory column is the point: each rank allocates only its
shard of the inputs, so it falls as ``N`` grows; speed across processes is for GPUs (here the
processes share the same cores).

Peak memory is the growth of the process's peak resident set (``ru_maxrss``) over its value just
before the inputs are made, in fresh processes, so nothing from an earlier point is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _measure(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _worker(rank: int, world: int, store: str, point: dict, results: str) -> None:
    torch.set_num_threads(max(1, point["threads"] // world))
    import fastattn
    from fastattn.distributed import ring_attention

    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=300)
        )
    # A tiny call first, so that loading a backend's library is not counted as the point's memory.
    tiny = torch.randn(1, 1, 2 * world, 16).to(getattr(torch, point["dtype"]))
    fastattn.scaled_dot_product_attention(tiny, tiny, tiny, is_causal=point["causal"], backend=point["backend"])
    before = _peak_rss_mb()
    g = torch.Generator().manual_seed(rank)
    local = point["seqlen"] // world
    shape = (point["batch"], point["heads"], local, point["head_dim"])
    dtype = getattr(torch, point["dtype"])
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for _ in range(3))
    backend = point["backend"]
    if world == 1:
        fn = lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=point["causal"], backend=backend)  # noqa: E731
    else:
        fn = lambda: ring_attention(q, k, v, is_causal=point["causal"], backend=backend)  # noqa: E731
    ms = _measure(fn, point["warmup"], point["reps"])
    row = {"rank": rank, "ms": ms, "peak_mem_mb": _peak_rss_mb() - before}
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    else:
        rows = [row]
    if rank == 0:
        with open(results, "w") as f:
            json.dump(rows, f)


def run_point(point: dict, world: int) -> dict:
    """One point on ``world`` processes: ``{"ms": slowest rank's median, "peak_mem_mb": busiest rank's}``."""
    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), point, results), nprocs=world, join=True)
        with open(results) as f:
            rows = json.load(f)
    return {"ms": max(r["ms"] for r in rows), "peak_mem_mb": max(r["peak_mem_mb"] for r in rows)}


def _default_backend() -> str:
    from fastattn.backends import registry

    cpu = registry.get("cpu") if "cpu" in registry.names() else None
    return "cpu" if cpu is not None and cpu.unavailable_reason() is None else "reference"


def run(world: int, seqlens: list[int], *, heads=8, head_dim=64, batch=1, causal=True, dtype="float32",
        backend=None, warmup=1, reps=3, out=sys.stdout) -> list[dict]:  # fmt: skip
    """Every seqlen on 1 process and on ``world`` processes; prints a table and returns the rows."""
    backend = backend or _default_backend()
    rows = []
    print(
        f"context parallelism: {world} processes vs 1, backend {backend}, B={batch} H={heads} D={head_dim} "
        f"{dtype} {'causal' if causal else 'dense'} (CPU: the processes share {os.cpu_count()} cores)",
        file=out,
    )
    print(f"{'seqlen':>8} {'procs':>5} {'ms':>10} {'peak MB/rank':>13} {'mem vs 1':>9}", file=out)
    for seqlen in seqlens:
        point = dict(seqlen=seqlen, heads=heads, head_dim=head_dim, batch=batch, causal=causal, dtype=dtype,
                     backend=backend, warmup=warmup, reps=reps, threads=torch.get_num_threads())  # fmt: skip
        single = run_point(point, 1)
        multi = run_point(point, world)
        for procs, r in ((1, single), (world, multi)):
            ratio = r["peak_mem_mb"] / single["peak_mem_mb"] if single["peak_mem_mb"] > 0 else float("nan")
            print(f"{seqlen:>8} {procs:>5} {r['ms']:>10.1f} {r['peak_mem_mb']:>13.1f} {ratio:>9.2f}", file=out)
            rows.append({"backend": backend, "mode": "fwd", "procs": procs, "seqlen": seqlen, "heads": heads,
                         "head_dim": head_dim, "batch": batch, "causal": causal, "dtype": dtype, **r})  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-parallel", type=int, default=2, metavar="N")
    parser.add_argument("--seqlens", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dense", action="store_true", help="non-causal (default: causal, zig-zag layout)")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.context_parallel < 2:
        parser.error(f"--context-parallel: expected at least 2 processes, got {args.context_parallel}")
    rows = run(args.context_parallel, args.seqlens, heads=args.heads, head_dim=args.head_dim,
               causal=not args.dense, backend=args.backend)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

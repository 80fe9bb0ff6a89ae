"""Graph attention layers on the CPU: fastattn.nn against PyTorch Geometric, forward + backward, time and memory.

    python benchmarks/graph.py [--nodes 20000] [--edges 320000] [--in-channels 64] [--heads 8] [--channels 16]
                               [--layers gatv2,gat,transformer] [--reps 5] [--markdown out.md] [--json out.json]

Issue 22's point: GATv2Conv, 20,000 nodes, 320,000 random edges (uniform sources and targets, seeded;
GAT layers add one self loop per node, PyG's default), 64 input channels, 8 heads of 16, the input
requiring grad; GATConv and TransformerConv beside it. Every (library, layer) pair runs in a fresh
process of its own, one after the other in one invocation, so neither library's allocations or
caches reach the other's numbers:

* **time**: median (and min..max) of ``--reps`` forward + backward steps after one warm-up step, by
  ``time.perf_counter``; fastattn's graph (CSR/CSC of ``edge_index``) is built in the warm-up and
  reused, as it is for a static graph in training;
* **peak RSS growth**: the process's peak resident set (``ru_maxrss``) at the end minus its value just
  before the inputs and the layer are made (after importing the library and running a tiny layer, so
  loaded code is not counted): the memory the computation itself needs, inputs included;
* **peak RSS**: the absolute peak, for reference (importing torch's CUDA build alone is about 0.66 GB);
* **torch peak**: the peak of live torch allocations during one step, from ``torch.profiler``'s memory
  events (every tensor torch allocates, nothing else).

Ratios: ``speed-up`` = PyG's median / fastattn's; ``memory`` = fastattn's / PyG's (growth and torch peak).
``--device cuda`` runs the same comparison on a GPU with fastattn's Triton backend (timing synchronised,
memory from ``torch.cuda.max_memory_allocated``); written without a GPU, it has not run on one yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

LAYERS = {"gatv2": "GATv2Conv", "gat": "GATConv", "transformer": "TransformerConv"}
LIBRARIES = ("pyg", "fastattn")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _torch_peak_mb(step) -> float:
    """Peak of live torch CPU allocations during ``step()``, from the profiler's ``[memory]`` events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def worker(point: dict) -> dict:
    """One (library, layer) point, in this (fresh) process."""
    import torch

    if point["threads"]:
        torch.set_num_threads(point["threads"])
    if point["library"] == "pyg":
        import torch_geometric.nn as layers
    else:
        import fastattn.nn as layers
    cls = getattr(layers, LAYERS[point["layer"]])
    device = torch.device(point.get("device", "cpu"))
    cuda = device.type == "cuda"
    kwargs = {"backend": "triton" if cuda else "cpu"} if point["library"] == "fastattn" else {}
    tiny = cls(4, 2, heads=2, **kwargs).to(device)  # load the library's code outside the measurement
    tiny(torch.randn(3, 4, device=device), torch.tensor([[0, 1], [1, 2]], device=device)).sum().backward()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    before = _rss_mb()
    before_cuda = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(0)
    n, e = point["nodes"], point["edges"]
    x = torch.randn(n, point["in_channels"], generator=gen).to(device).requires_grad_(True)
    edge_index = torch.randint(0, n, (2, e), generator=gen).to(device)
    torch.manual_seed(0)
    layer = cls(point["in_channels"], point["channels"], heads=point["heads"], **kwargs).to(device)
    grad = torch.randn(n, point["heads"] * point["channels"], generator=gen).to(device)

    def step():
        out = layer(x, edge_index)
        out.backward(grad)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    step()  # warm-up: fastattn builds and caches the graph here (and Triton compiles on a GPU)
    times = []
    for _ in range(point["reps"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    growth, peak = _rss_mb() - before, _rss_mb()
    result = {
        **point,
        "ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "rss_growth_mb": growth,
        "peak_rss_mb": peak,
        "threads": torch.get_num_threads(),
    }
    if cuda:  # device memory: the peak above what was allocated before the inputs, in place of RSS growth
        result["rss_growth_mb"] = (torch.cuda.max_memory_allocated(device) - before_cuda) / 2**20
        result["torch_peak_mb"] = result["rss_growth_mb"]
        result["device_name"] = torch.cuda.get_device_name(device)
    else:
        result["torch_peak_mb"] = _torch_peak_mb(step)
    return result


def run_point(point: dict) -> dict:
    """``worker(point)`` in a fresh interpreter; its JSON result."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import graph; "
    code += "print('RESULT' + json.dumps(graph.worker(json.loads(sys.argv[1]))))"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(point)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT") :])
    raise RuntimeError(f"{point['library']} {point['layer']} failed:\n{proc.stderr[-3000:]}")


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        isa = "AVX-512" if " avx512f" in flags else ("AVX2" if " avx2" in flags else "no AVX2")
    except (OSError, StopIteration):
        isa = "?"
    try:
        import importlib.metadata as md

        pyg = md.version("torch-geometric")
    except Exception:
        pyg = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_geometric": pyg,
        "python": platform.python_version(),
        "fastattn_commit": commit,
        "date": date.today().isoformat(),
        "load_before": os.getloadavg()[0],
        **_isa_fields(),
    }


def _isa_fields() -> dict:
    """fastattn's CPU kernel build (the graph kernels follow the attention kernels' rule, FASTATTN_CPU_ISA)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _report

    try:
        from fastattn.backends import cpu

        cpu.load()
    except Exception:  # reported as unavailable below
        pass
    return _report.cpu_isa_fields()


def table(results: list[dict]) -> str:
    by = {(r["library"], r["layer"]): r for r in results}
    rows = [
        "| layer | PyG ms | fastattn ms | speed-up | PyG RSS growth MB | fastattn MB | memory ratio "
        "| PyG torch peak MB | fastattn MB | ratio | PyG peak RSS MB | fastattn MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for layer in dict.fromkeys(r["layer"] for r in results):
        p, f = by.get(("pyg", layer)), by.get(("fastattn", layer))
        if not p or not f:
            continue
        mem = f["rss_growth_mb"] / p["rss_growth_mb"]
        rows.append(
            f"| {LAYERS[layer]} | {p['ms']:.0f} ({p['min_ms']:.0f}..{p['max_ms']:.0f}) "
            f"| {f['ms']:.0f} ({f['min_ms']:.0f}..{f['max_ms']:.0f}) | **{p['ms'] / f['ms']:.1f}x** "
            f"| {p['rss_growth_mb']:.0f} | {f['rss_growth_mb']:.0f} | **{mem:.2f}** "
            f"| {p['torch_peak_mb']:.0f} | {f['torch_peak_mb']:.0f} | {f['torch_peak_mb'] / p['torch_peak_mb']:.2f} "
            f"| {p['peak_rss_mb']:.0f} | {f['peak_rss_mb']:.0f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20_000)
    parser.add_argument("--edges", type=int, default=320_000)
    parser.add_argument("--in-channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated subset of {', '.join(LAYERS)}")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0: torch's)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda: fastattn's Triton backend against PyG on the GPU; memory is then "
        "torch.cuda.max_memory_allocated above the pre-input value (this path has not run on a GPU yet)",
    )
    parser.add_argument("--markdown", help="write the table (and the machine) to this file")
    parser.add_argument("--json", help="write every point's numbers to this file")
    args = parser.parse_args(argv)
    layers = [name for name in args.layers.split(",") if name]
    for name in layers:
        if name not in LAYERS:
            parser.error(f"--layers: expected names from {', '.join(LAYERS)}, got {name!r}")
    info = machine()
    print(json.dumps(info))
    results = []
    for layer in layers:
        for library in LIBRARIES:
            point = {
                "library": library,
                "layer": layer,
                "nodes": args.nodes,
                "edges": args.edges,
                "in_channels": args.in_channels,
                "heads": args.heads,
                "channels": args.channels,
                "reps": args.reps,
                "threads": args.threads,
                "device": args.device,
            }
            r = run_point(point)
            results.append(r)
            print(
                f"{library:9s} {LAYERS[layer]:16s} {r['ms']:9.1f} ms  RSS growth {r['rss_growth_mb']:7.1f} MB  "
                f"torch peak {r['torch_peak_mb']:7.1f} MB  peak RSS {r['peak_rss_mb']:7.1f} MB",
                flush=True,
            )
    text = table(results)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the CPU attention kernels' time goes, per instruction-set build (the figures of the kernel's design note).

    python benchmarks/cpu_kernel_phases.py [--isas avx2,avx512] [--rounds 2] [--no-threads]

Three parts, each repeated ``--rounds`` times (the spread is the point on a shared machine):

1. phases (``benchmarks/cpu_kernel_phases.cpp``, compiled here per ISA against ``csrc/cpu/attn_cpu_kernel.h``):
   the pieces of a dense forward tile (64 queries x 256 keys, head dim 64) timed alone in one thread's CPU
   time: the core's FMA peak, the two GEMMs through fastattn's micro-kernel and through oneDNN's brgemm
   (capped to the same ISA with ``ONEDNN_MAX_CPU_ISA``), the max and exp passes, the K/V packing per dtype.
2. ops, one thread's CPU time (immune to other processes' load): the whole forward in fp32 / bf16 / fp16
   and the fp32 backward for each forced ISA (``FASTATTN_CPU_ISA``), next to ``torch.mm`` fp32 2048^3 and
   torch's SDPA in a process capped to the same ISA (``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``,
   ``ONEDNN_MAX_CPU_ISA``): whole vs parts shows what the phases miss.
3. threads: the dense fp32 forward with 2 threads, wall clock, OpenMP's default wait policy against
   ``OMP_WAIT_POLICY=passive`` (fresh processes, alternated), against one thread's CPU time.

B = 1, H = 8, L = 2048, D = 64 throughout. GFLOP/s are 4·B·H·L²·D per forward (backward 2.5x).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
ISA_CAPS = {
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "ALL"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
B, H, L, D = 1, 8, 2048, 64


def build_phases(isa: str) -> Path:
    """The phase timer for one ISA, compiled once per source hash (cached next to the extension builds)."""
    import torch
    from torch.utils.cpp_extension import include_paths

    from fastattn import _ext

    src = HERE / "cpu_kernel_phases.cpp"
    deps = [src, *sorted((ROOT / "csrc" / "cpu").glob("*.h"))]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in deps) + isa.encode() + torch.__version__.encode())
    cache = Path(os.environ.get("FASTATTN_CACHE_DIR", Path.home() / ".cache" / "fastattn")) / "phases"
    exe = cache / f"cpu_kernel_phases-{isa}-{key.hexdigest()[:12]}"
    if exe.exists():
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    lib = Path(torch.__file__).parent / "lib"
    cmd = [
        _ext._cxx() or "c++",
        "-O3",
        "-std=c++20",
        "-Wno-psabi",
        f"-DPHASES_ISA_{isa.upper()}",
        f"-I{ROOT / 'csrc' / 'cpu'}",
    ]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [str(src), "-o", str(exe), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    print(f"compiling the {isa} phase timer ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return exe


def run_phases(isa: str) -> str:
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=ISA_CAPS[isa]["ONEDNN_MAX_CPU_ISA"])
    return subprocess.run([str(build_phases(isa))], env=env, capture_output=True, text=True, check=True).stdout


def ops_child(isa: str) -> dict:
    """Part 2 inside a process capped to ``isa``: one thread's CPU time per op."""
    import torch
    import torch.nn.functional as F

    import fastattn
    from fastattn.backends import cpu

    cpu.load()
    torch.set_num_threads(1)
    flops = 4.0 * B * H * L * L * D

    def sdpa_cpu(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")

    def rate(fn, work, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
        return work / min(times) / 1e9

    out = {"isa": cpu.isa(), "info": torch.ops.fastattn.cpu_attn_info()}
    out["torch"] = torch.backends.cpu.get_cpu_capability()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out["torch.mm fp32"] = rate(lambda: torch.mm(a, b), 2.0 * 2048**3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v = (torch.randn(B, H, L, D).to(dtype) for _ in range(3))
        name = str(dtype).replace("torch.", "")
        qkv = (q, k, v)
        out[f"fastattn fwd {name}"] = rate(lambda t=qkv: sdpa_cpu(*t), flops)
        out[f"sdpa fwd {name}"] = rate(lambda t=qkv: F.scaled_dot_product_attention(*t), flops)
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, L, D)
    for who, fn in (
        ("fastattn", lambda: fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")),
        ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v)),
    ):
        o = fn()
        out[f"{who} bwd float32"] = rate(lambda o=o: o.backward(g, retain_graph=True), 2.5 * flops)
    return out


def run_ops(isa: str) -> dict:
    env = dict(os.environ, FASTATTN_CPU_ISA=isa, **ISA_CAPS[isa])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ops-child", isa]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def threads_child() -> float:
    """Part 3 inside a fresh process: the median wall time of the dense fp32 forward with 2 threads."""
    import torch

    import fastattn
    from fastattn.backends import cpu

    cpu.load()
    torch.set_num_threads(2)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    for _ in range(2):
        fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        fastattn.scaled_dot_product_attention(q, k, v, backend="cpu")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_threads(isa: str, passive: bool) -> float:
    env = dict(os.environ, FASTATTN_CPU_ISA=isa, **ISA_CAPS[isa])
    if passive:
        env["OMP_WAIT_POLICY"] = "passive"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads-child"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isas", default="avx2,avx512", help="comma-separated builds to profile")
    parser.add_argument("--rounds", type=int, default=2, help="repeat every part this often (the spread)")
    parser.add_argument("--no-threads", action="store_true", help="skip part 3")
    parser.add_argument("--ops-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ops_child:
        print(json.dumps(ops_child(args.ops_child)))
        return 0
    if args.threads_child:
        print(threads_child())
        return 0
    isas = [i for i in args.isas.split(",") if i]
    for isa in isas:
        if isa not in ISA_CAPS:
            parser.error(f"--isas: expected names from {', '.join(ISA_CAPS)}, got {isa!r}")
    flops = 4.0 * B * H * L * L * D
    for isa in isas:
        print(f"== {isa}: phases of a dense forward tile (one thread, CPU time)")
        for r in range(args.rounds):
            print(f"-- round {r + 1}")
            print(run_phases(isa), end="")
        print(f"== {isa}: whole ops (one thread, CPU time, process capped to {isa}), GFLOP/s per round")
        rounds = [run_ops(isa) for _ in range(args.rounds)]
        print(f"   {rounds[0]['info']}; torch's kernels: {rounds[0]['torch']}")
        peak = [r["torch.mm fp32"] for r in rounds]
        for key in rounds[0]:
            if key in ("isa", "info", "torch"):
                continue
            vals = [r[key] for r in rounds]
            rel = ", ".join(f"{v / p:.2f}" for v, p in zip(vals, peak))
            print(f"   {key:22s} {'  '.join(f'{v:6.1f}' for v in vals)}   (x torch.mm fp32: {rel})")
        if args.no_threads:
            continue
        print(f"== {isa}: dense fp32 forward, 2 threads, wall clock (fresh processes, alternated)")
        walls: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for passive in (False, True):
                walls[passive].append(run_threads(isa, passive))
        for passive, ts in walls.items():
            policy = "OMP_WAIT_POLICY=passive" if passive else "OpenMP default wait policy"
            print(f"   {policy:27s} " + "  ".join(f"{t * 1e3:6.1f} ms ({flops / t / 1e9:5.1f} GFLOP/s)" for t in ts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

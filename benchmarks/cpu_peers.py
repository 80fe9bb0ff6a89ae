"""fastattn's CPU backend against the peers a CPU user has: torch SDPA and compiled FlexAttention.

    python benchmarks/cpu_peers.py [--reps 7] [--points dense_fp32,window_8192] [--threads 2]
                                   [--json r.json] [--markdown r.md] [--peers-isa avx2]

One process, contenders interleaved within every repetition (so machine noise hits them alike),
median of ``time.perf_counter`` after warm-up. B = 1, H = 8, D = 64. SDPA gets the equivalent boolean
mask where it has no keyword; FlexAttention's block mask is built once outside the timing, as its
users do; fastattn's per-call work (its tile summary included) is timed. GFLOP/s on masked points
count attended pairs only (forward 4·pairs·D per head, forward+backward 3.5x that). ``ratio`` is the
best peer's time over fastattn's (> 1: fastattn is faster).

The fp32 matmul peak is measured in the same run: ``torch.mm`` on 2048 x 2048 fp32 matrices is a fourth
contender of ``dense_fp32``, interleaved with the others, and the dense forward's rate is reported as a
fraction of it (the issue's bar: >= 90%).

Instruction sets: the header says which build of fastattn's CPU kernels ran (``FASTATTN_CPU_ISA=avx2``
forces the AVX2 build on an AVX-512 machine) and torch's own. ``--peers-isa avx2`` also caps torch (its
kernels, MKL, oneDNN: ``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``) and
fastattn to AVX2 by re-running itself with those variables set, so the whole table is what an AVX2-only
machine of the same core would give. The bf16 bar is 1.5x SDPA where fastattn's bf16 has a native dot
(``brgemm_bf16=1``), else 1.0x; at the dense bf16 and fp16 points ``fa-fp32`` is fastattn on the same inputs
in fp32, interleaved, so the summary's ratio says whether the low precision is no slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import fastattn
from fastattn.backends import cpu as _cpu

try:
    from . import _report  # imported as benchmarks.cpu_peers
except ImportError:
    import _report  # run as a script from benchmarks/

B, H, D = 1, 8, 64
# name: (dtype, mode, seqlen, mask)
POINTS = {
    "dense_fp32": (torch.float32, "fwd", 2048, "none"),
    "dense_fp32_fwd_bwd": (torch.float32, "fwd_bwd", 2048, "none"),
    "causal_fp32": (torch.float32, "fwd", 2048, "causal"),
    "dense_bf16": (torch.bfloat16, "fwd", 2048, "none"),
    "dense_bf16_fwd_bwd": (torch.bfloat16, "fwd_bwd", 2048, "none"),
    "dense_fp16": (torch.float16, "fwd", 2048, "none"),
    "dense_fp16_fwd_bwd": (torch.float16, "fwd_bwd", 2048, "none"),
    "window_8192": (torch.float32, "fwd", 8192, "window"),
    "block_sparse_4096": (torch.float32, "fwd", 4096, "block_sparse"),
}
BARS = {
    "dense_fp32": 1.0,
    "dense_fp32_fwd_bwd": 1.0,
    "causal_fp32": 1.0,
    "dense_bf16": 1.5,  # 1.0 where the bf16 kernels have no native dot (bars())
    "dense_bf16_fwd_bwd": 1.0,
    "dense_fp16": 1.0,
    "dense_fp16_fwd_bwd": 1.0,
    "window_8192": 1.2,
    "block_sparse_4096": 3.0,
}
MATMUL_N = 2048  # the fp32 matmul peak: torch.mm of two MATMUL_N x MATMUL_N matrices
PEAK_BAR = 0.90  # dense fp32 forward against that peak
PEERS_ISA_VARS = {  # --peers-isa: what caps every contender to one instruction set
    "avx2": {
        "FASTATTN_CPU_ISA": "avx2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "default": {
        "FASTATTN_CPU_ISA": "default",
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
    },
}
WINDOW = 256  # each query attends itself and the 255 keys before it
BLOCK, DENSITY = 64, 0.10


def block_layout(seqlen: int, seed: int = 0) -> torch.Tensor:
    """(n, n) booleans: about DENSITY of the 64 x 64 blocks attended, plus the diagonal."""
    n = seqlen // BLOCK
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.rand(n, n, generator=gen) < DENSITY
    return blocks | torch.eye(n, dtype=torch.bool)


def dense_mask(kind: str, seqlen: int, layout: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (L, L) boolean (True = attend) equivalent of a mask kind, for SDPA and for FLOP counting."""
    i = torch.arange(seqlen).unsqueeze(1)
    j = torch.arange(seqlen).unsqueeze(0)
    if kind == "none":
        return None
    if kind == "causal":
        return j <= i
    if kind == "window":
        return (j <= i) & (j > i - WINDOW)
    return layout.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)


def mask_mod(kind: str, layout: Optional[torch.Tensor]):
    if kind == "none":
        return None
    if kind == "causal":
        return lambda b, h, q, kv: q >= kv
    if kind == "window":
        return lambda b, h, q, kv: (q >= kv) & (q - kv < WINDOW)
    return lambda b, h, q, kv: layout[q // BLOCK, kv // BLOCK]


def bars() -> dict[str, float]:
    """The bar per point; bf16's is 1.5x only where fastattn's bf16 runs a native bf16 dot."""
    out = dict(BARS)
    if "brgemm_bf16=1" not in torch.ops.fastattn.cpu_attn_info():
        out["dense_bf16"] = 1.0
    return out


def contenders(kind: str, seqlen: int) -> tuple[dict[str, Callable], int]:
    """Callables (q, k, v) -> out for each contender, and the attended pairs per head."""
    layout = block_layout(seqlen) if kind == "block_sparse" else None
    dense = dense_mask(kind, seqlen, layout)
    pairs = seqlen * seqlen if dense is None else int(dense.sum())
    fa_kw: dict = {}
    if kind == "causal":
        fa_kw = {"is_causal": True}
    elif kind == "window":
        fa_kw = {"is_causal": True, "window": (WINDOW - 1, 0)}
    elif kind == "block_sparse":
        fa_kw = {"attn_mask": dense}
    sdpa_kw = {"is_causal": True} if kind == "causal" else ({"attn_mask": dense} if dense is not None else {})
    mod = mask_mod(kind, layout)
    block_mask = None if mod is None else create_block_mask(mod, 1, 1, seqlen, seqlen, device="cpu")
    # A fresh compile per point: earlier points' guards would otherwise use up dynamo's recompile
    # limit and leave FlexAttention running eagerly (orders of magnitude slower).
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    return (
        {
            "fastattn": lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, backend="cpu", **fa_kw),
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **sdpa_kw),
            "flex": lambda q, k, v: flex(q, k, v, block_mask=block_mask),
        },
        pairs,
    )


def step(fn: Callable, mode: str, q, k, v, grad) -> Callable[[], None]:
    if mode == "fwd":
        return lambda: fn(q, k, v)

    def fwd_bwd():
        out = fn(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    return fwd_bwd


def run_point(name: str, reps: int, warmup: int) -> list[dict]:
    dtype, mode, seqlen, kind = POINTS[name]
    gen = torch.Generator().manual_seed(0)
    need_grad = mode == "fwd_bwd"
    q, k, v = (torch.randn(B, H, seqlen, D, generator=gen).to(dtype).requires_grad_(need_grad) for _ in range(3))
    grad = torch.randn(B, H, seqlen, D, generator=gen).to(dtype)
    fns, pairs = contenders(kind, seqlen)
    steps = {}
    for who, fn in fns.items():
        steps[who] = step(fn, mode, q, k, v, grad)
        try:
            for _ in range(warmup):
                steps[who]()
        except Exception as exc:  # a peer that cannot run this point is reported, not fatal
            print(f"  {name}: {who} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            steps.pop(who)
    if dtype != torch.float32 and kind == "none":  # the same shapes in fp32, interleaved: bf16/fp16 vs fp32
        q32, k32, v32 = (t.detach().float().requires_grad_(need_grad) for t in (q, k, v))
        steps["fa-fp32"] = step(fns["fastattn"], mode, q32, k32, v32, grad.float())
        for _ in range(warmup):
            steps["fa-fp32"]()
    if name == "dense_fp32":  # the fp32 matmul peak, interleaved with the point it judges
        a, b = (torch.randn(MATMUL_N, MATMUL_N, generator=gen) for _ in range(2))
        steps["torch.mm"] = lambda: torch.mm(a, b)
        for _ in range(warmup):
            steps["torch.mm"]()
    times: dict[str, list[float]] = {who: [] for who in steps}
    with torch.no_grad() if not need_grad else torch.enable_grad():
        for _ in range(reps):
            for who, run in steps.items():  # interleaved: every repetition times every contender
                t0 = time.perf_counter()
                run()
                times[who].append(time.perf_counter() - t0)
    flops = 4.0 * B * H * pairs * D * (3.5 if mode == "fwd_bwd" else 1.0)
    medians = {who: statistics.median(ts) for who, ts in times.items()}
    peers = [m for who, m in medians.items() if who not in ("fastattn", "torch.mm", "fa-fp32")]
    bar = bars()[name]
    rows = []
    for who, ts in times.items():
        med = medians[who]
        ratio = (min(peers) / med) if (who == "fastattn" and peers) else None
        rows.append(
            {
                "point": name,
                "who": who,
                "dtype": str(dtype).replace("torch.", ""),
                "mode": mode,
                "ms": med * 1e3,
                "min_ms": min(ts) * 1e3,
                "max_ms": max(ts) * 1e3,
                "gflops": (2.0 * MATMUL_N**3 if who == "torch.mm" else flops) / med / 1e9,
                "ratio": ratio,
                "bar": bar if who == "fastattn" else None,
            }
        )
    return rows


def summary(rows: list[dict]) -> list[str]:
    """The bars that span points: dense fp32 against the matmul peak, bf16 against fp32."""
    by = {(r["point"], r["who"]): r for r in rows}
    lines = []
    fa, mm = by.get(("dense_fp32", "fastattn")), by.get(("dense_fp32", "torch.mm"))
    if fa and mm:
        frac = fa["gflops"] / mm["gflops"]
        verdict = "meets" if frac >= PEAK_BAR else "misses"
        lines.append(
            f"dense fp32 forward: {fa['gflops']:.1f} GFLOP/s = {frac:.0%} of the fp32 matmul peak measured in this "
            f"run ({mm['gflops']:.1f} GFLOP/s, torch.mm {MATMUL_N}x{MATMUL_N}); {verdict} the {PEAK_BAR:.0%} bar"
        )
    for point in POINTS:
        lo, f32 = by.get((point, "fastattn")), by.get((point, "fa-fp32"))
        if lo and f32:
            lines.append(
                f"{point}: fastattn {lo['dtype']} {lo['ms']:.1f} ms vs the same shapes in fp32 {f32['ms']:.1f} ms "
                f"(interleaved): {f32['ms'] / lo['ms']:.2f}x (>= 1.0: no slower than fp32)"
            )
    missed = [r["point"] for r in rows if r["who"] == "fastattn" and r["ratio"] is not None and r["ratio"] < r["bar"]]
    lines.append("every point meets its bar" if not missed else f"below the bar: {', '.join(missed)}")
    return lines


def _table_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'point':20s} {'who':9s} {'ms':>9s} {'min..max ms':>17s} {'GFLOP/s':>8s} {'ratio':>6s} {'bar':>5s}"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
        bar = f"{r['bar']:.1f}" if r["bar"] is not None else ""
        spread = f"{r['min_ms']:.1f}..{r['max_ms']:.1f}"
        lines.append(
            f"{r['point']:20s} {r['who']:9s} {r['ms']:9.1f} {spread:>17s} {r['gflops']:8.1f} {ratio:>6s} {bar:>5s}"
        )
    return lines


def _reexec_with_isa_caps(isa: str) -> None:
    """Run this script again with every contender capped to ``isa`` (the variables act only at startup)."""
    env = dict(os.environ, **PEERS_ISA_VARS[isa], FASTATTN_CPU_PEERS_REEXEC="1")
    argv = [sys.executable, os.path.abspath(__file__), *[a for a in sys.argv[1:]]]
    os.execve(sys.executable, argv, env)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=",".join(POINTS), help=f"comma-separated subset of {', '.join(POINTS)}")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--peers-isa",
        choices=sorted(PEERS_ISA_VARS),
        default=None,
        help="cap torch (its kernels, MKL, oneDNN) and fastattn to this instruction set: an AVX2-only machine "
        "of the same core, emulated",
    )
    parser.add_argument("--json", default=None, help="write the header (machine, versions, ISAs) and rows here")
    parser.add_argument("--markdown", default=None, help="write the table with its header lines here")
    args = parser.parse_args(argv)
    if args.peers_isa and os.environ.get("FASTATTN_CPU_PEERS_REEXEC") != "1":
        if argv is not None:
            parser.error("--peers-isa re-runs the script: use it from the command line")
        _reexec_with_isa_caps(args.peers_isa)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [p for p in args.points.split(",") if p]
    for p in names:
        if p not in POINTS:
            parser.error(f"--points: expected names from {', '.join(POINTS)}, got {p!r}")
    _cpu.load()
    isa = _report.cpu_isa_fields()
    head = [
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={B} H={H} D={D}, reps {args.reps}",
        _report.isa_line(isa) + f"; {torch.ops.fastattn.cpu_attn_info().rsplit(' ', 1)[-1]}",
    ]
    print("\n".join(head))
    print(_table_lines([])[0])
    rows = []
    for name in names:
        point_rows = run_point(name, args.reps, args.warmup)
        rows += point_rows
        for line in _table_lines(point_rows)[1:]:
            print(line, flush=True)
    tail = summary(rows)
    print("\n".join(tail))
    command = ["benchmarks/cpu_peers.py", *(sys.argv[1:] if argv is None else argv)]
    if args.json:
        header = _report.header(torch.device("cpu"), command)
        with open(args.json, "w") as f:
            json.dump({"schema": 1, "header": header, "rows": rows, "summary": tail}, f, indent=1)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(["```", *head, *_table_lines(rows), *tail, "```", ""]))


if __name__ == "__main__":
    main()

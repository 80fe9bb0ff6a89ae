"""fastattn's CPU backend against the peers a CPU user has: torch SDPA and compiled FlexAttention.

    python benchmarks/cpu_peers.py [--reps 7] [--points dense_fp32,window_8192] [--threads 2]

One process, contenders interleaved within every repetition (so machine noise hits them alike),
median of ``time.perf_counter`` after warm-up. B = 1, H = 8, D = 64. SDPA gets the equivalent boolean
mask where it has no keyword; FlexAttention's block mask is built once outside the timing, as its
users do; fastattn's per-call work (its tile summary included) is timed. GFLOP/s on masked points
count attended pairs only (forward 4·pairs·D per head, forward+backward 3.5x that). ``ratio`` is the
best peer's time over fastattn's (> 1: fastattn is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import fastattn
from fastattn.backends import cpu as _cpu  # noqa: F401  (registers "cpu")

B, H, D = 1, 8, 64
# name: (dtype, mode, seqlen, mask)
POINTS = {
    "dense_fp32": (torch.float32, "fwd", 2048, "none"),
    "dense_fp32_fwd_bwd": (torch.float32, "fwd_bwd", 2048, "none"),
    "causal_fp32": (torch.float32, "fwd", 2048, "causal"),
    "dense_bf16": (torch.bfloat16, "fwd", 2048, "none"),
    "window_8192": (torch.float32, "fwd", 8192, "window"),
    "block_sparse_4096": (torch.float32, "fwd", 4096, "block_sparse"),
}
BARS = {
    "dense_fp32": 1.0,
    "dense_fp32_fwd_bwd": 1.0,
    "causal_fp32": 1.0,
    "dense_bf16": 1.5,
    "window_8192": 1.2,
    "block_sparse_4096": 3.0,
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
    times: dict[str, list[float]] = {who: [] for who in steps}
    with torch.no_grad() if not need_grad else torch.enable_grad():
        for _ in range(reps):
            for who, run in steps.items():  # interleaved: every repetition times every contender
                t0 = time.perf_counter()
                run()
                times[who].append(time.perf_counter() - t0)
    flops = 4.0 * B * H * pairs * D * (3.5 if mode == "fwd_bwd" else 1.0)
    medians = {who: statistics.median(ts) for who, ts in times.items()}
    peers = [m for who, m in medians.items() if who != "fastattn"]
    rows = []
    for who, ts in times.items():
        med = medians[who]
        ratio = (min(peers) / med) if (who == "fastattn" and peers) else None
        rows.append(
            {
                "point": name,
                "who": who,
                "ms": med * 1e3,
                "min_ms": min(ts) * 1e3,
                "max_ms": max(ts) * 1e3,
                "gflops": flops / med / 1e9,
                "ratio": ratio,
                "bar": BARS[name] if who == "fastattn" else None,
            }
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=",".join(POINTS), help=f"comma-separated subset of {', '.join(POINTS)}")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [p for p in args.points.split(",") if p]
    for p in names:
        if p not in POINTS:
            parser.error(f"--points: expected names from {', '.join(POINTS)}, got {p!r}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={B} H={H} D={D}, reps {args.reps}")
    print(f"{'point':20s} {'who':9s} {'ms':>9s} {'min..max ms':>17s} {'GFLOP/s':>8s} {'ratio':>6s} {'bar':>5s}")
    for name in names:
        for r in run_point(name, args.reps, args.warmup):
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
            bar = f"{r['bar']:.1f}" if r["bar"] is not None else ""
            spread = f"{r['min_ms']:.1f}..{r['max_ms']:.1f}"
            print(
                f"{r['point']:20s} {r['who']:9s} {r['ms']:9.1f} {spread:>17s} {r['gflops']:8.1f} {ratio:>6s} {bar:>5s}"
            )


if __name__ == "__main__":
    main()

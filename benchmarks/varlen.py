"""Packed variable-length documents: ``fastattn.varlen_attention`` against a padded batch and FlexAttention.

    python benchmarks/varlen.py [--device cpu] [--reps 7] [--modes fwd,fwd_bwd] [--markdown r.md]

A batch of documents of mixed lengths (default: 16 documents of 64-2048 tokens, log-uniform with a fixed
seed, 8 heads of 64, causal) is what padding-free training attends. The contenders compute the same thing:

* ``fastattn``: ``varlen_attention`` on the packed ``(total, H, D)`` tokens (``--backend``, default ``cpu``
  on the CPU and ``triton`` on a GPU);
* ``sdpa_padded``: torch SDPA on the batch right-padded to the longest document, ``(B, H, max, D)``. Causal:
  ``is_causal=True`` alone is correct for every real query (its keys all precede the padding) and lets SDPA
  skip causal blocks, so no mask is passed; not causal: a ``(B, 1, 1, max)`` key-padding mask. Its work is
  ``B · max²``; padding rows are computed and discarded;
* ``flex_document``: FlexAttention (compiled) on the packed ``(1, H, total, D)`` tokens with a document mask
  (``doc[q] == doc[kv]``, and ``q >= kv`` when causal). Its block mask is built once outside the timing (a
  training loop builds one per batch: that cost is printed separately, not charged).

One process, the contenders interleaved within every repetition (machine noise hits them alike), median
of ``time.perf_counter`` after warm-up; fwd_bwd is a forward and ``backward`` of a fixed gradient. GFLOP/s
count the attended pairs of the documents alone (forward ``4·pairs·D``, fwd_bwd 3.5x), the same for every
contender. ``ratio`` is the best peer's time over fastattn's (> 1: fastattn is faster). Before timing, every
contender's output on the real tokens is checked against fastattn's. With ``--visited`` (fastattn's CPU
or Triton backend) the key tiles its kernels visited are compared with the per-document minimum.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

import fastattn
from fastattn import testing

HEADS, HEAD_DIM = 8, 64


def document_lengths(count: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """``count`` lengths log-uniform in ``[shortest, longest]``, the longest one included (a fixed draw)."""
    gen = torch.Generator().manual_seed(seed)
    logs = torch.rand(count, generator=gen) * (math.log(longest) - math.log(shortest)) + math.log(shortest)
    lengths = [int(round(math.exp(x))) for x in logs.tolist()]
    lengths[0] = longest
    return lengths


def attended_pairs(lengths: list[int], causal: bool) -> int:
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


class Problem:
    """The packed tensors, their padded and Flex views, and the gradient, for one device and dtype."""

    def __init__(self, lengths: list[int], causal: bool, dtype: torch.dtype, device: str, need_grad: bool) -> None:
        gen = torch.Generator().manual_seed(1)
        self.lengths, self.causal = lengths, causal
        q, k, v, self.cu, _, self.max_len, _ = testing.random_packed(
            lengths, lengths, HEADS, HEADS, HEAD_DIM, dtype=dtype, generator=gen
        )
        self.q, self.k, self.v = (t.to(device).requires_grad_(need_grad) for t in (q, k, v))
        self.cu = self.cu.to(device)
        self.grad = torch.randn(q.shape, generator=gen).to(device, dtype)
        batch = len(lengths)
        # Token t of the packed batch sits at (document, position) in the padded one.
        doc = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths))
        pos = torch.arange(sum(lengths)) - torch.repeat_interleave(self.cu[:-1].cpu().long(), torch.tensor(lengths))
        self.doc, self.pos = doc.to(device), pos.to(device)
        self.keys = (torch.arange(self.max_len) < torch.tensor(lengths).unsqueeze(1)).to(device)  # (B, max)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """``(total, H, D)`` → ``(B, H, max, D)``, zeros in the padding (differentiable)."""
        out = t.new_zeros(len(self.lengths), self.max_len, *t.shape[1:])
        out = out.index_put((self.doc, self.pos), t)
        return out.transpose(1, 2)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, H, max, D)`` → ``(total, H, D)``: the real rows."""
        return t.transpose(1, 2)[self.doc, self.pos]


def contenders(problem: Problem, backend: str) -> tuple[dict[str, Callable], float]:
    """``{name: fn(q, k, v) -> (total, H, D)}`` and the seconds Flex's block mask took to build."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = problem
    causal = p.causal

    def fastattn_call(q, k, v):
        return fastattn.varlen_attention(q, k, v, p.cu, p.cu, p.max_len, p.max_len, is_causal=causal, backend=backend)

    padding = None if causal else p.keys.view(len(p.lengths), 1, 1, p.max_len)

    def sdpa_padded(q, k, v):
        out = F.scaled_dot_product_attention(p.pad(q), p.pad(k), p.pad(v), attn_mask=padding, is_causal=causal)
        return p.unpad(out)

    doc = p.doc

    def document(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return (same & (q_idx >= kv_idx)) if causal else same

    total = p.q.shape[0]
    start = time.perf_counter()
    block_mask = create_block_mask(document, 1, 1, total, total, device=p.q.device.type)
    build_s = time.perf_counter() - start
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)

    def flex_document(q, k, v):
        # (total, H, D) → (1, H, total, D) and back
        out = flex(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=block_mask)
        return out[0].transpose(0, 1)

    return {"fastattn": fastattn_call, "sdpa_padded": sdpa_padded, "flex_document": flex_document}, build_s


def padded_contenders(problem: Problem, backend: str) -> tuple[dict[str, Callable], float]:
    """``--padded-input``: the batch arrives padded, ``(B, H, max, D)``, as a model's projections give it, and
    the answer must leave padded too. ``{name: fn(q, k, v) -> (B, H, max, D)}``, fastattn first."""
    p = problem
    causal = p.causal
    # (B, max) key padding → (B, 1, 1, max): the compact mask transformers' integration passes today
    keys = p.keys.view(len(p.lengths), 1, 1, p.max_len)

    def unpad_varlen(q, k, v):
        out = fastattn.varlen_attention(
            p.unpad(q), p.unpad(k), p.unpad(v), p.cu, p.cu, p.max_len, p.max_len, is_causal=causal, backend=backend
        )
        return p.pad(out)

    def compact_mask(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=keys, is_causal=causal, backend=backend)

    def sdpa_padded(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else keys, is_causal=causal)

    return {"unpad_varlen": unpad_varlen, "compact_mask": compact_mask, "sdpa_padded": sdpa_padded}, 0.0


def _step(fn: Callable, mode: str, p: Problem) -> Callable[[], None]:
    if mode == "fwd":
        return lambda: fn(p.q, p.k, p.v)

    def fwd_bwd():
        fn(p.q, p.k, p.v).backward(p.grad)
        p.q.grad = p.k.grad = p.v.grad = None

    return fwd_bwd


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_point(args, mode: str, dtype: torch.dtype) -> list[dict]:
    lengths = document_lengths(args.docs, args.shortest, args.longest)
    need_grad = mode == "fwd_bwd"
    p = Problem(lengths, args.causal, dtype, args.device, need_grad)
    if args.padded_input:
        # the inputs and the gradient padded, (B, H, max, D), zeros in the padding; the real rows compared
        p.q, p.k, p.v, p.grad = (p.pad(t.detach()).requires_grad_(t.requires_grad) for t in (p.q, p.k, p.v, p.grad))
        fns, build_s = padded_contenders(p, args.backend)
        first, real = "unpad_varlen", p.unpad
    else:
        fns, build_s = contenders(p, args.backend)
        first, real = "fastattn", lambda t: t
    with torch.no_grad():
        expected = real(fns[first](p.q, p.k, p.v)).float()
    steps = {}
    for who, fn in fns.items():
        try:
            if who != first:
                with torch.no_grad():
                    got = real(fn(p.q, p.k, p.v)).float()
                err = float((got - expected).abs().max())
                if err > (2e-3 if dtype == torch.float32 else 5e-2):
                    raise AssertionError(f"differs from fastattn's output by {err:.3g}")
            steps[who] = _step(fn, mode, p)
            for _ in range(args.warmup):
                steps[who]()
            _sync(args.device)
        except Exception as exc:  # a peer that cannot run this point is reported, not fatal
            print(f"  {mode}: {who} left out: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            steps.pop(who, None)
    times: dict[str, list[float]] = {who: [] for who in steps}
    for rep in range(args.reps):
        order = list(steps.items())
        if rep % 2:
            order.reverse()  # alternate who goes first
        for who, run in order:
            _sync(args.device)
            t0 = time.perf_counter()
            run()
            _sync(args.device)
            times[who].append(time.perf_counter() - t0)
    pairs = attended_pairs(lengths, args.causal)
    flops = 4.0 * HEADS * pairs * HEAD_DIM * (3.5 if need_grad else 1.0)
    medians = {who: statistics.median(ts) for who, ts in times.items()}
    peers = {who: m for who, m in medians.items() if who != first}
    rows = []
    for who, ts in times.items():
        med = medians[who]
        rows.append(
            {
                "mode": mode,
                "dtype": str(dtype).removeprefix("torch."),
                "who": who,
                "ms": med * 1e3,
                "min_ms": min(ts) * 1e3,
                "max_ms": max(ts) * 1e3,
                "gflops": flops / med / 1e9,
                "ratio": (min(peers.values()) / med) if who == first and first in medians and peers else None,
                "times": ts,
                "flex_block_mask_ms": build_s * 1e3 if who == "flex_document" else None,
            }
        )
    return rows


def visited_report(args) -> Optional[str]:
    """fastattn's visited key tiles against the per-document minimum (``fastattn.testing.packed_visited``)."""
    lengths = document_lengths(args.docs, args.shortest, args.longest)
    p = Problem(lengths, args.causal, torch.float32, args.device, False)
    counted = testing.packed_visited(args.backend, p.q, p.k, p.v, p.cu, p.cu, p.max_len, p.max_len, args.causal)
    if counted is None:
        return None
    visited, minimum, padded = counted
    return (
        f"key tiles visited by fastattn's `{args.backend}` forward: {visited} (the per-document minimum: {minimum}; "
        f"the padded batch's tiles: {padded})"
    )


def markdown(args, rows: list[dict], lengths: list[int], visited: Optional[str]) -> str:
    cpu = platform.processor() or platform.machine()
    waste = len(lengths) * max(lengths) ** 2 / attended_pairs(lengths, False)
    lines = [
        "# Packed documents: fastattn.varlen_attention vs padded SDPA and FlexAttention's document mask",
        "",
        f"`python benchmarks/varlen.py {' '.join(sys.argv[1:])}`; {args.device}, {cpu}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, python {platform.python_version()}.",
        f"{len(lengths)} documents ({', '.join(map(str, lengths))}; {sum(lengths)} tokens, longest {max(lengths)}), "
        f"{HEADS} heads of {HEAD_DIM}, {'causal' if args.causal else 'not causal'}; median of {args.reps}, "
        f"interleaved. The padded batch holds {waste:.1f}x the documents' pairs.",
        "",
        f"| mode | dtype | contender | median ms | min..max ms | GFLOP/s | ratio (best peer / {rows[0]['who']}) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"**{r['ratio']:.2f}x**" if r["ratio"] is not None else ""
        lines.append(
            f"| {r['mode']} | {r['dtype']} | {r['who']} | {r['ms']:.1f} | {r['min_ms']:.1f}..{r['max_ms']:.1f} | "
            f"{r['gflops']:.1f} | {ratio} |"
        )
    builds = [r["flex_block_mask_ms"] for r in rows if r["flex_block_mask_ms"] is not None]
    if builds:
        lines += ["", f"FlexAttention's block mask took {builds[0]:.1f} ms to build (once, outside the timing)."]
    if visited:
        lines += ["", visited + "."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", help="fastattn backend (default: cpu on the CPU, triton on a GPU)")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--shortest", type=int, default=64)
    parser.add_argument("--longest", type=int, default=2048)
    parser.add_argument("--not-causal", dest="causal", action="store_false")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--visited", action="store_true", help="report fastattn's visited key tiles")
    parser.add_argument(
        "--padded-input",
        action="store_true",
        help="the batch arrives padded (B, H, max, D): unpad + varlen_attention + pad against fastattn's compact "
        "key-padding mask and SDPA (the choice transformers' integration makes for padded batches)",
    )
    parser.add_argument("--markdown", metavar="FILE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.backend = args.backend or ("cpu" if args.device == "cpu" else "triton")
    lengths = document_lengths(args.docs, args.shortest, args.longest)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, documents {lengths}")
    print(f"{'mode':8s} {'dtype':9s} {'who':14s} {'ms':>9s} {'min..max ms':>17s} {'GFLOP/s':>8s} {'ratio':>6s}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for mode in args.modes.split(","):
            for r in run_point(args, mode, dtype):
                rows.append(r)
                ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
                spread = f"{r['min_ms']:.1f}..{r['max_ms']:.1f}"
                print(
                    f"{r['mode']:8s} {r['dtype']:9s} {r['who']:14s} {r['ms']:9.1f} {spread:>17s} "
                    f"{r['gflops']:8.1f} {ratio:>6s}"
                )
    visited = visited_report(args) if args.visited else None
    if visited:
        print(visited)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(args, rows, lengths, visited))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each variant costs on the CPU backend: softcap, ALiBi, sinks and chunk against the same call without it.

    python benchmarks/run.py --variants [--seqlens 2048] [--dtypes float32,bfloat16] [--causal false,true]
                                        [--modes fwd,fwd+bwd] [--reps 7] [--json r.json] [--markdown r.md]
    python benchmarks/cpu_variants.py ...          # the same, on its own

One process. For each (mask, dtype, mode) the base call (fastattn's ``backend="cpu"`` with no variant) and the
same call with each variant are contenders interleaved within every repetition (machine noise hits them alike);
median of ``time.perf_counter`` after warm-up (``--clock thread``: of ``time.thread_time``, the CPU time of the
one thread that computes with ``--threads 1``, which a loaded machine's time slicing does not inflate the way it
does wall time; the overheads are then per core, not of the two-thread wall clock). B = 1, H = 8, D = 64.
``overhead`` is the variant's time over its base's, minus one: for softcap, ALiBi and sinks the base is the same
call without them; for chunk it is ``chunk-split``, the same attention computed without the variant (each chunk
made a batch entry of its own, the reshape outside the timing), because a chunked call attends fewer, shorter
rows than the dense one and so costs more per pair whoever computes it; its saving against the dense call shows
in ``ms``. The bar is 10% (issue #19). GFLOP/s count attended pairs (forward 4·pairs·D per head,
forward+backward 3.5x that).

Before timing, each variant's output is compared with the base's: a variant that changes nothing (not passed
through, say) is an error, not a fast row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import _report  # noqa: E402

import fastattn  # noqa: E402
from fastattn.backends import cpu as _cpu  # noqa: E402
from fastattn.testing import alibi_slopes  # noqa: E402

B, H, D = 1, 8, 64
BAR = 0.10  # a variant may cost at most 10% per attended pair
SOFTCAP = 30.0  # Gemma 2's attention softcap
VARIANTS = ("softcap", "alibi", "sinks", "chunk")


def variant_kwargs(name: str, seqlen: int, gen: torch.Generator) -> dict:
    """The variant's keywords at a realistic setting: chunk is a quarter of the sequence (Llama 4's 8192 of 32k)."""
    if name == "softcap":
        return {"softcap": SOFTCAP}
    if name == "alibi":
        return {"alibi_slopes": alibi_slopes(H)}
    if name == "sinks":
        return {"sinks": torch.randn(H, generator=gen)}
    if name == "chunk":
        return {"chunk": max(1, seqlen // 4)}
    raise ValueError(f"variant: expected one of {VARIANTS}, got {name!r}")


def attended_pairs(seqlen: int, causal: bool, chunk: int = 0) -> int:
    """Query-key pairs that take part, per head (fastattn.variants' rule, top-left aligned)."""
    i = torch.arange(seqlen).unsqueeze(1)
    j = torch.arange(seqlen).unsqueeze(0)
    keep = torch.ones(seqlen, seqlen, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if chunk:
        keep &= (i // chunk) == (j // chunk)
    return int(keep.sum())


def _step(kw: dict, mode: str, q, k, v, grad) -> Callable[[], torch.Tensor]:
    def fwd():
        return fastattn.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)

    if mode == "fwd":
        return fwd

    def fwd_bwd():
        out = fwd()
        out.backward(grad)
        q.grad = k.grad = v.grad = None
        if torch.is_tensor(kw.get("sinks")):
            kw["sinks"].grad = None
        return out

    return fwd_bwd


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def run_group(
    seqlen: int, causal: bool, dtype: torch.dtype, mode: str, variants, reps: int, warmup: int, clock: str = "wall"
) -> list[dict]:
    """One interleaved group: the base call and each variant on the same inputs."""
    now = CLOCKS[clock]
    gen = torch.Generator().manual_seed(0)
    need_grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(B, H, seqlen, D, generator=gen).to(dtype).requires_grad_(need_grad) for _ in range(3))
    grad = torch.randn(B, H, seqlen, D, generator=gen).to(dtype)
    base_kw = {"is_causal": True} if causal else {}
    kws = {"base": base_kw, **{name: {**base_kw, **variant_kwargs(name, seqlen, gen)} for name in variants}}
    if need_grad and "sinks" in kws:  # trained sinks: their gradient is part of the backward
        kws["sinks"]["sinks"].requires_grad_(True)
    steps = {who: _step(kw, mode, q, k, v, grad) for who, kw in kws.items()}
    if "chunk" in kws and seqlen % kws["chunk"]["chunk"] == 0:
        # chunk's own base: the same attention without the variant, each chunk a batch entry of its own (the
        # inputs reshaped outside the timing): what the chunk call computes, with none of its work.
        c = kws["chunk"]["chunk"]

        def split(t):  # (B, H, L, D) -> (B·L/c, H, c, D)
            return t.detach().view(B, H, seqlen // c, c, D).transpose(1, 2).reshape(B * seqlen // c, H, c, D)

        qs, ks, vs = (split(t).requires_grad_(need_grad) for t in (q, k, v))
        kws["chunk-split"] = base_kw
        steps["chunk-split"] = _step(base_kw, mode, qs, ks, vs, split(grad))
    with torch.no_grad():  # the variant must change the result, or its row would time the base call twice
        base_out = _step(base_kw, "fwd", q, k, v, grad)()
        for who in variants:
            if torch.equal(_step(kws[who], "fwd", q, k, v, grad)(), base_out):
                raise RuntimeError(f"variant {who}: the output equals the base call's: it did not take effect")
    for _ in range(warmup):
        for run in steps.values():
            run()
    times: dict[str, list[float]] = {who: [] for who in steps}
    with torch.enable_grad() if need_grad else torch.no_grad():
        for _ in range(reps):
            for who, run in steps.items():  # interleaved: every repetition times every contender
                t0 = now()
                run()
                times[who].append(now() - t0)
    mask = "causal" if causal else "dense"
    medians = {who: statistics.median(ts) for who, ts in times.items()}

    def _base_pairs(base: str) -> int:
        return attended_pairs(seqlen, causal, kws["chunk"]["chunk"] if base == "chunk-split" else 0)

    rows = []
    for who, ts in times.items():
        med = medians[who]
        chunk = kws["chunk"]["chunk"] if who in ("chunk", "chunk-split") else 0
        pairs = attended_pairs(seqlen, causal, chunk)
        flops = 4.0 * B * H * pairs * D * (3.5 if need_grad else 1.0)
        # Each variant against its base: the same call without it (chunk: its split twin, same pairs).
        base = "chunk-split" if who == "chunk" and "chunk-split" in medians else "base"
        overhead = None if who in ("base", "chunk-split") else med / medians[base] * _base_pairs(base) / pairs - 1.0
        rows.append(
            {
                "point": f"{mask}_{str(dtype).removeprefix('torch.')}_{mode}",
                "mask": mask,
                "dtype": str(dtype).removeprefix("torch."),
                "mode": mode,
                "seqlen": seqlen,
                "who": who,
                "kwargs": {
                    key: (val if not torch.is_tensor(val) else f"tensor{tuple(val.shape)}")
                    for key, val in kws[who].items()
                },
                "ms": med * 1e3,
                "min_ms": min(ts) * 1e3,
                "max_ms": max(ts) * 1e3,
                "pairs": pairs,
                "gflops": flops / med / 1e9,
                "overhead": overhead,
                "against": None if overhead is None else base,
                "bar": None if overhead is None else BAR,
            }
        )
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'point':26s} {'who':11s} {'ms':>9s} {'min..max ms':>17s} {'GFLOP/s':>8s} {'overhead':>9s}"]
    for r in rows:
        over = f"{r['overhead']:+.1%}" if r["overhead"] is not None else ""
        spread = f"{r['min_ms']:.1f}..{r['max_ms']:.1f}"
        lines.append(f"{r['point']:26s} {r['who']:11s} {r['ms']:9.1f} {spread:>17s} {r['gflops']:8.1f} {over:>9s}")
    return lines


def summary(rows: list[dict]) -> list[str]:
    over = [r for r in rows if r["overhead"] is not None]
    missed = [f"{r['point']}/{r['who']} {r['overhead']:+.1%}" for r in over if r["overhead"] > BAR]
    if not over:
        return ["no variant rows"]
    worst = max(over, key=lambda r: r["overhead"])
    line = (
        f"worst overhead: {worst['point']}/{worst['who']} {worst['overhead']:+.1%} (bar {BAR:+.0%} per attended pair)"
    )
    return [line, "every variant meets the bar" if not missed else f"above the bar: {', '.join(missed)}"]


def run(
    seqlens=(2048,),
    dtypes=(torch.float32, torch.bfloat16),
    causal=(False, True),
    modes=("fwd", "fwd+bwd"),
    variants=VARIANTS,
    reps: int = 7,
    warmup: int = 2,
    echo: bool = True,
    clock: str = "wall",
) -> list[dict]:
    """Every (seqlen, mask, dtype, mode) group, printed as it finishes when ``echo``."""
    _cpu.load()
    rows = []
    if echo:
        print(table_lines([])[0], flush=True)
    for seqlen in seqlens:
        for is_causal in causal:
            for dtype in dtypes:
                for mode in modes:
                    group = run_group(seqlen, is_causal, dtype, mode, variants, reps, warmup, clock)
                    rows += group
                    if echo:
                        print("\n".join(table_lines(group)[1:]), flush=True)
    return rows


def write(
    rows: list[dict], command: list[str], json_path=None, markdown_path=None, reps: int = 7, clock: str = "wall"
) -> list[str]:
    """The header lines (versions, threads, ISA) and the summary; the JSON and Markdown files when asked."""
    isa = _report.cpu_isa_fields()
    head = [
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {clock}, B={B} H={H} D={D}, reps {reps}, "
        f"softcap {SOFTCAP}, ALiBi slopes 2^(-8(h+1)/H), sinks N(0, 1), chunk L/4",
        _report.isa_line(isa) + f"; {torch.ops.fastattn.cpu_attn_info().rsplit(' ', 1)[-1]}",
    ]
    tail = summary(rows)
    if json_path:
        header = _report.header(torch.device("cpu"), command)
        with open(json_path, "w") as f:
            json.dump({"schema": 1, "header": header, "rows": rows, "summary": tail}, f, indent=1)
            f.write("\n")
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write("\n".join(["```", *head, *table_lines(rows), *tail, "```", ""]))
    return head + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", default="2048")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--causal", default="false,true")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="thread: CPU time, with --threads 1")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        p.error(f"--clock thread: expected --threads 1 (one thread's CPU time is the whole call's), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [x for x in args.variants.split(",") if x]
    bad = [x for x in variants if x not in VARIANTS]
    if bad:
        p.error(f"--variants: expected names from {', '.join(VARIANTS)}, got {bad}")
    rows = run(
        seqlens=[int(x) for x in args.seqlens.split(",")],
        dtypes=[getattr(torch, x) for x in args.dtypes.split(",")],
        causal=[x.strip().lower() in ("true", "1", "yes") for x in args.causal.split(",")],
        modes=args.modes.split(","),
        variants=variants,
        reps=args.reps,
        warmup=args.warmup,
        clock=args.clock,
    )
    command = ["benchmarks/cpu_variants.py", *(sys.argv[1:] if argv is None else argv)]
    print("\n".join(write(rows, command, args.json, args.markdown, args.reps, args.clock)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

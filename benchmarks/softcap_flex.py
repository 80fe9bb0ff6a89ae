"""Gemma-2-shaped softcap attention: fastattn against FlexAttention with a softcap ``score_mod``.

    python benchmarks/softcap_flex.py                        # a GPU: B=2, 16 query heads over 8 key heads,
                                                             # D=256, softcap 50, causal, L = 4096 and 8192,
                                                             # and the sliding window of 4096 at L = 8192
    python benchmarks/softcap_flex.py --json r.json --markdown r.md
    python benchmarks/softcap_flex.py --device cpu --dry-run # the harness on the CPU (tiny points, flex eager)
    python benchmarks/softcap_flex.py --from-json r.json     # the table of a saved run

Every point is Gemma 2's attention: scale ``1/sqrt(D)`` (its ``query_pre_attn_scalar`` is the head dim),
``softcap * tanh(score / softcap)``, causal, and on its local layers a sliding window of ``--window`` keys
(``window=(W - 1, 0)`` in fastattn, ``q_idx - kv_idx < W`` in Flex's ``mask_mod``). A window as long as the
sequence equals causal, so those points are left out. fastattn's backends (``cuda``, ``triton``, named by
``--backends``) get ``softcap=`` and ``window=``; ``flex`` is ``torch.compile``-d ``flex_attention`` with the
cap as a ``score_mod`` (no gradient needed: the cap has no parameter), the window and causality as a block
mask built once per point (outside timing) and ``enable_gqa=True``.

Before any timing each backend's output is checked against the float64 oracle (``fastattn.reference``) on
the last ``--check-rows`` queries of one input set (``q_offset`` places them; the oracle then needs no
``L x L`` buffer), with the house tolerance: at most twice plain PyTorch's error in the same dtype. A
backend that fails its check gets a ``wrong`` row and is not timed; ``--strict`` turns that (or an error)
into exit status 1. Timing and FLOPs follow ``benchmarks/_measure.py`` and ``shared/NOTES.md``: forward
``4·D·pairs`` per (batch, head), counting only attended pairs; fwd+bwd 3.5x that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import _measure  # noqa: E402
import torch  # noqa: E402

import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn.testing import assert_close  # noqa: E402

FASTATTN_BACKENDS = ("cuda", "triton", "cpu", "reference")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--dry-run", action="store_true", help="tiny points and eager Flex: the harness, not speed")
    p.add_argument("--backends", type=_names, help="default: cuda,triton,flex on a GPU; cpu,flex on the CPU")
    p.add_argument("--seqlens", type=_ints, help="default: 4096,8192")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA: heads / kv-heads per group)")
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--softcap", type=float, default=50.0)
    p.add_argument("--window", type=int, default=4096, help="the local layers' sliding window; 0: none")
    p.add_argument("--modes", type=_names, default=["fwd", "fwd+bwd"])
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16; float16 with --dry-run (the Triton interpreter multiplies bf16 bit patterns)",
    )
    p.add_argument("--check-rows", type=int, default=256, help="queries checked against the oracle per point")
    p.add_argument("--max-minutes", type=float, default=3.0, help="points left when it is spent are not run")
    p.add_argument("--json", help="write the rows and the machine's description here")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a backend errs or fails its check")
    p.add_argument("--from-json", metavar="FILE", help="print the table of a saved run (e.g. from a GPU) and exit")
    args = p.parse_args(argv)
    if args.from_json:
        return args
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dry_run:
        args.seqlens = args.seqlens or [64]
        args.batch, args.heads, args.kv_heads, args.head_dim = 1, 4, 2, 32
        args.softcap, args.window = 2.0, min(args.window, 24) if args.window else 0
        args.max_minutes = max(args.max_minutes, 10.0)  # a first use may build the CPU or emulator library
        args.check_rows = min(args.check_rows, 16)
    args.dtype = args.dtype or ("float16" if args.dry_run else "bfloat16")
    args.seqlens = args.seqlens or [4096, 8192]
    if args.backends is None:
        args.backends = ["cuda", "triton", "flex"] if args.device == "cuda" else ["cpu", "flex"]
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    for mode in args.modes:
        if mode not in ("fwd", "fwd+bwd"):
            p.error(f"--modes: expected fwd and/or fwd+bwd, got {mode!r}")
    for name in args.backends:
        if name != "flex" and name not in FASTATTN_BACKENDS:
            p.error(f"--backends: expected flex or one of {FASTATTN_BACKENDS}, got {name!r}")
    return args


def points(args: argparse.Namespace) -> list[dict]:
    """(seqlen, window) points: every length causal, and with the window where it is shorter than the length."""
    out = []
    for seqlen in args.seqlens:
        out.append(dict(seqlen=seqlen, window=0))
        if 0 < args.window < seqlen:
            out.append(dict(seqlen=seqlen, window=args.window))
    return out


def attended_pairs(seqlen: int, window: int) -> int:
    """Pairs of one (batch, head) under causal and an optional window of ``window`` keys (the query's own included)."""
    if window <= 0 or window >= seqlen:
        return seqlen * (seqlen + 1) // 2
    return window * (window + 1) // 2 + (seqlen - window) * window


def make_sets(args, seqlen: int, n_sets: int) -> list[tuple]:
    """``n_sets`` independent ``(q, k, v, grad_out)``; q/k/v require grad. Scores at the cap's scale.

    Standard normal q and k give scaled scores of standard deviation about 1 (``sqrt(D) * scale``); q is drawn
    with standard deviation ``softcap / 2`` instead, so scores spread to half the cap, where ``tanh`` bends
    them and a backend that ignored the cap would fail the oracle check.
    """
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=args.device).manual_seed(0)
    b, hq, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    q_std = args.softcap / 2
    sets = []
    for _ in range(n_sets):

        def draw(*shape, std=1.0):
            return (torch.randn(*shape, generator=gen, device=args.device) * std).to(dtype)

        q = draw(b, hq, seqlen, d, std=q_std).requires_grad_()
        k, v = draw(b, hkv, seqlen, d).requires_grad_(), draw(b, hkv, seqlen, d).requires_grad_()
        sets.append((q, k, v, draw(b, hq, seqlen, d)))
    return sets


def _compiled_flex(compile_it: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compile_it:
        return flex_attention
    import torch._dynamo

    for attr in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 1024)
    return torch.compile(flex_attention, dynamic=False)


def make_call(name: str, args, seqlen: int, window: int):
    """``(fn(q, k, v) -> out, prepared tensors)`` for a backend at a point, or raises with why it cannot run."""
    softcap = args.softcap
    if name != "flex":
        reason = fastattn.backends.get(name).unavailable_reason()
        if reason:
            raise RuntimeError(f"unavailable: {reason}")
        win = (window - 1, 0) if window else None

        def fn(q, k, v):
            return fastattn.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True, softcap=softcap, window=win, backend=name
            )

        return fn, []
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask

    if args.dry_run:  # eager Flex on purpose: the harness, not the speed
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    flex = _compiled_flex(compile_it=not args.dry_run)

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if window:
            ok = ok & (q_idx - kv_idx < window)
        return ok

    block_mask = create_block_mask(mask_mod, None, None, seqlen, seqlen, device=args.device)

    def fn(q, k, v):
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)

    return fn, [t for t in block_mask.as_tuple() if isinstance(t, torch.Tensor)]


def check(fn, args, sets, seqlen: int, window: int) -> float:
    """Checks ``fn``'s last ``--check-rows`` query rows against the float64 oracle; returns the max error."""
    q, k, v, _ = sets[0]
    rows = min(args.check_rows, seqlen)
    with torch.no_grad():
        out = fn(q.detach(), k.detach(), v.detach())[:, :, seqlen - rows :]
        kw = dict(
            is_causal=True,
            enable_gqa=True,
            softcap=args.softcap,
            window=(window - 1, 0) if window else None,
            q_offset=seqlen - rows,
        )
        tail = q.detach()[:, :, seqlen - rows :]
        ref = reference.attention(tail.double(), k.detach().double(), v.detach().double(), **kw)
        # plain PyTorch in the tested dtype: the tolerance's baseline
        base = reference.attention(tail, k.detach(), v.detach(), compute_dtype=q.dtype, **kw)
    assert_close(out, ref, None if q.dtype == torch.float32 else base, factor=2.0, name="output")
    return float((out.double() - ref).abs().max())


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    deadline = time.monotonic() + args.max_minutes * 60
    device = torch.device(args.device)
    timer = _measure.time_cuda if device.type == "cuda" else _measure.time_cpu
    for point in points(args):
        seqlen, window = point["seqlen"], point["window"]
        pairs = attended_pairs(seqlen, window) * args.batch * args.heads
        sets = make_sets(args, seqlen, 2 if device.type == "cuda" else 1)
        for name in args.backends:
            base = dict(backend=name, seqlen=seqlen, window=window or None)
            if time.monotonic() > deadline:
                rows.extend({**base, "mode": m, "status": "not run (--max-minutes spent)"} for m in args.modes)
                continue
            try:
                fn, _prepared = make_call(name, args, seqlen, window)
                err = check(fn, args, sets, seqlen, window)
            except AssertionError as exc:
                rows.extend({**base, "mode": m, "status": "wrong", "error": str(exc)[:400]} for m in args.modes)
                continue
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run a point is a row, not a crash
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                rows.extend({**base, "mode": m, "status": "error", "error": msg} for m in args.modes)
                continue
            for mode in args.modes:
                if name == "flex" and mode != "fwd" and device.type == "cpu":
                    rows.append({**base, "mode": mode, "status": "skipped", "error": "Flex has no CPU backward"})
                    continue
                try:
                    timed, _, keep = _measure.steps(mode, fn, sets)
                    timed(0)  # compilation and autotuning, untimed
                    ms = timer(timed, len(sets))
                    del keep
                except Exception as exc:  # noqa: BLE001
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    rows.append({**base, "mode": mode, "status": "error", "error": msg})
                    continue
                flops = 4.0 * args.head_dim * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
                rows.append(
                    {**base, "mode": mode, "status": "ok", "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "err": err}
                )
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Adds ``vs_flex`` (Flex's time over this backend's, > 1: faster than Flex) to every timed row."""
    flex = {(r["seqlen"], r["window"], r["mode"]): r["ms"] for r in rows if r["backend"] == "flex" and "ms" in r}
    for r in rows:
        key = (r["seqlen"], r["window"], r["mode"])
        if "ms" in r and key in flex:
            r["vs_flex"] = flex[key] / r["ms"]
    return rows


def _ratio(row: dict) -> str:
    return f"{row['vs_flex']:.2f}x" if "vs_flex" in row else "–"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Gemma-2-shaped softcap attention: {meta['shape']} ({meta['device_name']}, torch {meta['torch']}, "
        f"triton {meta['triton']}, {meta['date']})",
        "",
        "| L | window | mode | backend | ms | TFLOP/s | vs Flex | max err | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        timed = "ms" in r
        lines.append(
            f"| {r['seqlen']} | {r['window'] or 'causal'} | {r['mode']} | {r['backend']} | "
            f"{r['ms']:.3f} | {r['tflops']:.3g} | {_ratio(r)} | {r['err']:.2g} | ok |"
            if timed
            else f"| {r['seqlen']} | {r['window'] or 'causal'} | {r['mode']} | {r['backend']} | | | | | "
            f"{r['status']}: {r.get('error', '')} |"
        )
    lines.append("")
    lines.append(f"`{meta['command']}`")
    return "\n".join(lines) + "\n"


def describe(args: argparse.Namespace) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    on_gpu = args.device == "cuda"
    return dict(
        device_name=torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        shape=(
            f"B={args.batch}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype}, "
            f"softcap={args.softcap:g}, window={args.window or 'none'}"
        ),
        dry_run=args.dry_run,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(markdown(saved["rows"], saved["meta"]))
        return 0
    rows = with_ratios(run(args))
    meta = describe(args)
    table = markdown(rows, meta)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    bad = [r for r in rows if r["status"] in ("wrong", "error")]
    return 1 if (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the Triton kernels' spill-free candidate tiles on a GPU and write the tuned table the launchers use.

    python benchmarks/tune.py --max-minutes 3 --out-dir DIR          # on a GPU machine
    python benchmarks/tune.py --dry-run --out-dir /tmp/t              # the same flow on the CPU (interpreter)

Candidates come from ``fastattn compile-check --candidates`` run ahead on the CPU for the GPU's arch and
the installed Triton (``fastattn/backends/triton/tuned/candidates-sm<arch>-triton<ver>.json``): every tile
there compiled without spills and within the arch's shared memory. For each key of ``tuning`` (kernel,
dtype, padded head dim, mask family), most used first (bf16; head dim 128, 64, 256; none, causal, window,
mask), this script

1. compiles every candidate in parallel worker processes, one launch each at the key's shape (Triton's
   disk cache then serves the timing process); the GPU does nothing else while the timing runs;
2. times the static choice and each candidate at every length (median of CUDA-event timings,
   ``triton.testing.do_bench``, L2 flushed between reps), forward alone or backward alone (the
   backward as two stages: the dK/dV tile with the static dQ tile, then the dQ tile with the best dK/dV);
3. keeps the candidate with the best geometric-mean TFLOP/s across lengths if its output matches the
   static choice's (a guard against a tile that computes garbage), and writes the table after every key,
   so a run cut off by its time limit keeps what it measured.

Shapes follow FlashAttention's benchmarks: ``batch · seqlen = 16384`` tokens, ``heads · head_dim = 2048``.
FLOPs as in NOTES.md: forward ``4·B·H·L²·D`` (halved when causal; a window or mask counts only the pairs
it keeps), backward 2.5x the forward.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]

import torch  # noqa: E402

KINDS = ("fwd", "bwd")
DEFAULT_ORDER = [(d, fam) for d in (128, 64, 256) for fam in ("none", "causal", "window", "mask")]
WINDOW = 256
MASK_BLOCK, MASK_DENSITY = 64, 0.1


def _problem(d: int, fam: str, seqlen: int, device: str, tokens: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    """``(q, k, v, grad_out, kwargs)`` of one tuning point, fresh standard-normal inputs (never zeros)."""
    heads, batch = max(1, hidden // d), max(1, tokens // seqlen)
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw():
        return torch.randn(batch, heads, seqlen, d, generator=gen, device=device, dtype=dtype)

    q, k, v, do = draw(), draw(), draw(), draw()
    kw: dict = {}
    if fam == "causal":
        kw["is_causal"] = True
    elif fam == "window":
        kw.update(is_causal=True, window=(WINDOW - 1, 0))
    elif fam == "mask":  # block-sparse boolean mask, as the benchmark's: 10% of 64 x 64 blocks plus the diagonal
        n = -(-seqlen // MASK_BLOCK)
        blocks = torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) < MASK_DENSITY
        blocks |= torch.eye(n, dtype=torch.bool)
        dense = blocks.repeat_interleave(MASK_BLOCK, 0).repeat_interleave(MASK_BLOCK, 1)[:seqlen, :seqlen]
        kw["attn_mask"] = dense.to(device)
    return q, k, v, do, kw


def _flops(kind: str, q, kw: dict) -> float:
    b, h, lq, d = q.shape
    pairs = lq * lq
    if "attn_mask" in kw:
        pairs = int(kw["attn_mask"].sum())
    elif "window" in kw:
        pairs = sum(min(i + 1, WINDOW) for i in range(lq)) if lq <= 65536 else lq * WINDOW
    elif kw.get("is_causal"):
        pairs = lq * (lq + 1) // 2
    fwd = 4.0 * b * h * pairs * d
    return fwd if kind == "fwd" else 2.5 * fwd


def _callable(kind: str, q, k, v, do, kw: dict):
    """A no-argument call of the forward or the backward alone (the backward from a saved forward)."""
    import fastattn
    from fastattn._validate import validate
    from fastattn.backends.triton import bwd

    if kind == "fwd":
        return lambda: fastattn.scaled_dot_product_attention(q, k, v, **kw, backend="triton")
    params, q4, k4, v4 = validate(
        q, k, v, kw.get("attn_mask"), 0.0, kw.get("is_causal", False), None, False, kw.get("window"), 0
    )
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, **kw, backend="triton", return_lse=True)
    return lambda: bwd.attn_bwd(do, q4, k4, v4, out, lse, params, None, False)[:3]


def _static(kind: str, d: int, fam: str, dtype: torch.dtype, arch: Optional[int]):
    """The static tables' choice for this key, in the tuned table's format (tuned tables are off here).

    The forward's static choice autotunes warps and stages among ``fwd_configs``; it is timed as the
    launcher runs it (no override), and recorded as its first config.
    """
    from fastattn.backends.triton import bwd, fwd

    heavy = fam == "mask"
    if kind == "fwd":
        bm, bn = fwd.fwd_tiles(d, d, dtype, arch, heavy)
        w, s = fwd.fwd_configs(bm, d, d, dtype, arch, heavy)[0] if arch else (4, 1)
        return (bm, bn, w, s)
    return bwd.bwd_config(d, d, dtype, arch, heavy, fam)


# Worker processes: compile each candidate with one launch at the key's shape.
_WORKER_CACHE: dict = {}


def _warm(job) -> Optional[str]:
    kind, key, config, d, fam, seqlen, device, tokens, hidden, dtype_name = job
    from fastattn.backends.triton import tuning

    dtype = getattr(torch, dtype_name)
    shape_key = (d, fam, seqlen, dtype_name)
    if shape_key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        _WORKER_CACHE[shape_key] = _problem(d, fam, seqlen, device, tokens, hidden, dtype)
    q, k, v, do, kw = _WORKER_CACHE[shape_key]
    try:
        with tuning.override({key: config}):
            _callable(kind, q, k, v, do, kw)()
            if device == "cuda":
                torch.cuda.synchronize()
    except Exception as exc:  # a candidate that fails to launch is dropped, with its reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def _time(fn, device: str, rep_ms: float) -> float:
    """Median seconds of ``fn``."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(5, rep_ms / 4), rep=rep_ms, return_mode="median") / 1e3
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _close(a, b) -> bool:
    """Two results of the same call with different tiles: equal up to the order of fp32 sums."""
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        x, y = x.float(), y.float()
        scale = max(1.0, float(y.abs().max()))
        if not torch.isfinite(x).all() or float((x - y).abs().max()) > 2e-2 * scale:
            return False
    return True


def _measure(kind: str, key: str, points: dict, config, device: str, rep_ms: float) -> tuple[list[float], object]:
    """TFLOP/s at each point with ``config`` forced for ``key`` (None: the launcher's own choice), and the
    first point's result (to compare tiles by)."""
    from fastattn.backends.triton import tuning

    rates, first = [], None
    with tuning.override({} if config is None else {key: config}):
        for q, k, v, do, kw in points.values():
            fn = _callable(kind, q, k, v, do, kw)
            result = fn()
            if first is None:
                first = result
            rates.append(_flops(kind, q, kw) / _time(fn, device, rep_ms) / 1e12)
    return rates, first


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs and all(x > 0 for x in xs) else 0.0


def _bwd_candidates(static, cands_kv: list, cands_q: list, best_kv=None):
    kv_fixed = tuple(best_kv) if best_kv else tuple(static[0])
    stage1 = [(tuple(c), tuple(static[1])) for c in cands_kv]
    stage2 = [(kv_fixed, tuple(c)) for c in cands_q]
    return stage1, stage2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=None, help="where the table goes (default: fastattn/backends/triton/tuned)")
    p.add_argument("--candidates", help="compile-check --candidates JSON (default: the one for this arch and Triton)")
    p.add_argument("--seqlens", default="4096,16384", help="comma-separated lengths (default 4096,16384)")
    p.add_argument("--head-dims", default="128,64,256", help="in order of priority (default 128,64,256)")
    p.add_argument("--families", default="none,causal,window,mask", help="in order of priority")
    p.add_argument("--kinds", default="fwd,bwd")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float16; the other shares its tiles")
    p.add_argument("--max-minutes", type=float, default=3.0, help="no new key starts after this long")
    p.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="parallel compile workers")
    p.add_argument("--rep-ms", type=float, default=60.0, help="do_bench repetition time per timing (ms)")
    p.add_argument("--max-candidates", type=int, default=0, help="at most this many per stage (0: all)")
    p.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes: exercises the flow only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    os.environ["FASTATTN_TRITON_TUNED"] = "0"  # static choices stay static; candidates come as overrides
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        args.dtype = "float16"  # the interpreter's bf16 dot is wrong (NOTES.md); fp16 exercises the same flow
    import triton

    from fastattn.backends.triton import tuning
    from fastattn.backends.triton._compat import TRITON_VERSION
    from fastattn.backends.triton.fwd import _arch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("tune.py: no CUDA device (use --dry-run to exercise the flow on the CPU)", file=sys.stderr)
        return 2
    arch = _arch(torch.device(device)) if device == "cuda" else 90
    dtype = getattr(torch, args.dtype)
    dtype_short = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    seqlens = [int(x) for x in args.seqlens.split(",")]
    tokens, hidden = (16384, 2048) if not args.dry_run else (128, 64)
    if args.dry_run:
        seqlens = [64]
    version = f"{TRITON_VERSION[0]}.{TRITON_VERSION[1]}"
    cand_path = args.candidates or str(tuning.TABLE_DIR / f"candidates-sm{arch}-triton{version}.json")
    if not os.path.exists(cand_path):
        found = sorted(tuning.TABLE_DIR.glob(f"candidates-sm{arch}-triton*.json"))
        if not (args.dry_run and found):
            print(
                f"tune.py: no candidates for sm_{arch} under Triton {version} ({cand_path}); make them on any "
                f"machine with: fastattn compile-check --arch sm_{arch} --candidates {cand_path}",
                file=sys.stderr,
            )
            return 2
        cand_path = str(found[-1])  # the dry run only exercises the flow: any version's tiles will do
    with open(cand_path) as f:
        candidates = json.load(f)["candidates"]
    out_dir = args.out_dir or str(tuning.TABLE_DIR)
    os.makedirs(out_dir, exist_ok=True)
    table_file = os.path.join(out_dir, tuning.table_path(arch).name)
    table = {
        "arch": arch,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/tune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dtype": dtype_short,
        "seqlens": seqlens,
        "tokens": tokens,
        "hidden": hidden,
        "entries": {},
    }
    if os.path.exists(table_file):  # a later run adds to (and re-measures) an earlier one's entries
        with open(table_file) as f:
            old = json.load(f)
        if old.get("arch") == arch and old.get("triton") == triton.__version__:
            table["entries"].update(old.get("entries", {}))

    def save():
        tmp = table_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, table_file)

    def cands(kernel: str, d: int, heavy: bool) -> list:
        found = candidates.get(f"sm{arch}/{kernel}/bf16/d{d}/{'heavy' if heavy else 'light'}", [])
        return found[: args.max_candidates] if args.max_candidates else found

    order = [
        (kind, d, fam)
        for d in (int(x) for x in args.head_dims.split(","))
        for fam in args.families.split(",")
        for kind in args.kinds.split(",")
    ]
    import multiprocessing as mp

    pool = ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=mp.get_context("spawn"))
    deadline = start + args.max_minutes * 60
    print(f"tune.py: {len(order)} keys, candidates from {cand_path}, table {table_file}", flush=True)
    for kind, d, fam in order:
        if time.perf_counter() > deadline:
            print(f"tune.py: time budget spent; {kind}/d{d}/{fam} and later keys not tuned", flush=True)
            break
        t_key = time.perf_counter()
        key = tuning.entry_key(kind, dtype_short, d, fam)
        heavy = fam == "mask"
        static = _static(kind, d, fam, dtype, arch if device == "cuda" else None)
        if static is None:
            print(f"tune.py: {key}: no static config (skipped)", flush=True)
            continue
        if kind == "fwd":
            stages = [[tuple(c) for c in cands("fwd", d, heavy)]]
        else:
            stages = list(_bwd_candidates(static, cands("dkdv", d, heavy), cands("dq", d, heavy)))
        jobs = [
            (kind, key, cfg, d, fam, seqlens[0], device, tokens, hidden, str(dtype).split(".")[-1])
            for stage in stages
            for cfg in stage
        ]
        failures = dict(zip([j[2] for j in jobs], pool.map(_warm, jobs)))
        points = {L: _problem(d, fam, L, device, tokens, hidden, dtype, seed=1) for L in seqlens}

        static_rates, reference = _measure(kind, key, points, None, device, args.rep_ms)
        best, best_rates = static, static_rates
        rejected = []
        for i, stage in enumerate(stages):
            if kind == "bwd" and i == 1:  # stage 2: dQ tiles with the best dK/dV tile of stage 1
                stage = [(tuple(best[0]), c[1]) for c in stage]
            for cfg in stage:
                if failures.get(cfg) is not None and (kind == "fwd" or i == 0):
                    rejected.append(f"{cfg}: {failures[cfg]}")
                    continue
                try:
                    rates, result = _measure(kind, key, points, cfg, device, args.rep_ms)
                except Exception as exc:
                    rejected.append(f"{cfg}: {type(exc).__name__}")
                    continue
                if not _close(result, reference):
                    rejected.append(f"{cfg}: result differs from the static tile's")
                    continue
                if _geomean(rates) > _geomean(best_rates):
                    best, best_rates = cfg, rates
        table["entries"][key] = {
            "config": [list(c) for c in best] if kind == "bwd" else list(best),
            "tflops": {str(L): round(r, 1) for L, r in zip(seqlens, best_rates)},
            "static_config": [list(c) for c in static] if kind == "bwd" else list(static),
            "static_tflops": {str(L): round(r, 1) for L, r in zip(seqlens, static_rates)},
            "candidates": sum(len(s) for s in stages),
            "rejected": rejected[:20],
        }
        save()
        gain = _geomean(best_rates) / max(_geomean(static_rates), 1e-9)
        print(
            f"tune.py: {key:24s} static {static} {_geomean(static_rates):7.1f} -> best {best} "
            f"{_geomean(best_rates):7.1f} TFLOP/s ({gain:.2f}x, {sum(len(s) for s in stages)} candidates, "
            f"{len(rejected)} rejected, {time.perf_counter() - t_key:.0f} s)",
            flush=True,
        )
    pool.shutdown(cancel_futures=True)
    print(f"tune.py: wrote {table_file} ({len(table['entries'])} entries) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""fastattn's benchmark suite: throughput and peak memory across sequence lengths, against torch.

    python benchmarks/run.py                       # every available backend, default points
    python benchmarks/run.py --quick               # a handful of points, under a minute
    python benchmarks/run.py --backends cpu,sdpa,flex --masks window --causal true --seqlens 8192
    python benchmarks/run.py --json r.json --markdown r.md --plot r.png
    python benchmarks/run.py --device cpu --variants  # softcap, ALiBi, sinks, chunk vs none (cpu_variants.py)

Backends: fastattn's registered ones by name (``fastattn.backends.names()``), ``sdpa`` (torch's
own choice), ``flash``/``efficient``/``cudnn``/``math`` (SDPA with that kernel forced through
``torch.nn.attention.sdpa_kernel``) and ``flex`` (compiled FlexAttention; its block mask is built
once per point, outside timing). Points, masks and FLOPs: see ``_points.py``; timing and memory:
see ``_measure.py``. Every (point, backend, mode) gives one row; a backend that cannot run a point
gives a ``skipped`` row with its reason, an out-of-memory one an ``oom`` row, and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Optional

# The helper modules beside this file, and the repository (so an uninstalled checkout runs too).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import _measure  # noqa: E402
import _points  # noqa: E402
import _report  # noqa: E402
import _runners  # noqa: E402
import torch  # noqa: E402

DEFAULTS = {
    # FlashAttention's convention on a GPU: B·L = 16k tokens, hidden 2048 (heads = 2048 / D).
    "cuda": dict(
        seqlens=[512, 1024, 2048, 4096, 8192, 16384],
        head_dims=[64, 128],
        dtypes=["bfloat16"],
        modes=["fwd", "bwd", "fwd+bwd"],
        tokens=16384,
        hidden=2048,
    ),
    # Sized for 2 cores in under 10 minutes: B·L = 4k tokens, 8 heads of 64.
    "cpu": dict(
        seqlens=[128, 256, 512, 1024, 2048],
        head_dims=[64],
        dtypes=["float32"],
        modes=["fwd", "fwd+bwd"],
        tokens=4096,
        hidden=512,
    ),
}
QUICK = {
    "cuda": dict(seqlens=[1024, 4096], head_dims=[128], modes=["fwd", "bwd"], tokens=16384),
    "cpu": dict(seqlens=[128, 512], head_dims=[64], modes=["fwd", "fwd+bwd"], tokens=1024),
}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--backends", type=_names, help="comma-separated; default: every available one")
    p.add_argument("--exclude-backends", type=_names, default=[], help="left out of the default set")
    p.add_argument("--seqlens", type=_ints, help="default: 512..16384 on a GPU, 128..2048 on the CPU")
    p.add_argument("--seqlen-k", type=int, help="key length of every point (default: the query's)")
    p.add_argument("--head-dims", type=_ints, help="default: 64,128 on a GPU, 64 on the CPU")
    p.add_argument("--dtypes", type=_names, help="float16, bfloat16, float32 (default: bfloat16 GPU, float32 CPU)")
    p.add_argument("--causal", type=_names, default=["false", "true"], help="causal values (default: false,true)")
    p.add_argument("--masks", type=_names, default=["none"], help=f"from {list(_points.MASKS)} and 'causal'")
    p.add_argument("--window", type=int, default=256, help="sliding-window size in keys (default 256)")
    p.add_argument("--block", type=int, default=64, help="tile of the block-sparse boolean mask (default 64)")
    p.add_argument("--density", type=float, default=0.1, help="kept tiles of the boolean mask (default 0.1)")
    p.add_argument("--modes", type=_names, help="from fwd, bwd, fwd+bwd (default: all on a GPU, fwd,fwd+bwd on CPU)")
    p.add_argument("--batch", type=int, help="fixed batch (default: tokens // seqlen)")
    p.add_argument("--heads", type=int, help="fixed heads (default: hidden // head_dim)")
    p.add_argument("--tokens", type=int, help="token budget B·L per point (default 16384 GPU, 4096 CPU)")
    p.add_argument("--hidden", type=int, help="heads x head_dim when --heads is not given (default 2048 GPU, 512 CPU)")
    p.add_argument("--quick", action="store_true", help="a handful of points (under a minute)")
    p.add_argument("--max-minutes", type=float, help="stop starting new points after this long (rest: skipped)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("--from-json", metavar="FILE", help="no run: redraw --markdown/--plot from a saved --json")
    p.add_argument("--save-results", metavar="DIR", help="write DIR/<hardware>-<date>.{json,md,png}")
    p.add_argument("--rep-seconds", type=float, help="CPU: time spent on timed reps per row (0.25; --quick 0.05)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--strict", action="store_true", help="exit 1 when any point ends in 'error'")
    p.add_argument(
        "--context-parallel",
        type=int,
        metavar="N",
        help="ring attention on N local processes vs one: time and per-rank peak memory (context_parallel.py)",
    )
    p.add_argument(
        "--variants",
        action="store_true",
        help="CPU: softcap, ALiBi, sinks and chunk against the same call without them, interleaved "
        "(cpu_variants.py; default --seqlens 2048, --dtypes float32,bfloat16)",
    )
    p.add_argument(
        "--varlen",
        action="store_true",
        help="packed documents of mixed lengths: varlen_attention vs padded SDPA and FlexAttention (varlen.py)",
    )
    args = p.parse_args(argv)
    args.given = {key for key in ("seqlens", "dtypes", "modes") if getattr(args, key) is not None}
    if args.context_parallel is not None and args.context_parallel < 2:
        p.error(f"--context-parallel: expected at least 2 processes, got {args.context_parallel}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: expected a visible CUDA device, found none")
    args.device = torch.device(device)
    if args.rep_seconds is None:
        args.rep_seconds = 0.05 if args.quick else 0.25
    base = dict(DEFAULTS[device])
    if args.quick:
        base.update(QUICK[device])
    for key in ("seqlens", "head_dims", "dtypes", "modes", "tokens", "hidden"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    try:
        args.dtypes = [_points.parse_dtype(d) for d in args.dtypes]
        causal = [_points.parse_bool(c) for c in args.causal]
        args.mask_kinds = _points.mask_kinds(args.masks, causal)
    except ValueError as exc:
        p.error(str(exc))
    bad = [m for m in args.modes if m not in _points.MODES]
    if bad:
        p.error(f"--modes: expected names from {list(_points.MODES)}, got {bad}")
    if any(s < 1 for s in args.seqlens) or any(d < 1 for d in args.head_dims):
        p.error(f"--seqlens/--head-dims: expected positive integers, got {args.seqlens} / {args.head_dims}")
    return args


class Progress:
    """A plain-text progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 24) -> None:
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        frac = self.done / max(1, self.total)
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        elapsed = time.perf_counter() - self.t0
        text = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s  {label}"
        if self.tty:
            self.stream.write("\r" + text[:150].ljust(150))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _row(shape: _points.Shape, backend: str, mode: str) -> dict:
    return {
        "backend": backend,
        "mode": mode,
        "dtype": shape.dtype,
        "batch": shape.batch,
        "heads": shape.heads,
        "seqlen": shape.seqlen,
        "seqlen_k": shape.seqlen_k,
        "head_dim": shape.head_dim,
        "causal": shape.causal,
        "mask": shape.mask,
        "window": _points.window_pair(shape) if shape.mask == "window" else None,
        "ms": None,
        "tflops": None,
        "peak_mem_mb": None,
        "flops": None,
        "status": "ok",
        "reason": None,
    }


def _first_line(exc: BaseException, warns: list[str]) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    useful = [w.strip().splitlines()[0] for w in warns if w.strip()]
    if useful:
        text += " (" + "; ".join(dict.fromkeys(useful))[:400] + ")"
    return text[:600]


def _classify(row: dict, exc: BaseException, warns: list[str]) -> None:
    if _measure.is_oom(exc):
        row["status"], row["reason"] = "oom", _first_line(exc, [])
    elif isinstance(exc, NotImplementedError) or "No available kernel" in str(exc):
        row["status"], row["reason"] = "skipped", _first_line(exc, warns)
    else:
        row["status"], row["reason"] = "error", _first_line(exc, warns)


def _first_call(timed, device: torch.device) -> None:
    timed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device, collect: bool = True) -> None:
    if collect:
        gc.collect()  # about 0.5 s with torch loaded: only where memory may be held by cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(args, runner, shape, mode, fn, extra, sets, maskin, pairs, row) -> None:
    """Fills ``row`` for one (shape, backend, mode): trial run, peak memory, median time."""
    device = args.device
    reason = runner.unsupported_reason(shape, mode, maskin, *sets[0][:3])
    if reason:
        row["status"], row["reason"] = "skipped", reason
        return
    timed, mem_step, _keep = _measure.steps(mode, fn, sets)
    # The first call compiles or autotunes where a backend does; failures carry torch's message.
    _, exc, warns = _runners.quiet_trial(_first_call, timed, device)
    if exc is not None:
        _classify(row, exc, warns)
        return
    try:
        if not args.no_memory:
            live = _measure.tensor_bytes([t for s in sets[:1] for t in s] + _mask_tensors(maskin) + list(extra))
            if device.type == "cuda":
                extra_peak = _measure.peak_extra_cuda(mem_step)
            else:
                extra_peak = _measure.peak_extra_cpu(mem_step)
            row["peak_mem_mb"] = _sig((live + extra_peak) / 2**20, 5)
        if device.type == "cuda":
            ms = _measure.time_cuda(timed, len(sets), **_cuda_timing(args))
        else:
            ms = _measure.time_cpu(timed, len(sets), target_s=args.rep_seconds)
    except Exception as exc:  # an OOM in the timing loop is recorded, the run goes on
        _classify(row, exc, [])
        return
    row["flops"] = _points.flops(shape, mode, pairs)
    row["ms"] = _sig(ms)
    row["tflops"] = _sig(row["flops"] / (ms * 1e-3) / 1e12)


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def _cuda_timing(args) -> dict:
    return dict(warmup_ms=10.0, rep_ms=40.0) if args.quick else {}


def _mask_tensors(maskin: _points.MaskInputs) -> list:
    return [t for t in (maskin.tensor, maskin.valid_len, maskin.dense2d) if t is not None]


def shapes_for(args) -> list[_points.Shape]:
    """The shapes the parsed command line asks for (also what the pytest-benchmark cases use)."""
    return _points.grid(
        dtypes=args.dtypes,
        seqlens=args.seqlens,
        head_dims=args.head_dims,
        masks=args.mask_kinds,
        tokens=args.tokens,
        batch=args.batch,
        heads=args.heads,
        hidden=args.hidden,
        seqlen_k=args.seqlen_k,
        window=args.window,
        block=args.block,
        density=args.density,
    )


def backend_names(args) -> list[str]:
    runners = _runners.all_runners()
    names = args.backends or _runners.default_names(runners, args.device, args.quick)
    names = [n for n in names if n not in args.exclude_backends]
    unknown = [n for n in names + args.exclude_backends if n not in runners]
    if unknown:
        raise SystemExit(f"--backends: expected names from {list(runners)}, got unknown {unknown}")
    return names


def run(args) -> tuple[dict, list[dict]]:
    """Runs every (shape, backend, mode) and returns ``(header, rows)``."""
    device = args.device
    runners = _runners.all_runners()
    names = backend_names(args)
    shapes = shapes_for(args)
    unavailable = {n: runners[n].unavailable_reason(device) for n in names}
    head = _report.header(device, [os.path.relpath(sys.argv[0])] + list(getattr(args, "argv", None) or []))
    if not args.backends:
        others = [n for n in runners if n not in names and n not in args.exclude_backends]
        head["not_in_default_set"] = {n: _runners.left_out(runners, n, device, args.quick) for n in others}
    rows: list[dict] = []
    progress = Progress(len(shapes) * len(names) * len(args.modes))
    deadline = None if args.max_minutes is None else time.perf_counter() + 60 * args.max_minutes
    for shape in shapes:
        sets = maskin = None
        prep_error = None
        try:
            maskin = _points.build_mask(shape, device)
            pairs = None if shape.mask == "none" else _points.attended_pairs(shape, maskin)
            sets = _measure.make_inputs(shape, device, _measure.rotation_count(shape, device))
        except Exception as exc:
            prep_error = exc
        for name in names:
            runner = runners[name]
            fn = extra = None
            call_error = None
            for mode in args.modes:
                row = _row(shape, name, mode)
                rows.append(row)
                progress.step(f"{name} {mode} {shape.label()}")
                if unavailable[name]:
                    row["status"], row["reason"] = "skipped", unavailable[name]
                    continue
                if deadline is not None and time.perf_counter() > deadline:
                    row["status"], row["reason"] = "skipped", f"time budget (--max-minutes {args.max_minutes}) spent"
                    continue
                if prep_error is not None:
                    _classify(row, prep_error, [])
                    continue
                if fn is None and call_error is None:
                    # Mask preparation (SDPA's dense mask, Flex's block mask) once per shape and backend.
                    made, exc, warns = _runners.quiet_trial(runner.make_call, shape, maskin, device)
                    call_error = (exc, warns) if exc is not None else None
                    if exc is None:
                        fn, extra = made
                if call_error is not None:
                    _classify(row, *call_error)
                    continue
                try:
                    measure(args, runner, shape, mode, fn, extra, sets, maskin, pairs, row)
                except Exception as exc:
                    _classify(row, exc, [])
                if row["status"] == "oom":
                    _free(device)
            fn = extra = None
        sets = maskin = None
        _free(device, collect=device.type == "cuda")
    progress.close()
    return head, rows


def _result_stem(head: dict) -> str:
    name = head["gpu"] or head["cpu"]
    safe = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    while "--" in safe:
        safe = safe.replace("--", "-")
    return f"{safe}-{head['date'][:10]}"


def _run_context_parallel(args: argparse.Namespace) -> int:
    """The same sequence lengths across N processes (``benchmarks/context_parallel.py``)."""
    import context_parallel

    causal = [_points.parse_bool(c) for c in args.causal]
    rows = []
    for is_causal in causal:
        rows += context_parallel.run(
            args.context_parallel,
            args.seqlens,
            heads=args.heads or 8,
            head_dim=args.head_dims[0],
            causal=is_causal,
            dtype=str(args.dtypes[0]).removeprefix("torch."),
            backend=args.backends[0] if args.backends else None,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["benchmarks/run.py", *args.argv]), "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _run_variants(args: argparse.Namespace) -> int:
    """Each variant's cost on the CPU backend, interleaved with the same call without it (``cpu_variants.py``)."""
    import cpu_variants

    if args.device.type != "cpu":
        raise SystemExit("--variants: measures the CPU backend; run it with --device cpu")
    bad = [m for m in args.modes if m not in ("fwd", "fwd+bwd")] if "modes" in args.given else []
    if bad:
        raise SystemExit(f"--variants: --modes expected fwd and/or fwd+bwd, got {bad}")
    rows = cpu_variants.run(
        seqlens=args.seqlens if "seqlens" in args.given else [2048],
        dtypes=[getattr(torch, d) for d in args.dtypes] if "dtypes" in args.given else [torch.float32, torch.bfloat16],
        causal=[_points.parse_bool(c) for c in args.causal],
        modes=args.modes if "modes" in args.given else ["fwd", "fwd+bwd"],
        reps=2 if args.quick else 7,
        warmup=1 if args.quick else 2,
    )
    command = ["benchmarks/run.py", *args.argv]
    reps = 2 if args.quick else 7
    print("\n".join(cpu_variants.write(rows, command, args.json, args.markdown, reps)))
    return 0


def _run_varlen(args: argparse.Namespace) -> int:
    """Packed documents (``benchmarks/varlen.py``) with this run's device, dtypes, backend and output file."""
    import varlen

    argv = ["--device", args.device.type, "--dtypes", ",".join(str(d).removeprefix("torch.") for d in args.dtypes)]
    argv += ["--modes", ",".join("fwd_bwd" if m == "fwd+bwd" else m for m in args.modes if m != "bwd")]
    if args.backends:
        argv += ["--backend", args.backends[0]]
    if args.quick:
        argv += ["--docs", "6", "--longest", "512", "--reps", "3"]
    if args.markdown:
        argv += ["--markdown", args.markdown]
    if [_points.parse_bool(c) for c in args.causal] == [False]:
        argv.append("--not-causal")
    return varlen.main(argv)


def main(argv: Optional[list[str]] = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    args.argv = raw
    if args.context_parallel:
        return _run_context_parallel(args)
    if args.variants:
        return _run_variants(args)
    if args.varlen:
        return _run_varlen(args)
    t0 = time.perf_counter()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        head, rows = saved["header"], saved["rows"]
    else:
        head, rows = run(args)
        head["wall_s"] = round(time.perf_counter() - t0, 1)
    json_path, md_path, png_path = args.json, args.markdown, args.plot
    if args.save_results:
        os.makedirs(args.save_results, exist_ok=True)
        stem = os.path.join(args.save_results, _result_stem(head))
        json_path, md_path, png_path = json_path or stem + ".json", md_path or stem + ".md", png_path or stem + ".png"
    text = _report.markdown(head, rows)
    print(text)
    if json_path:
        _report.write_json(json_path, head, rows)
        print(f"wrote {json_path}")
    if md_path:
        with open(md_path, "w") as f:
            f.write(text + "\n")
        if png_path:
            with open(md_path, "a") as f:
                f.write(f"\n![TFLOP/s against sequence length]({os.path.basename(png_path)})\n")
        print(f"wrote {md_path}")
    if png_path:
        why = _report.plot(png_path, head, rows)
        print(why or f"wrote {png_path}")
    counts = {s: sum(r["status"] == s for r in rows) for s in _report.STATUSES}
    print(f"{len(rows)} rows: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {head.get('wall_s')} s")
    return 1 if args.strict and counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoding over a key/value cache as bandwidth: ``kvcache_attention`` vs torch SDPA, vs the machine's read bandwidth.

A decode step reads the cache once, so its figure of merit is bytes of K and V read per call over the time,
compared with the read bandwidth of the same machine measured in the same run (``torch.sum`` over a buffer far
larger than the last-level cache, best of several; on a GPU also a device-to-device copy, counting bytes read and
written, and the better of the two). Contenders, timed interleaved (one call of each per round, each round
starting with the next contender, median over rounds, so that a busy machine slows all alike; SDPA's in rounds
of their own after fastattn's and the read's, which its temporaries would disturb):

* ``<backend> contiguous``: ``kvcache_attention`` on a ``(B, Hkv, L, D)`` cache (no append), for each of
  ``--backends`` (default ``cpu`` on the CPU, ``triton,cuda`` on a GPU);
* ``<backend> paged``: the same keys in pages of ``--page-size`` under a shuffled block table;
* on a GPU, ``<backend> unchecked``: the contiguous call with ``check_values=False``, which skips reading
  ``cache_seqlens`` on the host and so never waits for the stream (what a CUDA graph replays);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)`` on the
  contiguous cache (the call a user would write without fastattn), and on a GPU each of SDPA's kernels forced
  (``sdpa flash``, ``sdpa efficient``, ``sdpa cudnn``; one that refuses the call is left out and named).

The calls rotate over enough independent caches to exceed the last-level cache (64 MiB; 128 MiB on a GPU,
whose L2 is 50-60 MB), each call on the CPU taking the set after the previous call's, whichever contender made
it, so that no call finds its cache left in the LLC by the one before. On a GPU a contender's time is that of a
burst of calls over the rotating caches between two CUDA events, over the burst's length (at least about 2 ms),
so that the host's launch work overlaps the kernels as in a decoding loop. Usage::

    python benchmarks/decode.py                      # the covering set of points, CPU, markdown to stdout
    python benchmarks/decode.py --out benchmarks/results/decode-cpu-<machine>-<date>.md
    python benchmarks/decode.py --device cuda        # GPU (when one is available)
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastattn  # noqa: E402
from fastattn.backends.registry import UnsupportedError  # noqa: E402

# (batch, cache length, dtype): B = 1-8, 4k-32k tokens, bf16 and fp32, a covering set rather than the product.
POINTS = [
    (1, 4096, "bf16"),
    (1, 32768, "bf16"),
    (4, 16384, "bf16"),
    (8, 4096, "bf16"),
    (8, 32768, "bf16"),
    (1, 4096, "fp32"),
    (1, 32768, "fp32"),
    (4, 16384, "fp32"),
    (8, 16384, "fp32"),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, args: list, device: str) -> float:
    """Seconds per call of ``fn(a)`` for each ``a`` in ``args``: one call timed by the host clock on the CPU; on a
    GPU, all of them back to back between two CUDA events, so that the host's launch work hides behind the
    kernels as in a decoding loop (a call that waits for the stream still pays for it)."""
    if device != "cuda":
        t = time.perf_counter()
        for a in args:
            fn(a)
        return (time.perf_counter() - t) / len(args)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for a in args:
        fn(a)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / len(args)


def read_bandwidth(device: str, mib: int = 1024, reps: int = 7) -> float:
    """Bytes per second of ``torch.sum`` over a ``mib`` MiB float32 buffer (best of ``reps``); on a GPU the better
    of that and a device-to-device copy counting the bytes read and written."""
    x = torch.rand(mib * 2**20 // 4, device=device)
    best = min(timed(lambda t: t.sum(), [x], device) for _ in range(reps))
    rate = x.numel() * 4 / best
    if device == "cuda":
        y = torch.empty_like(x)
        best = min(timed(lambda t: y.copy_(t), [x], device) for _ in range(reps))
        rate = max(rate, 2 * x.numel() * 4 / best)
    return rate


def make_point(batch: int, length: int, dtype: torch.dtype, args, device: str, n_sets: int):
    """``n_sets`` rotating sets of (query, contiguous caches, paged caches, block table)."""
    g = torch.Generator(device=device).manual_seed(0)  # on the device: a GPU fills gigabytes in milliseconds
    g_table = torch.Generator().manual_seed(0)
    hq, hkv, d, ps = args.heads_kv * args.group, args.heads_kv, args.head_dim, args.page_size
    per_seq = -(-length // ps)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(batch, hq, 1, d, generator=g, device=device).to(dtype)
        kc = torch.randn(batch, hkv, length, d, generator=g, device=device).to(dtype)
        vc = torch.randn(batch, hkv, length, d, generator=g, device=device).to(dtype)
        num_pages = batch * per_seq
        table = torch.randperm(num_pages, generator=g_table).view(batch, per_seq).to(device, torch.int32)
        kp = torch.empty(num_pages, hkv, ps, d, device=device, dtype=dtype)
        vp = torch.empty_like(kp)
        pad = per_seq * ps - length
        for b in range(batch):
            # (Hkv, L, D) → (Hkv, per_seq, ps, D) → (per_seq, Hkv, ps, D), into sequence b's pages
            for src, dst in ((kc, kp), (vc, vp)):
                paged = torch.nn.functional.pad(src[b], (0, 0, 0, pad)).view(hkv, per_seq, ps, d).transpose(0, 1)
                dst[table[b].long()] = paged
        sets.append((q, kc, vc, kp, vp, table))
    seqlens = torch.full((batch,), length, dtype=torch.int32, device=device)
    return sets, seqlens


def contenders(args, seqlens, device: str) -> dict:
    """Every contender's call on one set, by name."""
    fns = {}
    for backend in args.backends:

        def contiguous(s, backend=backend, check=True):
            q, kc, vc, _, _, _ = s
            return fastattn.kvcache_attention(q, kc, vc, seqlens, enable_gqa=True, backend=backend, check_values=check)

        def paged(s, backend=backend):
            q, _, _, kp, vp, table = s
            return fastattn.kvcache_attention(q, kp, vp, seqlens, block_table=table, enable_gqa=True, backend=backend)

        fns[f"{backend} contiguous"] = contiguous
        fns[f"{backend} paged"] = paged
        if device == "cuda":
            fns[f"{backend} unchecked"] = lambda s, f=contiguous: f(s, check=False)

    def sdpa(s, kernel=None):
        q, kc, vc, _, _, _ = s
        if kernel is None:
            return torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
        with torch.nn.attention.sdpa_kernel(kernel):
            return torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

    fns["sdpa"] = sdpa
    for name in args.sdpa_kernels:
        kernel = getattr(torch.nn.attention.SDPBackend, SDPA_KERNELS[name])
        fns[f"sdpa {name}"] = lambda s, k=kernel: sdpa(s, k)
    return fns


SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def run_point(batch: int, length: int, dtype_name: str, args, device: str, bandwidth: float) -> dict:
    dtype = DTYPES[dtype_name]
    elt = torch.empty((), dtype=dtype).element_size()
    kv_bytes = 2 * batch * args.heads_kv * length * args.head_dim * elt
    llc, most = (128 * 2**20, 8) if device == "cuda" else (64 * 2**20, 4)
    n_sets = max(1, min(most, math.ceil(llc / kv_bytes)))
    sets, seqlens = make_point(batch, length, dtype, args, device, n_sets)
    fns = contenders(args, seqlens, device)
    # The read bandwidth of this point's bytes, timed in the same rounds: torch.sum over as many fp32 bytes as K+V.
    buffers = [torch.rand(kv_bytes // 4, device=device) for _ in range(n_sets)]
    ref = fns["sdpa"](sets[0]).float()
    refused = {}
    for name, fn in list(fns.items()):  # every contender computes the same thing, or is left out saying why not
        try:
            err = (fn(sets[0]).float() - ref).abs().max().item()
        except RuntimeError as e:  # an SDPA kernel that refuses, or a backend without this dtype (cuda: fp32)
            if not (name.startswith("sdpa ") or isinstance(e, UnsupportedError)):
                raise
            refused[name] = str(e).strip().splitlines()[0][:160]
            del fns[name]
            continue
        assert err < (2e-2 if dtype != torch.float32 else 1e-3), f"{name}: max error {err} against sdpa"
    fns["read"] = lambda i: buffers[i].sum()
    indices = list(range(n_sets))
    per_call = {name: indices if name == "read" else sets for name in fns}
    reps = {name: 1 for name in fns}
    with torch.inference_mode():
        for name, fn in list(fns.items()):  # warm-up, and on a GPU each burst's length: about 2 ms, whole rotations
            t = timed(fn, per_call[name], device)
            if device == "cuda":
                reps[name] = max(1, min(64, math.ceil(2e-3 / max(t, 1e-7) / n_sets)))
        if device == "cuda":
            graphs(fns, per_call, reps, n_sets, refused)
        times = {name: [] for name in fns}
        # fastattn's contenders and the read first, SDPA's in rounds of their own: on the CPU SDPA's calls allocate
        # and free gigabytes of temporaries, and the calls after them measured up to 25% slower (B = 1, 4096 keys)
        fastattn_and_read = [name for name in fns if not name.startswith("sdpa")]
        for names in (fastattn_and_read, [name for name in fns if name.startswith("sdpa")]):
            for r in range(args.rounds):
                # each round starts with the next contender: a call measured up to 3% faster late in a round than
                # first (the same kernel timed four times in a row), which a fixed order would credit to the last
                for i, name in enumerate(names[r % len(names) :] + names[: r % len(names)]):
                    if device == "cuda":
                        args_ = per_call[name] * reps[name]
                    else:  # each call the next set: the one before it read other caches, not this one into the LLC
                        args_ = [per_call[name][(r * len(names) + i) % n_sets]]
                    times[name].append(timed(fns[name], args_, device) / (n_sets if name.endswith(" graph") else 1))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    row = {"batch": batch, "length": length, "dtype": dtype_name, "kv_mib": kv_bytes / 2**20, "refused": refused}
    for name, t in med.items():
        row[name] = (t, kv_bytes / t)
    row["backend"], contiguous, paged, read, sdpas, row["timing"] = main_names(med, args.backends)
    row["contiguous"], row["paged"] = row[contiguous], row[paged]
    row["best sdpa"] = min(sdpas, key=lambda name: med[name])
    row["of_bw"] = kv_bytes / med[contiguous] / bandwidth
    row["of_read"] = med[read] / med[contiguous]
    row["vs_sdpa"] = med[row["best sdpa"]] / med[contiguous]
    row["paged_vs_contig"] = med[paged] / med[contiguous]
    return row


def main_names(med: dict, backends: list[str]) -> tuple[str, str, str, str, list[str], str]:
    """The main table's contenders among ``med``'s: ``(backend, contiguous, paged, read, SDPA's, timing)``: the
    first of ``backends`` whose contiguous and paged calls both ran at this point (one may refuse a dtype), by their
    graph replays when both were captured (the kernels' own bandwidth, as a decoding loop replaying a graph gets
    it) against SDPA's replays and the read's, else by its eager calls against SDPA's eager calls."""
    for tag in (" graph", ""):
        for backend in backends:
            if f"{backend} contiguous{tag}" in med and f"{backend} paged{tag}" in med:
                read = f"read{tag}" if f"read{tag}" in med else "read"
                sdpas = [name for name in med if name.startswith("sdpa") and name.endswith(" graph") == bool(tag)]
                return (
                    backend,
                    f"{backend} contiguous{tag}",
                    f"{backend} paged{tag}",
                    read,
                    sdpas,
                    tag.strip() or "eager",
                )
    raise RuntimeError(f"none of the backends {', '.join(backends)} ran this point (see the refusals)")


def graphs(fns: dict, per_call: dict, reps: dict, n_sets: int, refused: dict) -> None:
    """Adds ``<name> graph`` for each contender whose calls over one rotation of the sets a CUDA graph captures:
    replays of it, in bursts of about 2 ms like the eager calls. The host's work (checks, dispatch, launches) is
    then out of the time, which is the kernels' own, as a decoding loop that replays a graph sees it. A replay
    must give the eager call's output. ``unchecked`` contenders have none: their captured calls would be the
    checked ones' (capture skips the check). A contender that cannot be captured, or whose replay differs, is
    named in ``refused`` with the reason; the others are unaffected."""
    for name in [n for n in fns if not n.endswith(" unchecked")]:
        fn, args = fns[name], per_call[name]
        try:
            side = torch.cuda.Stream()  # capture wants the calls warmed up on a side stream first
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for a in args:
                    fn(a)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = [fn(a) for a in args]
            graph.replay()
            torch.cuda.synchronize()
            err = (outs[-1].float() - fn(args[-1]).float()).abs().max().item()
            if not err <= 1e-3 * max(1.0, outs[-1].float().abs().max().item()):
                raise RuntimeError(f"the replay's output differs from the eager call's by {err}")
            t = timed(lambda g: g.replay(), [graph], "cuda")
        except Exception as e:  # noqa: BLE001 - any failure leaves this contender eager only
            refused[f"{name} graph"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
            continue
        fns[f"{name} graph"] = lambda g: g.replay()
        per_call[f"{name} graph"] = [graph]
        reps[f"{name} graph"] = max(1, min(256, math.ceil(2e-3 / max(t, 1e-7))))


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def markdown(rows: list[dict], args, device: str, bandwidth: float) -> str:
    lines = [
        f"# Decode over a key/value cache ({device}, {time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `python benchmarks/decode.py {args.command}` at commit {_commit()}  ",
        f"torch {torch.__version__}, {_machine(device)}, Hkv = {args.heads_kv}, GQA group {args.group}, "
        f"D = {args.head_dim}, Lq = 1, page size {args.page_size} (shuffled block table), backends "
        f"{','.join(args.backends)}, {args.rounds} interleaved rounds.  ",
        f"Measured read bandwidth ({BANDWIDTH_HOW[device == 'cuda']}, best of 7 before and 7 after the points): "
        f"**{bandwidth / 1e9:.1f} GB/s**.",
        "",
        "GB/s = bytes of K and V read per call / median time. The main table: per point the first of the backends "
        f"that ran it, {' and '.join(sorted({TIMINGS[r['timing']] for r in rows}))}. Targets: "
        f"{TARGETS[device == 'cuda']}",
        "",
        "`% of read bw`: against the bandwidth above; `% of read (same rounds)`: against `torch.sum` over "
        "as many fp32 bytes as K+V, timed interleaved with the contenders (the fair figure on a shared machine). "
        "`best SDPA`: the fastest of the SDPA contenders at that point.",
        "",
        "| B | cache | dtype | K+V MiB | backend | contiguous ms | GB/s | % of read bw | % of read (same rounds) "
        "| paged ms | paged/contig | best SDPA | SDPA ms | SDPA GB/s | speedup vs SDPA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c, p, s = r["contiguous"], r["paged"], r[r["best sdpa"]]
        lines.append(
            f"| {r['batch']} | {r['length']} | {r['dtype']} | {r['kv_mib']:.0f} | {r['backend']} | {c[0] * 1e3:.3f} "
            f"| {c[1] / 1e9:.1f} "
            f"| {100 * r['of_bw']:.0f}% | {100 * r['of_read']:.0f}% | {p[0] * 1e3:.3f} | {r['paged_vs_contig']:.2f} "
            f"| {r['best sdpa']} | {s[0] * 1e3:.3f} | {s[1] / 1e9:.1f} | {r['vs_sdpa']:.2f}x |"
        )
    # contenders in the order of the command line: backends (each: contiguous, paged, unchecked), SDPA, the read;
    # each followed by its graph replays
    order = [f"{b} {kind}" for b in args.backends for kind in ("contiguous", "paged", "unchecked")]
    order += ["sdpa", *(f"sdpa {k}" for k in args.sdpa_kernels), "read"]
    names = [n for name in order for n in (name, f"{name} graph") if any(n in r for r in rows)]
    if len(names) > 4:  # more than the main table's contiguous, paged, sdpa and read: every contender's GB/s
        lines += ["", "Every contender, GB/s:", "", "| B | cache | dtype | " + " | ".join(names) + " |"]
        lines.append("| --- | --- | --- | " + " | ".join("---" for _ in names) + " |")
        for r in rows:
            figures = " | ".join(f"{r[n][1] / 1e9:.1f}" if n in r else "-" for n in names)
            lines.append(f"| {r['batch']} | {r['length']} | {r['dtype']} | {figures} |")
    refused = {name: why for r in rows for name, why in r["refused"].items()}
    if refused:
        lines += [""] + [f"`{name}` refused the call and was left out: {why}" for name, why in refused.items()]
    return "\n".join(lines) + "\n"


TIMINGS = {
    "eager": "calls as a user makes them",
    "graph": "replays of CUDA graphs of the calls (its eager calls and SDPA's are in the second table)",
}
BANDWIDTH_HOW = ("torch.sum over 1 GiB fp32", "the better of torch.sum over 1 GiB fp32 and a 1 GiB copy")
TARGETS = (
    ">= 70% of the read bandwidth for long caches, >= 1.5x SDPA, paged within 10% of contiguous.",
    ">= 80% of the measured HBM bandwidth for long caches, faster than every SDPA kernel.",
)


def _machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--backends", "--backend", default=None,
        help="fastattn backends to time, comma-separated; the main table takes the first that runs a point "
        "(default: cpu on the CPU, triton,cuda on a GPU)",
    )  # fmt: skip
    ap.add_argument(
        "--sdpa-kernels", default=None,
        help="SDPA kernels to force besides SDPA's own choice, of flash,efficient,cudnn (default: all three on a "
        "GPU, none on the CPU)",
    )  # fmt: skip
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--points", default=None, help="comma-separated B:L:dtype, e.g. 1:4096:bf16,8:32768:fp32")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    device = args.device
    args.backends = (args.backends or ("cpu" if device == "cpu" else "triton,cuda")).split(",")
    default_kernels = "" if device == "cpu" else ",".join(SDPA_KERNELS)
    kernels = default_kernels if args.sdpa_kernels is None else args.sdpa_kernels
    args.sdpa_kernels = [k for k in kernels.split(",") if k]
    for k in args.sdpa_kernels:
        if k not in SDPA_KERNELS:
            ap.error(f"--sdpa-kernels: expected names among {','.join(SDPA_KERNELS)}, got {k!r}")
    for b in list(args.backends):  # a backend that cannot run here (an extension that did not build) is left out
        reason = fastattn.backends.get(b).unavailable_reason()
        if reason:
            print(f"decode.py: backend {b} left out: {reason}", file=sys.stderr)
            args.backends.remove(b)
    if not args.backends:
        ap.error("--backends: none of them can run here (above)")
    points = POINTS
    if args.points:
        points = [(int(b), int(n), t) for b, n, t in (p.split(":") for p in args.points.split(","))]
    bandwidth = read_bandwidth(device)
    rows = []
    for batch, length, dtype_name in points:
        row = run_point(batch, length, dtype_name, args, device, bandwidth)
        rows.append(row)
        print(
            f"B={batch} L={length} {dtype_name}: {row['contiguous'][1] / 1e9:.1f} GB/s "
            f"({100 * row['of_bw']:.0f}% of {bandwidth / 1e9:.1f}, {100 * row['of_read']:.0f}% of same-round read), "
            f"{row['vs_sdpa']:.2f}x {row['best sdpa']}, "
            f"paged/contig {row['paged_vs_contig']:.2f}",
            file=sys.stderr,
            flush=True,
        )
    # The figure the percentages are against is the one the header shows: the better of the reads before and
    # after the points (the conservative one on a machine whose memory speed moves while it runs).
    bandwidth = max(bandwidth, read_bandwidth(device))
    for row in rows:
        row["of_bw"] = row["contiguous"][1] / bandwidth
    text = markdown(rows, args, device, bandwidth)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

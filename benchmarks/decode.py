"""Decoding over a key/value cache as bandwidth: ``kvcache_attention`` vs torch SDPA, vs the machine's read bandwidth.

A decode step reads the cache once, so its figure of merit is bytes of K and V read per call over the time,
compared with the read bandwidth of the same machine measured in the same run (``torch.sum`` over a buffer far
larger than the last-level cache, best of several). Contenders, timed interleaved (one call of each per round,
each round starting with the next contender, median over rounds, so that a busy machine slows all alike):

* ``fastattn contiguous``: ``kvcache_attention`` on a ``(B, Hkv, L, D)`` cache (no append);
* ``fastattn paged``: the same keys in pages of ``--page-size`` under a shuffled block table;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)`` on the
  contiguous cache (the call a user would write without fastattn).

Each contender rotates over enough independent caches to exceed the last-level cache (64 MiB), so no call reads
another's cached lines. Usage::

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


def read_bandwidth(device: str, mib: int = 1024, reps: int = 7) -> float:
    """Bytes per second of ``torch.sum`` over a ``mib`` MiB float32 buffer (best of ``reps``)."""
    x = torch.rand(mib * 2**20 // 4, device=device)
    best = math.inf
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def make_point(batch: int, length: int, dtype: torch.dtype, args, device: str, n_sets: int):
    """``n_sets`` rotating sets of (query, contiguous caches, paged caches, block table)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hq, hkv, d, ps = args.heads_kv * args.group, args.heads_kv, args.head_dim, args.page_size
    per_seq = -(-length // ps)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(batch, hq, 1, d, generator=g).to(device, dtype)
        kc = torch.randn(batch, hkv, length, d, generator=g).to(device, dtype)
        vc = torch.randn(batch, hkv, length, d, generator=g).to(device, dtype)
        num_pages = batch * per_seq
        table = torch.randperm(num_pages, generator=g).view(batch, per_seq).to(device, torch.int32)
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


def contenders(args, seqlens):
    backend = args.backend

    def contiguous(s):
        q, kc, vc, _, _, _ = s
        return fastattn.kvcache_attention(q, kc, vc, seqlens, enable_gqa=True, backend=backend)

    def paged(s):
        q, _, _, kp, vp, table = s
        return fastattn.kvcache_attention(q, kp, vp, seqlens, block_table=table, enable_gqa=True, backend=backend)

    def sdpa(s):
        q, kc, vc, _, _, _ = s
        return torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

    return {"fastattn contiguous": contiguous, "fastattn paged": paged, "sdpa": sdpa}


def run_point(batch: int, length: int, dtype_name: str, args, device: str, bandwidth: float) -> dict:
    dtype = DTYPES[dtype_name]
    elt = torch.empty((), dtype=dtype).element_size()
    kv_bytes = 2 * batch * args.heads_kv * length * args.head_dim * elt
    n_sets = max(1, min(4, math.ceil(64 * 2**20 / kv_bytes)))
    sets, seqlens = make_point(batch, length, dtype, args, device, n_sets)
    fns = contenders(args, seqlens)
    # The read bandwidth of this point's bytes, timed in the same rounds: torch.sum over as many fp32 bytes as K+V.
    buffers = [torch.rand(kv_bytes // 4, device=device) for _ in range(n_sets)]
    ref = fns["sdpa"](sets[0]).float()
    for name, fn in fns.items():  # every contender computes the same thing
        err = (fn(sets[0]).float() - ref).abs().max().item()
        assert err < (2e-2 if dtype != torch.float32 else 1e-3), f"{name}: max error {err} against sdpa"
    fns["read"] = lambda s: buffers[[id(x) for x in sets].index(id(s))].sum()
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn(sets[0])
        names = list(fns)
        for r in range(args.rounds):
            # each round starts with the next contender: a call measured up to 3% faster late in a round than first (the
            # same kernel timed four times in a row), which a fixed order would credit to whoever comes last
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn = fns[name]
                s = sets[r % n_sets]
                sync(device)
                t = time.perf_counter()
                fn(s)
                sync(device)
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    row = {"batch": batch, "length": length, "dtype": dtype_name, "kv_mib": kv_bytes / 2**20}
    for name, t in med.items():
        row[name] = (t, kv_bytes / t)
    row["of_bw"] = kv_bytes / med["fastattn contiguous"] / bandwidth
    row["of_read"] = med["read"] / med["fastattn contiguous"]
    row["vs_sdpa"] = med["sdpa"] / med["fastattn contiguous"]
    row["paged_vs_contig"] = med["fastattn paged"] / med["fastattn contiguous"]
    return row


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
        f"Command: `python benchmarks/decode.py {' '.join(sys.argv[1:])}` at commit {_commit()}  ",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, Hkv = {args.heads_kv}, GQA group {args.group}, D = {args.head_dim}, Lq = 1, page size "
        f"{args.page_size} (shuffled block table), backend {args.backend!r}, {args.rounds} interleaved rounds.  ",
        f"Measured read bandwidth (torch.sum over 1 GiB fp32, best of 7 before and 7 after the points): "
        f"**{bandwidth / 1e9:.1f} GB/s**.",
        "",
        "GB/s = bytes of K and V read per call / median time. Targets: >= 70% of the read bandwidth for long "
        "caches, >= 1.5x SDPA, paged within 10% of contiguous.",
        "",
        "`% of read bw`: against the bandwidth above; `% of read (same rounds)`: against `torch.sum` over "
        "as many fp32 bytes as K+V, timed interleaved with the contenders (the fair figure on a shared machine).",
        "",
        "| B | cache | dtype | K+V MiB | contiguous ms | GB/s | % of read bw | % of read (same rounds) | paged ms "
        "| paged/contig | SDPA ms | SDPA GB/s | speedup vs SDPA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c, p, s = r["fastattn contiguous"], r["fastattn paged"], r["sdpa"]
        lines.append(
            f"| {r['batch']} | {r['length']} | {r['dtype']} | {r['kv_mib']:.0f} | {c[0] * 1e3:.2f} | {c[1] / 1e9:.1f} "
            f"| {100 * r['of_bw']:.0f}% | {100 * r['of_read']:.0f}% | {p[0] * 1e3:.2f} | {r['paged_vs_contig']:.2f} "
            f"| {s[0] * 1e3:.2f} "
            f"| {s[1] / 1e9:.1f} | {r['vs_sdpa']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="fastattn backend (default: automatic)")
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--points", default=None, help="comma-separated B:L:dtype, e.g. 1:4096:bf16,8:32768:fp32")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    device = args.device
    if args.backend is None:
        args.backend = "cpu" if device == "cpu" else None
    points = POINTS
    if args.points:
        points = [(int(b), int(n), t) for b, n, t in (p.split(":") for p in args.points.split(","))]
    bandwidth = read_bandwidth(device)
    rows = []
    for batch, length, dtype_name in points:
        row = run_point(batch, length, dtype_name, args, device, bandwidth)
        rows.append(row)
        print(
            f"B={batch} L={length} {dtype_name}: {row['fastattn contiguous'][1] / 1e9:.1f} GB/s "
            f"({100 * row['of_bw']:.0f}% of {bandwidth / 1e9:.1f}, {100 * row['of_read']:.0f}% of same-round read), "
            f"{row['vs_sdpa']:.2f}x sdpa, "
            f"paged/contig {row['paged_vs_contig']:.2f}",
            file=sys.stderr,
            flush=True,
        )
    # The figure the percentages are against is the one the header shows: the better of the reads before and
    # after the points (the conservative one on a machine whose memory speed moves while it runs).
    bandwidth = max(bandwidth, read_bandwidth(device))
    for row in rows:
        row["of_bw"] = row["fastattn contiguous"][1] / bandwidth
    text = markdown(rows, args, device, bandwidth)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

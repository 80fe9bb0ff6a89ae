"""One table of a GPU run's results (``gpu_check.sh`` prints it last; ``--markdown`` writes it for the README).

    python benchmarks/gpu_summary.py DIR [--markdown FILE]

Reads what ``gpu_check.sh`` wrote to DIR: ``bench-main.json`` (fastattn triton and cuda, SDPA's flash,
cudnn and efficient kernels), ``bench-flex.json`` (FlexAttention), ``bench-tuned.json`` (Triton with the
tuned table, shown as ``triton*``). Per point (mode, head dim, causal, length): TFLOP/s of each
contender, fastattn's best over FlashAttention-2 (SDPA's flash kernel) and over cuDNN measured in the
same run, and the fraction of the H200's measured 790 TFLOP/s bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

MATMUL_TFLOPS = 790.0  # bf16 8192^3 matmul on an H200, random data (measured: see NOTES.md)
COLUMNS = ("triton", "triton*", "cuda", "flash", "cudnn", "efficient", "flex")
FILES = {"bench-main.json": "", "bench-flex.json": "", "bench-tuned.json": "*"}


def load(folder: str) -> dict[tuple, dict[str, float]]:
    """``{(mode, dtype, head_dim, causal, mask, seqlen): {column: tflops}}`` from the run's JSON files."""
    points: dict[tuple, dict[str, float]] = {}
    for name, suffix in FILES.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = json.load(f)["rows"]
        for r in rows:
            if r.get("status") != "ok" or not r.get("tflops"):
                continue
            key = (r["mode"], r["dtype"], r["head_dim"], bool(r["causal"]), r["mask"], r["seqlen"])
            points.setdefault(key, {})[r["backend"] + suffix] = float(r["tflops"])
    return points


def _ratio(ours: Optional[float], other: Optional[float]) -> str:
    return f"{ours / other:.2f}x" if ours and other else "-"


def table(points: dict[tuple, dict[str, float]]) -> list[str]:
    cols = [c for c in COLUMNS if any(c in v for v in points.values())]
    head = ["mode", "dtype", "d", "causal", "L", *cols, "best/FA2", "best/cuDNN", "best/790"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(points, key=lambda k: (k[0], k[1], k[2], k[3], k[4], k[5])):
        mode, dtype, d, causal, mask, seqlen = key
        v = points[key]
        ours = max((v[c] for c in ("triton", "triton*", "cuda") if c in v), default=None)

        cells = [mode, dtype, str(d), "yes" if causal else "no", str(seqlen)]
        cells += [f"{v[c]:.0f}" if c in v else "-" for c in cols]
        cells += [_ratio(ours, v.get("flash")), _ratio(ours, v.get("cudnn"))]
        cells.append(f"{ours / MATMUL_TFLOPS:.0%}" if ours else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args(argv)
    points = load(args.folder)
    if not points:
        print(f"gpu_summary: no benchmark results in {args.folder}")
        return 1
    lines = table(points)
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

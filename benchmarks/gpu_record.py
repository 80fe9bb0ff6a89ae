"""Check the GPU suite's record of where each case ran (``tests/test_gpu.py`` with ``FASTATTN_GPU_RECORD``).

    python benchmarks/gpu_record.py RECORD --device cuda

Exit 1 when the record is missing or empty, or when any case ran on another device or under the Triton
interpreter or the CUDA emulator while ``--device cuda`` was expected: the GPU suite's comparisons prove
nothing about the hardware unless its kernels ran there. Prints one summary line per backend.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import Optional


def check(lines: list[str], device: str) -> list[str]:
    """Problems found in the record's JSON lines (empty when every case ran on ``device``)."""
    entries = [json.loads(line) for line in lines if line.strip()]
    if not entries:
        return ["the record is empty: no GPU-suite case ran"]
    problems = []
    for e in entries:
        if e["device"] != device:
            problems.append(f"{e['case']}/{e['backend']}: ran on {e['device']}, expected {device}")
        if device == "cuda" and e["interpreted"]:
            problems.append(f"{e['case']}/{e['backend']}: ran under the Triton interpreter or the CUDA emulator")
    return problems


def summary(lines: list[str]) -> list[str]:
    per_backend = collections.Counter()
    devices = collections.defaultdict(set)
    for line in lines:
        if line.strip():
            e = json.loads(line)
            per_backend[e["backend"]] += 1
            devices[e["backend"]].add(e["device"])
    return [f"{b}: {n} cases on {', '.join(sorted(devices[b]))}" for b, n in sorted(per_backend.items())]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("record")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args(argv)
    try:
        with open(args.record) as f:
            lines = f.readlines()
    except FileNotFoundError:
        print(f"gpu_record: {args.record} does not exist: the GPU suite wrote no record", file=sys.stderr)
        return 1
    problems = check(lines, args.device)
    for line in summary(lines):
        print(f"gpu_record: {line}")
    for problem in problems:
        print(f"gpu_record: FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

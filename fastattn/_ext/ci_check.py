"""CI check of the real CUDA build (no GPU needed): build time, tensor-core SASS, no register spills.

``python -m fastattn._ext.ci_check [--arch "8.0;9.0"] [--fresh]`` builds the ``cuda`` library through
the same JIT path users take, then fails (exit 1) if

* the test GEMM kernel's ptxas report (``-Xptxas -v``) shows spill stores or loads (other kernels' spills
  are printed as warnings; ``--strict-spills`` fails on them too, except those a ``--known-spills`` file
  lists, each with the most bytes it may spill and why: a spill that grows past its entry, or a new one,
  still fails, and an entry that no longer spills is reported so that it is removed), or
* the SASS (``cuobjdump -sass``) of the test GEMM or of any attention kernel that does matrix math
  (``attn_fwd_kernel``, ``attn_bwd_dkdv_kernel``, ``attn_bwd_dq_kernel``) has no ``HMMA``
  (tensor-core mma) for some arch.

It prints the build time (the goal is under a minute), and per kernel and arch the registers, shared
memory, spills and the HMMA / LDSM (ldmatrix) / LDGSTS (cp.async) instruction counts. Without nvcc it
says why and exits 0, so that ``make test`` passes on a machine without the CUDA toolkit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

# Attention kernels that must run their matrix products on tensor cores (mangled names contain these).
_MMA_KERNELS = ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def find_cuobjdump(cuda_home: Optional[str]) -> Optional[str]:
    """cuobjdump from PATH, the toolkit, or the copy Triton ships (minimal toolkits lack it)."""
    candidates = [shutil.which("cuobjdump")]
    if cuda_home:
        candidates.append(str(Path(cuda_home) / "bin" / "cuobjdump"))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def parse_ptxas(log: str) -> list[dict]:
    """Per (kernel, arch): registers, shared bytes, stack, spill stores/loads, from ptxas -v lines."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "smem": 0, "spill": None}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
            cur["spill"] = cur["spill_stores"] + cur["spill_loads"]
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def sass_counts(cuobjdump: str, library: str) -> dict[tuple[str, str], dict[str, int]]:
    """(kernel, arch) -> counts of HMMA, LDSM and LDGSTS instructions in the library's SASS."""
    out = subprocess.run([cuobjdump, "-sass", library], capture_output=True, text=True, check=True).stdout
    counts: dict[tuple[str, str], dict[str, int]] = {}
    arch, fn = "?", None
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
            counts[(fn, arch)] = {"HMMA": 0, "LDSM": 0, "LDGSTS": 0}
            continue
        if fn is not None:
            for op in ("HMMA", "LDSM", "LDGSTS"):
                if re.search(rf"\b{op}\b", line):
                    counts[(fn, arch)][op] += 1
    return counts


def load_known_spills(path: Optional[str]) -> list[dict]:
    """Entries ``{"kernel": regex on the mangled name, "arch": "sm_90", "max_bytes": int, "why": str}``."""
    if not path:
        return []
    entries = json.loads(Path(path).read_text())
    for i, e in enumerate(entries):
        missing = {"kernel", "arch", "max_bytes", "why"} - set(e)
        if missing:
            raise SystemExit(f"--known-spills: entry {i} of {path} lacks {sorted(missing)}")
    return entries


def spill_verdicts(rows: list[dict], strict: bool, known: list[dict]) -> tuple[list[str], list[str]]:
    """``(failures, warnings)`` for the kernels' spills. The test GEMM must never spill; with ``strict``
    every other spill fails unless a known entry covers it (same arch, name matches, at most its bytes)."""
    failures, warnings, used = [], [], set()
    for r in rows:
        if not r["spill"]:
            continue
        message = f"{r['kernel']} ({r['arch']}) spills {r['spill']} bytes"
        entry = next(
            (i for i, e in enumerate(known) if e["arch"] == r["arch"] and re.search(e["kernel"], r["kernel"])), None
        )
        if "test_gemm" in r["kernel"]:
            failures.append(message)
        elif entry is not None and r["spill"] <= known[entry]["max_bytes"]:
            used.add(entry)
            warnings.append(f"{message} (known, at most {known[entry]['max_bytes']}: {known[entry]['why']})")
        elif entry is not None:
            used.add(entry)
            failures.append(f"{message}, more than its known {known[entry]['max_bytes']} bytes")
        elif strict:
            failures.append(message)
        else:
            warnings.append(message)
    for i, e in enumerate(known):
        if i not in used:
            warnings.append(f"known spill {e['kernel']!r} ({e['arch']}) no longer spills: remove its entry")
    return failures, warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="8.0;9.0")
    parser.add_argument("--fresh", action="store_true", help="rebuild even if cached, to time a clean build")
    parser.add_argument("--strict-spills", action="store_true", help="fail on any kernel's spills")
    parser.add_argument(
        "--known-spills", metavar="JSON", help="spills allowed up to a size, each with its reason (see the docstring)"
    )
    args = parser.parse_args(argv)
    known = load_known_spills(args.known_spills)

    from fastattn import _ext

    reason = _ext.unavailable_reason("cuda")
    if reason:
        print(f"ci_check: SKIPPED, the cuda extension cannot be built here: {reason}")
        return 0
    start = time.perf_counter()
    library = _ext.build("cuda", arch=args.arch, force=args.fresh)
    elapsed = time.perf_counter() - start
    stamp = Path(library).with_name("build.json")
    built = json.loads(stamp.read_text()).get("seconds") if stamp.is_file() else None
    if built is not None and elapsed < 0.5 * built:
        print(f"ci_check: build time {built:.1f} s (cached build from earlier; --fresh rebuilds)")
    else:
        print(f"ci_check: build time {elapsed:.1f} s (goal: under 60 s)")

    failures = []
    log_file = Path(library).with_name("build.log")  # the log of this library (not of the current key)
    rows = parse_ptxas(log_file.read_text() if log_file.is_file() else "")
    if not rows:
        failures.append("no ptxas resource report in the build log (-Xptxas=-v missing?)")
    cuobjdump = find_cuobjdump(_ext.find_cuda_home())
    counts = sass_counts(cuobjdump, library) if cuobjdump else {}
    if not cuobjdump:
        failures.append("cuobjdump not found (CUDA toolkit bin/ or triton/backends/nvidia/bin/)")
    print(f"{'kernel':60} {'arch':6} {'regs':>4} {'smem':>6} {'spill':>5} {'HMMA':>5} {'LDSM':>5} {'LDGSTS':>6}")
    for r in rows:
        c = counts.get((r["kernel"], r["arch"]), {})
        print(
            f"{r['kernel'][:60]:60} {r['arch']:6} {r['registers'] or 0:>4} {r['smem']:>6} {r['spill'] or 0:>5} "
            f"{c.get('HMMA', '?'):>5} {c.get('LDSM', '?'):>5} {c.get('LDGSTS', '?'):>6}"
        )
    spill_failures, spill_warnings = spill_verdicts(rows, args.strict_spills, known)
    failures += spill_failures
    for w in spill_warnings:
        print(f"ci_check: WARNING: {w}")
    archs = {f"sm_{a.replace('.', '').removesuffix('+PTX')}" for a in _ext.arch_list(args.arch)}
    for arch in sorted(archs):
        gemm = [c for (fn, a), c in counts.items() if "test_gemm" in fn and "gemm_kernel" in fn and a == arch]
        if not gemm:
            failures.append(f"test GEMM kernel not found in the SASS for {arch}")
        elif any(c["HMMA"] == 0 for c in gemm):
            failures.append(f"test GEMM kernel has no HMMA instruction for {arch}")
        for (fn, a), c in counts.items():
            if a == arch and any(name in fn for name in _MMA_KERNELS) and c["HMMA"] == 0:
                failures.append(f"{fn} has no HMMA instruction for {arch}")
    for f in failures:
        print(f"ci_check: FAIL: {f}")
    print("ci_check: OK" if not failures else f"ci_check: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""``fastattn build``: build an extension library ahead of its first use (by default the one this machine runs)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

_RESOURCE_LINE = re.compile(r"ptxas info\s*:\s*(Compiling entry|Function properties|Used)|bytes stack frame|spill")


def add_build_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``build`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "build",
        help="build the extension library this machine runs now (it is otherwise built on first use)",
        description=(
            "JIT-build one of fastattn's C++/CUDA extension libraries with torch.utils.cpp_extension and ninja into "
            "the per-user cache. By default the one this machine can run: the CUDA library where a GPU is visible, "
            "the emulated one with FASTATTN_CUDA_EMULATE=1, else the CPU backend's. --kind cuda builds the CUDA "
            "library without a GPU too (compile and link only; needs nvcc)."
        ),
    )
    p.add_argument(
        "--kind",
        choices=("cuda", "cuda_emulate", "cpu"),
        default=None,
        help="which library: cuda (nvcc; CUDA tensors), cuda_emulate (the CUDA kernels on CPU tensors, tests), "
        "cpu (the native CPU backend; plain C++ compiler). Default: cuda_emulate when FASTATTN_CUDA_EMULATE=1, "
        "else cuda where a GPU is visible, else cpu",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="CUDA archs, e.g. '8.0;9.0' or 'sm_90' (default: the visible GPU's, else $TORCH_CUDA_ARCH_LIST, "
        "else 8.0;9.0)",
    )
    p.add_argument(
        "--verbose", action="store_true", help="show the compiler output and ptxas's registers/spills/shared memory"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.set_defaults(func=run_build)
    return p


def resource_report(log: str) -> list[str]:
    """The ptxas ``-v`` lines of a build log (per kernel: registers, spill bytes, shared memory)."""
    return [line.strip() for line in log.splitlines() if _RESOURCE_LINE.search(line)]


def default_kind() -> str:
    """The library this machine runs: emulated CUDA when asked for, CUDA where a GPU is visible, else CPU."""
    import torch

    from fastattn import _ext

    if _ext.cuda_kind() == "cuda_emulate":
        return "cuda_emulate"
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_build(args: argparse.Namespace) -> int:
    from fastattn import _ext

    kind = args.kind or default_kind()
    reason = _ext.unavailable_reason(kind)
    if reason:
        print(f"fastattn build: cannot build the {kind} extension: {reason}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        path = _ext.build(kind, verbose=False, arch=args.arch, force=getattr(args, "force", False))
    except (RuntimeError, ValueError) as e:
        print(f"fastattn build: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    if args.verbose:
        # the log beside the library just built (the sources may have changed since, and with them the key)
        log_file = Path(path).with_name("build.log")
        log = log_file.read_text() if log_file.is_file() else ""
        report = resource_report(log)
        print("\n".join(report) if report else log)
    print(f"{kind} extension: {path} ({seconds:.1f} s)")
    return 0


def main(argv=None) -> int:
    """Standalone entry (``python -m fastattn._ext.cli build ...``) until the main CLI wires it in."""
    parser = argparse.ArgumentParser(prog="fastattn")
    add_build_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

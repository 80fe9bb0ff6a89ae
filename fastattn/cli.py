"""The ``fastattn`` console command: ``info``, and ``build`` / ``compile-check`` where present."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
from typing import Optional

# Subcommands contributed by other modules: (module, add-parser function, run function).
_PLUGINS = (
    ("fastattn._ext.cli", "add_build_parser", "run_build"),
    ("fastattn.backends.triton.compile_check", "add_compile_check_parser", "run_compile_check"),
)


def _module_exists(name: str) -> bool:
    """True if the module's file exists; its own import errors are not swallowed."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is absent
        return False


def _versions() -> list[tuple[str, str]]:
    import torch

    import fastattn

    rows = [("fastattn", fastattn.__version__), ("python", platform.python_version()), ("torch", torch.__version__)]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    rows.append(("torch CUDA build", torch.version.cuda or "none (CPU build)"))
    if torch.cuda.is_available():
        gpus = [
            f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())
        ]
        rows.append(("GPU", ", ".join(gpus)))
    else:
        rows.append(("GPU", "none visible (torch.cuda.is_available() is False)"))
    rows.append(("CPU threads", str(torch.get_num_threads())))
    rows.append(("CPU kernels ISA", _cpu_isa()))
    return rows


def _cpu_isa() -> str:
    """The instruction-set build the CPU backend runs (``FASTATTN_CPU_ISA`` forces a lower one), and the choices."""
    from fastattn.backends import cpu

    line = cpu.describe_isa()
    if cpu._LOADED and not line.startswith("error"):
        line += f"; this CPU runs: {', '.join(cpu.available_isas())} (FASTATTN_CPU_ISA forces one)"
    return line


def run_info(args: Optional[argparse.Namespace] = None) -> int:
    from fastattn import backends

    for key, value in _versions():
        print(f"{key:18} {value}")
    print()
    print("backends:")
    for name in backends.names():
        backend = backends.get(name)
        reason = backend.unavailable_reason()
        status = "available" if reason is None else f"unavailable: {reason}"
        print(f"  {name:10} {status}")
        if backend.description:
            print(f"  {'':10} ({backend.description})")
    from fastattn import graph

    print()
    print("graph backends (fastattn.graph, fastattn.nn.GATConv/GATv2Conv/TransformerConv):")
    for name in graph.backend_names():
        backend = graph.get(name)
        reason = backend.unavailable_reason()
        print(f"  {name:10} {'available' if reason is None else f'unavailable: {reason}'}")
        if backend.description:
            print(f"  {'':10} ({backend.description})")
    slow = [(name, case) for name in backends.names() for case in backends.get(name).slow_cases]
    if slow:
        print()
        print("slow paths: calls the automatic choice runs on the reference backend (it warns once), and the fix:")
        for name, case in slow:
            print(f"  {name:10} {case}")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="fastattn", description="fused attention kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, the GPU, and which backends can run here (and why not)")
    runners = {"info": run_info}
    info.set_defaults(command="info")
    for module_name, add_name, run_name in _PLUGINS:
        if not _module_exists(module_name):
            continue
        module = importlib.import_module(module_name)
        before = set(sub.choices)
        getattr(module, add_name)(sub)
        for name in set(sub.choices) - before:
            runners[name] = getattr(module, run_name)
    return parser, runners


def main(argv: Optional[list[str]] = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    return int(runners[args.command](args) or 0)


if __name__ == "__main__":
    sys.exit(main())

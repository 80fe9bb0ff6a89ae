"""What a run writes: the JSON (header + rows), the speed-up tables (Markdown), the plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
from collections import defaultdict
from typing import Optional

import torch

ROW_FIELDS = (
    "backend",
    "mode",
    "dtype",
    "batch",
    "heads",
    "seqlen",
    "seqlen_k",
    "head_dim",
    "causal",
    "mask",
    "ms",
    "tflops",
    "peak_mem_mb",
    "status",
    "reason",
)
STATUSES = ("ok", "skipped", "oom", "error")
BASELINE = "sdpa"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Variables that cap the instruction sets of fastattn's CPU kernels and of torch's (its own kernels, MKL, oneDNN).
ISA_VARS = ("FASTATTN_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def cpu_isa_fields() -> dict:
    """The instruction sets CPU figures were made with, for every benchmark's header.

    ``cpu_isa``: the build of fastattn's CPU kernels that ran (``avx512``, ``avx2``, ``default``;
    ``FASTATTN_CPU_ISA`` forces a lower one), None if the CPU library is not loaded; ``cpu_isa_detail``: why
    (forced, capped, or the CPU's best); ``torch_cpu_capability``: torch's own kernels' choice; ``isa_env``: the
    capping variables that were set (an AVX2 machine emulated on an AVX-512 one sets all four).
    """
    fields: dict = {"cpu_isa": None, "cpu_isa_detail": None}
    try:
        from fastattn.backends import cpu

        fields["cpu_isa_detail"] = cpu.describe_isa()  # never builds the library
        if cpu._LOADED and not fields["cpu_isa_detail"].startswith("error"):
            fields["cpu_isa"] = cpu.isa()
    except Exception as exc:  # a header must not fail the run it describes
        fields["cpu_isa_detail"] = f"unavailable: {type(exc).__name__}: {exc}"
    fields["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    fields["isa_env"] = {var: os.environ[var] for var in ISA_VARS if os.environ.get(var)}
    return fields


def isa_line(fields: dict) -> str:
    """``fastattn CPU kernels: avx2 (forced ...); torch: AVX2; set: ATEN_CPU_CAPABILITY=avx2, ...`` for tables."""
    env = ", ".join(f"{k}={v}" for k, v in fields["isa_env"].items()) or "none"
    return (
        f"fastattn CPU kernels: {fields['cpu_isa_detail']}; torch's CPU kernels: {fields['torch_cpu_capability']}; "
        f"ISA variables set: {env}"
    )


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def header(device: torch.device, argv: list[str]) -> dict:
    """Where and how the numbers were made: hardware, versions, date, the command."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fastattn

    info = {
        "device": device.type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "fastattn": fastattn.__version__,
        "git": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(argv),
        **cpu_isa_fields(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return info


def hardware(head: dict) -> str:
    if head.get("gpu"):
        return f"{head['gpu']} (CUDA {head['cuda']})"
    isa = f", fastattn {head['cpu_isa']} kernels" if head.get("cpu_isa") else ""
    return f"{head['cpu']} ({head['torch_threads']} threads{isa})"


def write_json(path: str, head: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"schema": 1, "header": head, "rows": rows}, f, indent=1)
        f.write("\n")


def _group_key(r: dict) -> tuple:
    return (r["mode"], r["dtype"], r["head_dim"], r["mask"], r["causal"])


def _point_key(r: dict) -> tuple:
    keys = ("mode", "dtype", "batch", "heads", "seqlen", "seqlen_k", "head_dim", "causal", "mask")
    return tuple(r[k] for k in keys)


def speedups(rows: list[dict]) -> dict[tuple, float]:
    """``(backend, point) -> sdpa_ms / backend_ms`` where both ran."""
    base = {_point_key(r): r["ms"] for r in rows if r["backend"] == BASELINE and r["status"] == "ok"}
    out = {}
    for r in rows:
        key = _point_key(r)
        if r["status"] == "ok" and key in base and r["ms"]:
            out[(r["backend"], key)] = base[key] / r["ms"]
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def tables(rows: list[dict]) -> str:
    """Markdown: per (mode, dtype, head dim, mask, causal), TFLOP/s (speed-up over SDPA's default)
    and peak memory per sequence length and backend; then the reason of every skip."""
    ups = speedups(rows)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[_group_key(r)].append(r)
    lines: list[str] = []
    has_base = any(r["backend"] == BASELINE and r["status"] == "ok" for r in rows)
    notes: dict[str, int] = {}
    for (mode, dtype, d, mask, causal), grp in groups.items():
        title = f"{mode}, {dtype}, head dim {d}, mask {mask}{', causal' if causal else ''}"
        lines += [f"### {title}", ""]
        if has_base:
            lines.append(f"TFLOP/s (speed-up over torch SDPA's default choice, `{BASELINE}`); peak memory in MB.")
        else:
            lines.append(f"TFLOP/s; peak memory in MB (`{BASELINE}` was not run: no speed-ups).")
        lines.append("")
        cols = [b for b in backends if any(r["backend"] == b for r in grp)]
        lines.append("| seqlen | B x H | " + " | ".join(cols) + " | " + " | ".join(f"{c} MB" for c in cols) + " |")
        lines.append("|" + "---|" * (2 + 2 * len(cols)))
        by_len: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in grp:
            by_len[(r["seqlen"], r["seqlen_k"], r["batch"], r["heads"])][r["backend"]] = r
        for (lq, lk, b, h), cells in sorted(by_len.items()):
            speed, mem = [], []
            for c in cols:
                r = cells.get(c)
                if r is None:
                    speed.append("")
                    mem.append("")
                elif r["status"] != "ok":
                    if r["status"] in ("skipped", "error"):
                        n = notes.setdefault(f"{c}: {r['reason']}", len(notes) + 1)
                        speed.append(f"{r['status']} [{n}]")
                    else:
                        speed.append(r["status"])
                    mem.append("")
                else:
                    up = ups.get((c, _point_key(r)))
                    speed.append(
                        _fmt(r["tflops"]) + ("" if up is None else f" ({up:.2f}x)" if up >= 0.01 else f" ({up:.1g}x)")
                    )
                    mem.append(_fmt(r["peak_mem_mb"]) if r["peak_mem_mb"] is not None else "")
            length = str(lq) if lq == lk else f"{lq}/{lk}"
            lines.append(f"| {length} | {b} x {h} | " + " | ".join(speed) + " | " + " | ".join(mem) + " |")
        lines.append("")
    if notes:
        lines += ["Not run:", ""]
        lines += [f"{n}. {text}" for text, n in notes.items()]
        lines.append("")
    return "\n".join(lines)


def markdown(head: dict, rows: list[dict]) -> str:
    intro = [
        f"## fastattn benchmarks: {hardware(head)}",
        "",
        f"- date: {head['date']}; git {head['git']}",
        f"- torch {head['torch']}, triton {head['triton']}, CUDA {head['cuda']}, cuDNN {head['cudnn']}, "
        f"Python {head['python']}",
        f"- CPU: {head['cpu']} ({head['cpu_count']} cores)",
        f"- command: `{head['command']}`",
        "",
    ]
    left = head.get("not_in_default_set") or {}
    outro = ["", "Not in the default set here:", ""] + [f"- {n}: {why}" for n, why in left.items()] if left else []
    return "\n".join(intro) + tables(rows) + "\n".join(outro)


def plot(path: str, head: dict, rows: list[dict]) -> Optional[str]:
    """TFLOP/s against sequence length, a line per backend, a panel per (mode, causal).

    Returns None, or why no plot was written (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not installed ({exc})"
    ok = [r for r in rows if r["status"] == "ok"]
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in ok)]
    causals = sorted({r["causal"] for r in ok})
    if not ok:
        return "no plot: no point ran"
    variants = list(dict.fromkeys((r["dtype"], r["head_dim"], r["mask"]) for r in ok))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    colors = {b: f"C{i % 10}" for i, b in enumerate(backends)}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "x"]
    fig, axes = plt.subplots(
        len(modes), len(causals), figsize=(5.5 * len(causals), 3.8 * len(modes)), squeeze=False, sharex=True
    )
    for i, mode in enumerate(modes):
        for j, causal in enumerate(causals):
            ax = axes[i][j]
            for b in backends:
                for vi, var in enumerate(variants):
                    pts = sorted(
                        (r["seqlen"], r["tflops"])
                        for r in ok
                        if r["backend"] == b
                        and r["mode"] == mode
                        and r["causal"] == causal
                        and (r["dtype"], r["head_dim"], r["mask"]) == var
                    )
                    if not pts:
                        continue
                    label = b if len(variants) == 1 else f"{b} {var[0]} D={var[1]} {var[2]}"
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        color=colors[b],
                        linestyle=styles[vi % len(styles)],
                        marker=markers[vi % len(markers)],
                        markersize=4,
                        label=label,
                    )
            ax.set_xscale("log", base=2)
            lengths = sorted({r["seqlen"] for r in ok})
            ax.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    single = variants[0] if len(variants) == 1 else None
    sub = f" ({single[0]}, head dim {single[1]}, mask {single[2]})" if single else ""
    fig.suptitle(f"fastattn vs torch on {hardware(head)}{sub}\ntorch {head['torch']}, {head['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

"""A training step of ``nn.TransformerEncoderLayer`` on the CPU: torch's own attention vs fastattn's.

    python benchmarks/encoder_layer_cpu.py [--reps 7] [--batch 8] [--seqlen 512] [--markdown r.md]

The layer is the one a user has (d_model 512, 8 heads, feed-forward 2048, dropout 0.1, training mode);
fastattn's copy has the same weights and went through ``fastattn.replace_attention``, so the only
difference is the attention: torch's (its CPU flash kernel has no dropout, so training runs SDPA's
math path, O(L²) memory) against fastattn's native CPU kernels with fused dropout. One step is
forward, backward and an SGD update. Both run in one process, interleaved within every repetition
(alternating which goes first), median of ``time.perf_counter`` after warm-up. ``ratio`` is torch's
time over fastattn's (> 1: fastattn is faster). Before timing, a profiler pass checks that fastattn's
CPU ops ran and that torch's layer did not call them.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler check's start/stop lines would bury the result

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastattn  # noqa: E402


def make_layers(d_model: int, heads: int, dropout: float) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True)
    ours = fastattn.replace_attention(copy.deepcopy(ref))
    return ref.train(), ours.train()


def make_step(layer: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(layer.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        opt.step()

    return step


def ops_run(step) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return {e.key for e in prof.key_averages()}


def measure(batch: int, seqlen: int, d_model: int, heads: int, dropout: float, reps: int, warmup: int) -> dict:
    ref, ours = make_layers(d_model, heads, dropout)
    x = torch.randn(batch, seqlen, d_model)
    steps = {"torch": make_step(ref, x), "fastattn": make_step(ours, x)}
    ran = ops_run(steps["fastattn"])
    if not {"fastattn::cpu_attn_fwd", "fastattn::cpu_attn_bwd"} <= ran:
        raise RuntimeError(f"fastattn's CPU kernels did not run in the swapped layer; fastattn ops seen: "
                           f"{sorted(k for k in ran if 'fastattn' in k)}")  # fmt: skip
    if any("fastattn" in k for k in ops_run(steps["torch"])):
        raise RuntimeError("torch's layer called fastattn: the comparison would be meaningless")
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps):
        order = list(steps) if rep % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    # Each repetition's pair ran back to back: its ratio is robust to load that drifts over the run.
    paired = statistics.median(t / f for t, f in zip(times["torch"], times["fastattn"]))
    return {
        "batch": batch,
        "seqlen": seqlen,
        "d_model": d_model,
        "heads": heads,
        "dropout": dropout,
        "torch_s": med["torch"],
        "fastattn_s": med["fastattn"],
        "ratio": med["torch"] / med["fastattn"],
        "paired_ratio": paired,
        "torch_all": times["torch"],
        "fastattn_all": times["fastattn"],
    }


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension, from /proc/cpuinfo where there is one."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model or platform.machine()} ({isa})"


def isa_line() -> str:
    """Which instruction-set build of fastattn's CPU kernels ran, and torch's (benchmarks/_report.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _report

    return _report.isa_line(_report.cpu_isa_fields())


def markdown(r: dict, reps: int, threads: int) -> str:
    lines = [
        "# nn.TransformerEncoderLayer training step on the CPU: torch's attention vs fastattn's",
        "",
        isa_line(),
        "",
        f"`python benchmarks/encoder_layer_cpu.py --reps {reps}`; {cpu_name()}, "
        f"{threads} threads, torch {torch.__version__}, python {platform.python_version()}. d_model {r['d_model']}, "
        f"{r['heads']} heads, feed-forward {4 * r['d_model']}, dropout {r['dropout']}, batch {r['batch']}, "
        f"sequence {r['seqlen']}, fp32, training mode; one step = forward + backward + SGD update; median of "
        f"{reps}, interleaved.",
        "",
        "| layer | median step | all steps (s) |",
        "| --- | --- | --- |",
        f"| torch (SDPA math path: no CPU flash kernel with dropout) | {r['torch_s'] * 1e3:.0f} ms | "
        + ", ".join(f"{t:.3f}" for t in r["torch_all"])
        + " |",
        f"| fastattn (`replace_attention`, native CPU kernels, fused dropout) | {r['fastattn_s'] * 1e3:.0f} ms | "
        + ", ".join(f"{t:.3f}" for t in r["fastattn_all"])
        + " |",
        "",
        f"**ratio (torch / fastattn): {r['ratio']:.2f}x** (of the medians; median of the per-repetition ratios: "
        f"{r['paired_ratio']:.2f}x)",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--markdown", default=None, help="also write the result as a markdown table here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.batch, args.seqlen, args.d_model, args.heads, args.dropout, args.reps, args.warmup)
    print(isa_line())
    print(
        f"torch {r['torch_s'] * 1e3:.0f} ms  fastattn {r['fastattn_s'] * 1e3:.0f} ms  "
        f"ratio {r['ratio']:.2f}x (paired {r['paired_ratio']:.2f}x)  (batch {r['batch']}, seq {r['seqlen']}, "
        f"d_model {r['d_model']}, {r['heads']} heads, dropout {r['dropout']})"
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(r, args.reps, torch.get_num_threads()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Gemma-2 softcap benchmark's harness (benchmarks/softcap_flex.py), run on the CPU at a tiny point.

On a GPU it compares fastattn with FlexAttention (``make gpu-check``'s bench step); here it proves that every
backend's output passes the float64 oracle check before it is timed, that a backend ignoring the cap would
be caught, and that the rows, ratios and FLOP counts the table reports are what they say.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import softcap_flex  # noqa: E402

import fastattn  # noqa: E402
from fastattn import variants  # noqa: E402


def _cpu_or_skip():
    reason = fastattn.backends.get("cpu").unavailable_reason()
    if reason:
        pytest.skip(f"the cpu backend is unavailable here: {reason}")


def test_dry_run_checks_times_and_reports_every_point(tmp_path, capsys):
    _cpu_or_skip()
    out = tmp_path / "softcap.json"
    argv = [
        "--device",
        "cpu",
        "--dry-run",
        "--dtype",
        "bfloat16",
        "--backends",
        "cpu,flex",
        "--seqlens",
        "33",
        "--strict",
    ]
    argv += ["--json", str(out)]
    assert softcap_flex.main(argv) == 0
    data = json.loads(out.read_text())
    rows = {(r["backend"], r["seqlen"], r["window"], r["mode"]): r for r in data["rows"]}
    # The dry run's window (24) is shorter than L = 33: a causal and a windowed point.
    assert set(rows) == {(b, 33, w, m) for b in ("cpu", "flex") for w in (None, 24) for m in ("fwd", "fwd+bwd")}
    for window in (None, 24):
        for mode in ("fwd", "fwd+bwd"):
            row = rows[("cpu", 33, window, mode)]
            assert row["status"] == "ok" and row["ms"] > 0 and 0 < row["err"] < 0.1
            pairs = softcap_flex.attended_pairs(33, window or 0) * 1 * 4  # batch 1, 4 query heads
            expected = 4 * 32 * pairs * (3.5 if mode == "fwd+bwd" else 1.0) / (row["ms"] * 1e-3) / 1e12
            assert row["tflops"] == pytest.approx(expected)
        flex = rows[("flex", 33, window, "fwd")]
        assert flex["status"] == "ok"
        assert rows[("cpu", 33, window, "fwd")]["vs_flex"] == pytest.approx(
            flex["ms"] / rows[("cpu", 33, window, "fwd")]["ms"]
        )
        assert rows[("flex", 33, window, "fwd+bwd")]["status"] == "skipped"
    assert data["meta"]["dry_run"] and "softcap=2" in data["meta"]["shape"] and "bfloat16" in data["meta"]["shape"]
    # The table of the saved run, as gpu_check.sh prints it last.
    capsys.readouterr()
    assert softcap_flex.main(["--from-json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| 33 |") for line in table) == 8 and any("skipped" in line for line in table)


def test_the_oracle_check_catches_a_backend_that_ignores_the_cap():
    _cpu_or_skip()
    args = softcap_flex.parse_args(["--device", "cpu", "--dry-run", "--dtype", "bfloat16", "--seqlens", "40"])
    sets = softcap_flex.make_sets(args, 40, 1)
    capped, _ = softcap_flex.make_call("cpu", args, 40, 24)
    assert softcap_flex.check(capped, args, sets, 40, 24) < 0.1

    def uncapped(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, window=(23, 0))

    with pytest.raises(AssertionError, match="output"):
        softcap_flex.check(uncapped, args, sets, 40, 24)


@pytest.mark.parametrize("seqlen, window", [(1, 0), (17, 0), (17, 5), (65, 64), (129, 17)])
def test_attended_pairs_count_the_allowed_set(seqlen, window):
    left = window - 1 if window else -1
    allowed = variants.allowed(seqlen, seqlen, left, 0, 0)
    assert softcap_flex.attended_pairs(seqlen, window) == int(allowed.sum())


def test_points_leave_out_windows_as_long_as_the_sequence():
    args = softcap_flex.parse_args(["--device", "cpu", "--seqlens", "4096,8192", "--window", "4096"])
    assert softcap_flex.points(args) == [
        dict(seqlen=4096, window=0),
        dict(seqlen=8192, window=0),
        dict(seqlen=8192, window=4096),
    ]
    assert args.batch == 2 and args.heads == 16 and args.kv_heads == 8 and args.head_dim == 256
    assert args.softcap == 50.0 and args.dtype == "bfloat16"
    assert softcap_flex.parse_args(["--device", "cpu", "--dry-run"]).dtype == "float16"  # the interpreter's bf16 dot
    with pytest.raises(SystemExit):
        softcap_flex.parse_args(["--device", "cpu", "--heads", "6", "--kv-heads", "4"])
    assert torch.get_default_dtype() == torch.float32  # the harness leaves global state alone

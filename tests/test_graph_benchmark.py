"""benchmarks/graph.py: a point runs and reports what the table needs; the table's ratios; the
end-to-end run (one fresh process per point) in the full selection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import graph as bench  # noqa: E402

TINY = {"nodes": 200, "edges": 1000, "in_channels": 8, "heads": 2, "channels": 4, "reps": 2, "threads": 0}


@pytest.mark.parametrize("library", ["fastattn", "pyg"])
def test_worker_reports_time_and_memory(library):
    if library == "pyg":
        pytest.importorskip("torch_geometric")
    r = bench.worker({"library": library, "layer": "gatv2", **TINY})
    for key in ("ms", "min_ms", "max_ms", "rss_growth_mb", "peak_rss_mb", "torch_peak_mb"):
        assert r[key] >= 0, (key, r)
    assert r["min_ms"] <= r["ms"] <= r["max_ms"]
    assert r["torch_peak_mb"] > 0


def test_table_ratios():
    common = {"min_ms": 1.0, "max_ms": 9.0, "peak_rss_mb": 900.0}
    results = [
        {"library": "pyg", "layer": "gatv2", "ms": 300.0, "rss_growth_mb": 1000.0, "torch_peak_mb": 800.0, **common},
        {"library": "fastattn", "layer": "gatv2", "ms": 100.0, "rss_growth_mb": 200.0, "torch_peak_mb": 80.0, **common},
    ]
    row = bench.table(results).splitlines()[2]
    assert "GATv2Conv" in row and "**3.0x**" in row and "**0.20**" in row and "| 0.10 |" in row


@pytest.mark.full
def test_end_to_end_in_fresh_processes(tmp_path):
    pytest.importorskip("torch_geometric")
    out = tmp_path / "r.json"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "threads"]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "graph.py"), *args, "--layers", "gat", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["library"], r["layer"]) for r in results} == {("pyg", "gat"), ("fastattn", "gat")}

"""The GPU run's own tooling, checked on the CPU: the tuned-table lookup, the suite's device record,
the summary table, and the tuner's and the GPU suite's flows as dry runs.

A GPU is lent rarely and briefly, so whatever can fail in these scripts must fail here first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn.backends.triton import bwd, fwd, tuning

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_record  # noqa: E402
import gpu_summary  # noqa: E402


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """An empty tuned-table folder in place of the package's."""
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(tuning, "_TABLES", {})
    monkeypatch.delenv("FASTATTN_TRITON_TUNED", raising=False)
    return tmp_path


def _write_table(folder: Path, arch: int, entries: dict) -> None:
    path = folder / tuning.table_path(arch).name
    path.write_text(json.dumps({"arch": arch, "entries": {k: {"config": v} for k, v in entries.items()}}))


def test_lookup_uses_the_table_of_this_arch_and_triton(table_dir):
    bwd_tiles = [[32, 64, 4, 2], [64, 32, 8, 1]]
    _write_table(table_dir, 90, {"fwd/bf16/d128/causal": [64, 128, 4, 3], "bwd/bf16/d128/none": bwd_tiles})
    assert tuning.lookup("fwd", 90, torch.bfloat16, 128, "causal") == (64, 128, 4, 3)
    assert tuning.lookup("fwd", 90, torch.float16, 128, "causal") == (64, 128, 4, 3)  # fp16 shares bf16's tiles
    assert tuning.lookup("fwd", 90, torch.bfloat16, 128, "none") is None  # not measured: the static choice
    assert tuning.lookup("fwd", 80, torch.bfloat16, 128, "causal") is None  # another arch's table is absent
    assert tuning.lookup("fwd", 90, torch.float32, 128, "causal") is None  # fp32 is never tuned
    assert tuning.lookup("fwd", None, torch.bfloat16, 128, "causal") is None  # the interpreter: static
    assert tuning.lookup("bwd", 90, torch.bfloat16, 128, "none") == ((32, 64, 4, 2), (64, 32, 8, 1))


def test_launchers_take_the_tuned_tiles(table_dir, monkeypatch):
    bwd_tiles = [[16, 64, 4, 1], [64, 32, 4, 1]]
    _write_table(table_dir, 90, {"fwd/bf16/d128/causal": [64, 128, 4, 3], "bwd/bf16/d64/mask": bwd_tiles})
    assert fwd.fwd_blocks(128, 128, torch.bfloat16, 90, False, -1, 0) == (64, 128)
    assert fwd.fwd_blocks(128, 128, torch.bfloat16, 90, False, -1, -1) == fwd.fwd_tiles(128, 128, torch.bfloat16, 90)
    assert bwd.bwd_config(64, 64, torch.bfloat16, 90, True, "mask") == ((16, 64, 4, 1), (64, 32, 4, 1))
    monkeypatch.setenv("FASTATTN_TRITON_TUNED", "0")
    assert fwd.fwd_blocks(128, 128, torch.bfloat16, 90, False, -1, 0) == fwd.fwd_tiles(128, 128, torch.bfloat16, 90)
    with tuning.override({"fwd/bf16/d128/causal": [128, 32, 8, 2]}):  # tune.py's candidates win over both
        assert fwd.fwd_blocks(128, 128, torch.bfloat16, 90, False, -1, 0) == (128, 32)
    assert fwd.fwd_blocks(128, 128, torch.bfloat16, 90, False, -1, 0) == fwd.fwd_tiles(128, 128, torch.bfloat16, 90)


def test_packed_launches_keep_the_static_tiles(table_dir):
    """The tuned tiles were timed and compile-checked on the dense kernels only: packed launches take the static
    choice with ``packed=True``, the one ``compile-check`` builds."""
    _write_table(table_dir, 90, {"fwd/bf16/d128/causal": [64, 128, 4, 3], "bwd/bf16/d64/mask": [[16, 64, 4, 1]] * 2})
    static = fwd.fwd_tiles(128, 128, torch.bfloat16, 90, packed=True)
    assert fwd.fwd_blocks(128, 128, torch.bfloat16, 90, False, -1, 0, packed=True) == static != (64, 128)
    packed = bwd.bwd_config(64, 64, torch.bfloat16, 90, True, "mask", packed=True)
    assert packed == bwd.bwd_config(64, 64, torch.bfloat16, 90, True, None, packed=True) != ((16, 64, 4, 1),) * 2


def test_family_of_a_launch():
    assert tuning.family(False, -1, -1) == "none"
    assert tuning.family(False, -1, 0) == "causal"
    assert tuning.family(False, 255, 0) == "window"
    assert tuning.family(True, -1, 0) == "mask"


def test_record_check_refuses_the_wrong_device():
    good = [json.dumps({"case": "a", "backend": "triton", "device": "cuda", "interpreted": False})]
    assert gpu_record.check(good, "cuda") == []
    assert gpu_record.check([], "cuda") == ["the record is empty: no GPU-suite case ran"]
    cpu = [json.dumps({"case": "a", "backend": "cuda", "device": "cpu", "interpreted": True})]
    problems = gpu_record.check(cpu, "cuda")
    assert len(problems) == 2 and "ran on cpu" in problems[0] and "interpreter" in problems[1]
    assert gpu_record.check(cpu, "cpu") == []


def test_summary_table_ratios(tmp_path):
    def row(backend, tflops, mode="fwd"):
        return {"backend": backend, "mode": mode, "dtype": "bfloat16", "head_dim": 128, "causal": False,
                "mask": "none", "seqlen": 4096, "status": "ok", "tflops": tflops}  # fmt: skip

    (tmp_path / "bench-main.json").write_text(
        json.dumps({"rows": [row("triton", 300.0), row("cuda", 200.0), row("flash", 250.0), row("cudnn", 400.0)]})
    )
    (tmp_path / "bench-tuned.json").write_text(json.dumps({"rows": [row("triton", 395.0)]}))
    lines = gpu_summary.table(gpu_summary.load(str(tmp_path)))
    assert lines[0].startswith("| mode | dtype | d | causal | L | triton | triton* | cuda | flash | cudnn |")
    assert "| 1.58x | 0.99x | 50% |" in lines[2]  # the best of ours (395) over FA2 (250), cuDNN (400), 790


def test_tuner_dry_run_writes_a_table(tmp_path):
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps({"candidates": {"sm90/fwd/bf16/d64/light": [[64, 32, 4, 2]]}}))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tune.py"), "--dry-run", "--out-dir", str(out), "--candidates",
         str(cands), "--head-dims", "64", "--families", "none", "--kinds", "fwd", "--jobs", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(next(out.glob("sm90-triton*.json")).read_text())
    entry = table["entries"]["fwd/fp16/d64/none"]
    assert entry["candidates"] == 1 and entry["rejected"] == [] and len(entry["config"]) == 4


def test_gpu_suite_dry_run_records_its_device(tmp_path):
    """The suite run as gpu-check runs it, on the CPU: every case says where it ran, and the check agrees."""
    record = tmp_path / "record.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    env.update(FASTATTN_TEST_DEVICE="cpu", FASTATTN_GPU_RECORD=str(record), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py"),
         "-k", "triton and (empty-rows or lse)"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = record.read_text().splitlines()
    assert len(lines) == 2 and gpu_record.check(lines, "cpu") == []
    assert gpu_record.check(lines, "cuda")  # the same record fails a GPU run's check


# ---------------------------------------------------------------------------- the preflight's spill ratchet

_DKDV_256 = "_ZN8fastattn8attn_bwd20attn_bwd_dkdv_kernelI13__nv_bfloat16Li256ELb0EEEvNS_13AttnBwdParams"
_DKDV_128 = "_ZN8fastattn8attn_bwd20attn_bwd_dkdv_kernelI13__nv_bfloat16Li128ELb0EEEvNS_13AttnBwdParams"


def _row(kernel: str, arch: str, spill: int) -> dict:
    return {"kernel": kernel, "arch": arch, "spill": spill}


def test_known_spills_file_covers_the_dkdv_256_spill_only():
    """The preflight's file: the one known kernel within its bytes passes strict mode, anything else fails."""
    from fastattn._ext import ci_check

    known = ci_check.load_known_spills(str(ROOT / "mk" / "known-spills.json"))
    ok_failures, ok_warnings = ci_check.spill_verdicts([_row(_DKDV_256, "sm_90", 68)], True, known)
    assert ok_failures == [] and any("known" in w for w in ok_warnings)
    for rows in (
        [_row(_DKDV_256, "sm_90", 69)],  # grew past its entry
        [_row(_DKDV_256, "sm_80", 8)],  # another arch
        [_row(_DKDV_128, "sm_90", 8)],  # another kernel
        [_row("_Z16test_gemm_kernelv", "sm_90", 4)],  # the test GEMM never spills
    ):
        failures, _ = ci_check.spill_verdicts(rows, True, known)
        assert len(failures) == 1, rows


def test_spill_verdicts_without_strict_warn_and_report_stale_entries():
    from fastattn._ext import ci_check

    known = [{"kernel": "attn_bwd_dkdv_kernel.*Li256E", "arch": "sm_90", "max_bytes": 68, "why": "test"}]
    failures, warnings = ci_check.spill_verdicts(
        [_row(_DKDV_128, "sm_90", 8), _row(_DKDV_256, "sm_90", 0)], False, known
    )
    assert failures == []
    assert any("spills 8 bytes" in w for w in warnings)
    assert any("no longer spills" in w for w in warnings)


def test_known_spills_entries_need_every_field(tmp_path):
    from fastattn._ext import ci_check

    path = tmp_path / "known.json"
    path.write_text(json.dumps([{"kernel": "x", "arch": "sm_90"}]))
    with pytest.raises(SystemExit, match="lacks"):
        ci_check.load_known_spills(str(path))

"""``load("cpu")``: a CPU-only library from C++ sources with the plain compiler (no CUDA toolkit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastattn import _ext

FIXTURE = Path(__file__).parent / "ext_fixtures" / "fixture_cpu_op.cpp"

pytestmark = pytest.mark.skipif(_ext._cxx() is None, reason="no C++ compiler")


def test_cpu_library_builds_once_loads_and_runs(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path))  # a fresh cache: this call must build
    path = _ext.load("cpu", sources=[FIXTURE])
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastattn: building the cpu extension (first use; cached in")
    assert Path(path).is_file() and Path(path).is_relative_to(tmp_path)
    x = torch.randn(10_000)
    torch.testing.assert_close(torch.ops.fastattn.ext_fixture_scale(x, 2.5), x * 2.5, rtol=0, atol=0)
    # cached: same library, nothing printed, nothing rebuilt
    assert _ext.load("cpu", sources=[FIXTURE]) == path
    assert _ext.build("cpu", sources=[FIXTURE]) == path
    assert _ext.library_path("cpu", sources=[FIXTURE]) == path
    assert capfd.readouterr().err == ""


def test_cpu_build_error_shows_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "bad_op.cpp"
    bad.write_text("int f() { return undefined_name; }\n")  # no torch headers: fails in a second
    with pytest.raises(RuntimeError, match=r"building the cpu extension failed(.|\n)*undefined_name"):
        _ext.build("cpu", sources=[bad])

"""A damaged build cache is rebuilt, never loaded: a truncated library would kill the process with SIGBUS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastattn import _ext

FIXTURE = Path(__file__).parent / "ext_fixtures" / "fixture_cpu_op.cpp"
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(_ext._cxx() is None, reason="no C++ compiler")

_LOAD_AND_RUN = """
    import torch
    from fastattn import _ext
    _ext.load("cpu", sources=[{fixture!r}])
    x = torch.randn(1000)
    assert torch.equal(torch.ops.fastattn.ext_fixture_scale(x, 2.0), x * 2.0)
    print("ran")
"""


def _load_in_child(cache: Path) -> subprocess.CompletedProcess:
    code = textwrap.dedent(_LOAD_AND_RUN.format(fixture=str(FIXTURE)))
    env = dict(os.environ, FASTATTN_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache folder for the module: the first build compiles, the repairs after each damage only relink."""
    return tmp_path_factory.mktemp("ext_cache")


def test_truncated_library_is_rebuilt_not_loaded(cache, monkeypatch, capfd):
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(cache))
    library = Path(_ext.build("cpu", sources=[FIXTURE]))
    record = json.loads(library.with_name("build.json").read_text())
    assert record["size"] == library.stat().st_size and len(record["sha256"]) == 64
    assert not list(library.parent.glob("*.tmp")), "the record is written by rename, no temporary left"
    capfd.readouterr()

    # What a build killed mid-link or a full disk leaves: the first half of the file.
    with open(library, "r+b") as f:
        f.truncate(record["size"] // 2)
    child = _load_in_child(cache)
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stderr[-3000:]}"
    assert child.stdout.strip() == "ran"
    lines = [line for line in child.stderr.splitlines() if line.startswith("fastattn:")]
    assert len(lines) == 1 and "is damaged" in lines[0] and "rebuilding it" in lines[0], child.stderr
    assert f"{record['size'] // 2} bytes, {record['size']} recorded" in lines[0]
    assert _ext._damage(library, library.with_name("build.json")) is None


def test_same_size_other_bytes_and_lost_record_are_rebuilt(cache, monkeypatch, capfd):
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(cache))
    library = Path(_ext.build("cpu", sources=[FIXTURE]))
    capfd.readouterr()
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    assert _ext.build("cpu", sources=[FIXTURE]) == str(library)
    assert "sha256 differs" in capfd.readouterr().err

    library.with_name("build.json").unlink()  # e.g. killed between the rename and the record
    _ext.build("cpu", sources=[FIXTURE])
    assert "build.json is missing or unreadable" in capfd.readouterr().err
    assert _ext.build("cpu", sources=[FIXTURE]) == str(library)  # intact now: nothing printed, nothing rebuilt
    assert capfd.readouterr().err == ""


def test_link_output_is_staged_and_renamed_into_place(cache, monkeypatch):
    """ninja links in the staging folder; the cache folder's library appears only by rename, when complete."""
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(cache))
    library = Path(_ext.build("cpu", sources=[FIXTURE], force=True))
    spec = _ext._Spec("cpu", sources=[FIXTURE])
    assert library == spec.library and (spec.staging / "build.ninja").is_file()
    assert not (spec.staging / library.name).exists()
    assert spec.damage() is None

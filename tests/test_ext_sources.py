"""fastattn._ext without building anything: source table, arch lists, toolchain discovery, errors."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from fastattn import _ext
from fastattn._ext import _sources
from fastattn._ext.cli import add_build_parser, resource_report

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8.0;9.0", ["8.0", "9.0"]),
        ("80,90", ["8.0", "9.0"]),
        ("sm_80 sm_90a", ["8.0", "9.0a"]),
        ("8.6+PTX", ["8.6+PTX"]),
        ("100", ["10.0"]),
        ("8.0;8.0", ["8.0"]),
    ],
)
def test_parse_arch_list(text, expected):
    assert _sources.parse_arch_list(text) == expected


def test_parse_arch_list_names_the_bad_token():
    with pytest.raises(ValueError, match="'ampere'"):
        _sources.parse_arch_list("8.0;ampere")


def test_gencode_flags():
    assert _sources.gencode_flags(["8.0", "9.0a", "8.6+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_86,code=compute_86",
    ]


def test_arch_list_order_of_precedence(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _ext.arch_list() == ["8.0", "9.0"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert _ext.arch_list() == ["8.6"]
    assert _ext.arch_list("sm_90") == ["9.0"]  # explicit wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    assert _ext.arch_list() == ["9.0"]  # the visible GPU wins over the environment


def test_source_table_is_a_glob(tmp_path, monkeypatch):
    """A new csrc/cuda/*.cu joins both CUDA builds, and changes the key, with no loader change."""
    root = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", root, ignore=shutil.ignore_patterns(".build"))
    monkeypatch.setenv("FASTATTN_CSRC", str(root))
    assert _sources.csrc_root() == root.resolve()
    before = _sources.sources_hash("cuda")
    assert root / "cuda" / "test_gemm.cu" in _sources.sources("cuda")
    (root / "cuda" / "attn_new.cu").write_text("// a new kernel\n")
    assert root / "cuda" / "attn_new.cu" in _sources.sources("cuda")
    assert root / "cuda" / "attn_new.cu" in _sources.sources("cuda_emulate")
    assert root / "emulate" / "emulate.cpp" in _sources.sources("cuda_emulate")
    assert _sources.sources_hash("cuda") != before
    # a header edit also changes the key
    h = _sources.sources_hash("cuda")
    (root / "cuda" / "primitives.cuh").write_text((root / "cuda" / "primitives.cuh").read_text() + "\n")
    assert _sources.sources_hash("cuda") != h
    # the cpu kind only sees csrc/cpu
    (root / "cpu").mkdir(exist_ok=True)
    (root / "cpu" / "a.cpp").write_text("")
    cpu = _sources.sources("cpu")
    assert root / "cpu" / "a.cpp" in cpu and all(p.parent == root / "cpu" and p.suffix == ".cpp" for p in cpu)


def test_bad_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of 'cuda', 'cuda_emulate', 'cpu', got 'gpu'"):
        _ext.unavailable_reason("gpu")


def _fake_toolkit(tmp_path: Path) -> Path:
    home = tmp_path / "cuda-13.0"
    (home / "bin").mkdir(parents=True)
    (home / "lib64").mkdir()
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "bin" / "nvcc").chmod(0o755)
    (home / "lib64" / "libcudart.so").write_text("")
    return home


def test_cuda_home_found_behind_a_wrapper_script(tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path)
    wrapper_dir = tmp_path / "wrapper"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}/usr/bin:/bin")
    assert _ext.find_cuda_home() == str(home.resolve())
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert _ext.find_cuda_home() == str(home.resolve())


def test_missing_nvcc_says_what_to_install(monkeypatch):
    monkeypatch.setattr(_ext, "find_cuda_home", lambda: None)
    reason = _ext.unavailable_reason("cuda")
    if reason is not None and "CPU-only build" in reason:
        pytest.skip("torch here is a CPU-only build")
    assert reason is not None and "nvcc" in reason and "CUDA_HOME" in reason
    with pytest.raises(RuntimeError, match="cannot build the cuda extension: nvcc not found"):
        _ext.build("cuda")


def test_missing_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setattr(_ext, "_cxx", lambda: None)
    for kind in ("cuda_emulate", "cpu"):
        assert "C++ compiler" in _ext.unavailable_reason(kind)


def test_cuda_kind_follows_the_environment(monkeypatch):
    monkeypatch.delenv("FASTATTN_CUDA_EMULATE", raising=False)
    assert _ext.cuda_kind() == "cuda"
    monkeypatch.setenv("FASTATTN_CUDA_EMULATE", "1")
    assert _ext.cuda_kind() == "cuda_emulate"
    monkeypatch.setenv("FASTATTN_CUDA_EMULATE", "0")
    assert _ext.cuda_kind() == "cuda"


def test_library_path_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path))  # nothing is built in an empty cache
    fixture = REPO / "tests" / "ext_fixtures" / "fixture_cpu_op.cpp"
    with pytest.raises(FileNotFoundError, match="fastattn build"):
        _ext.library_path("cpu", sources=[fixture])


def test_build_parser_and_resource_report():
    import argparse

    parser = argparse.ArgumentParser()
    add_build_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build", "--verbose", "--arch", "9.0"])
    assert args.verbose and args.arch == "9.0" and args.func.__name__ == "run_build"
    log = (
        "[1/3] nvcc ...\n"
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers\n"
        "[2/3] c++ ...\n"
    )
    report = resource_report(log)
    assert len(report) == 4 and report[-1].startswith("ptxas info    : Used 40 registers")


def test_old_builds_are_pruned(tmp_path):
    """Each source edit makes a new cache folder; only the newest few completed builds per kind stay."""
    import types

    def folder(name, mtime=None):
        d = tmp_path / name
        d.mkdir()
        if mtime is not None:
            (d / "build.json").write_text("{}")
            os.utime(d / "build.json", (mtime, mtime))
        return d

    old = [folder(f"cuda-{i:04d}", 1000 + i) for i in range(6)]
    in_progress = folder("cuda-busy")  # no build.json: a build running elsewhere
    other_kind = folder("cuda_emulate-0000", 1)
    current = folder("cuda-current", 5000)
    _ext._prune(types.SimpleNamespace(kind="cuda", build_dir=current))
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(["cuda-current", "cuda-0005", "cuda-0004", "cuda-0003", "cuda-busy", "cuda_emulate-0000"])
    assert in_progress.exists() and other_kind.exists() and not old[0].exists()

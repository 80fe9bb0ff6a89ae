"""Shared by the CUDA kernel tests: the emulator fixture and the nvcc SASS audit of one kernel source."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fastattn import _ext
from fastattn.backends import cuda_bwd


@pytest.fixture(scope="module", autouse=True)
def emulate():
    """The module's ops run the kernel source on CPU tensors (the emulator), in the default fiber order."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_CUDA_EMULATE", "1")
        mp.delenv("FASTATTN_EMULATE_ORDER", raising=False)
        cuda_bwd._ensure_loaded()  # the one library, forward and backward ops registered
        yield


def sass_audit(tmp_path: Path, source: str, kernel: str) -> list[dict]:
    """nvcc (compile only, sm_80 and sm_90) of ``csrc/cuda/<source>``: asserts that every kernel whose name
    contains ``kernel`` has HMMA, LDSM and LDGSTS in its SASS and no spills; returns its ptxas rows."""
    from fastattn._ext import _sources, ci_check

    home = _ext.find_cuda_home()
    cuobjdump = ci_check.find_cuobjdump(home)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found")
    root = _sources.csrc_root()
    obj = tmp_path / (Path(source).stem + ".o")
    cmd = [str(Path(home) / "bin" / "nvcc"), "-std=c++17", "-O3", "-Xptxas=-v", "--expt-relaxed-constexpr"]
    cmd += [f"-I{root}", "-c", *_sources.gencode_flags(["8.0", "9.0"]), str(root / "cuda" / source), "-o", str(obj)]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [r for r in ci_check.parse_ptxas(log.stdout + log.stderr) if kernel in r["kernel"]]
    assert rows, f"ptxas reported no {kernel} in {source}"
    assert not [r for r in rows if r["spill"]], [(r["kernel"], r["arch"], r["spill"]) for r in rows if r["spill"]]
    kernels = {key: c for key, c in ci_check.sass_counts(cuobjdump, str(obj)).items() if kernel in key[0]}
    assert len(kernels) == len(rows)
    for (name, arch), c in kernels.items():
        assert c["HMMA"] > 0 and c["LDSM"] > 0 and c["LDGSTS"] > 0, (name, arch, c)
    return rows

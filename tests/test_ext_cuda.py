"""The real nvcc build of the CUDA backend's library (compile and link work without a GPU).

Loaded in child processes: a process holds either this library or the emulated one (same op names).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn import _ext
from fastattn._ext.cli import run_build

_REASON = _ext.unavailable_reason("cuda")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=600)


def test_fastattn_build_verbose_shows_resource_report(capsys):
    args = argparse.Namespace(kind="cuda", arch="8.0;9.0", verbose=True, force=False)
    assert run_build(args) == 0
    out = capsys.readouterr().out
    assert "gemm_kernel" in out and "sm_80" in out and "sm_90" in out
    assert "registers" in out and "0 bytes spill stores, 0 bytes spill loads" in out
    assert "cuda extension: " in out
    assert Path(_ext.library_path("cuda", arch="8.0;9.0")).is_file()


def test_cpu_tensors_get_a_clear_error():
    proc = run_python(
        "import torch\n"
        "from fastattn import _ext\n"
        "_ext.load('cuda')\n"
        "print(torch.ops.fastattn.cuda_ext_info())\n"
        "a = torch.randn(64, 32, dtype=torch.float16)\n"
        "try:\n"
        "    torch.ops.fastattn.cuda_test_gemm(a, a.t().contiguous())\n"
        "except RuntimeError as e:\n"
        "    print(str(e).splitlines()[0])\n",
        TORCH_CUDA_ARCH_LIST="8.0;9.0",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "cuda"
    assert "fastattn::cuda_test_gemm: argument 'a' must be a CUDA tensor, got a tensor on cpu" in lines[1]
    assert "FASTATTN_CUDA_EMULATE=1" in lines[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_the_emulator(tmp_path):
    """On a GPU: the hardware and the emulator run the same kernel source to the same answer."""
    script = (
        "import sys, torch\n"
        "from fastattn import _ext\n"
        "_ext.load(_ext.cuda_kind())\n"
        "a, b = torch.load(sys.argv[1])\n"
        "dev = 'cpu' if _ext.cuda_kind() == 'cuda_emulate' else 'cuda'\n"
        "c = torch.ops.fastattn.cuda_test_gemm(a.to(dev), b.to(dev)).cpu()\n"
        "torch.save(c, sys.argv[2])\n"
    )
    inputs = tmp_path / "ab.pt"
    results = {}
    for dtype in (torch.float16, torch.bfloat16):
        a, b = torch.randn(256, 192, dtype=dtype), torch.randn(192, 128, dtype=dtype)
        torch.save((a, b), inputs)
        for kind, emulate in (("gpu", "0"), ("emulated", "1")):
            out = tmp_path / f"{kind}.pt"
            env = {**os.environ, "PYTHONPATH": str(REPO), "FASTATTN_CUDA_EMULATE": emulate}
            proc = subprocess.run(
                [sys.executable, "-c", script, str(inputs), str(out)], capture_output=True, text=True, env=env
            )
            assert proc.returncode == 0, proc.stderr
            results[kind] = torch.load(out)
        ref = a.double() @ b.double()
        bound = 1e-5 * (a.double().abs() @ b.double().abs())
        for kind, c in results.items():
            assert ((c.double() - ref).abs() <= bound).all(), kind
        torch.testing.assert_close(results["gpu"], results["emulated"], rtol=1e-5, atol=1e-5)

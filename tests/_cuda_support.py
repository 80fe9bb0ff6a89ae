"""Shared by the CUDA kernel tests: the emulator fixture and the nvcc SASS audit of one kernel source."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from fastattn import _ext
from fastattn.backends import cuda as cuda_backend
from fastattn.params import AttnParams


@pytest.fixture(scope="module", autouse=True)
def emulate():
    """The module's ops run the kernel source on CPU tensors (the emulator), in the default fiber order."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_CUDA_EMULATE", "1")
        mp.delenv("FASTATTN_EMULATE_ORDER", raising=False)
        cuda_backend._ensure_loaded()  # the one library, forward and backward ops registered
        yield


def sass_audit(tmp_path: Path, source: str, kernel: str, known_spills: bool = False) -> list[dict]:
    """nvcc (compile only, sm_80 and sm_90) of ``csrc/cuda/<source>``: asserts that every kernel whose name
    contains ``kernel`` has HMMA, LDSM and LDGSTS in its SASS and no spills (with ``known_spills``: none beyond
    mk/known-spills.json's named entries, as ``ci_check --known-spills``); returns its ptxas rows."""
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
    known_file = Path(__file__).resolve().parents[1] / "mk" / "known-spills.json"
    known = ci_check.load_known_spills(str(known_file)) if known_spills else []
    failures, _ = ci_check.spill_verdicts(rows, True, known)
    assert not failures, failures
    kernels = {key: c for key, c in ci_check.sass_counts(cuobjdump, str(obj)).items() if kernel in key[0]}
    assert len(kernels) == len(rows)
    for (name, arch), c in kernels.items():
        assert c["HMMA"] > 0 and c["LDSM"] > 0 and c["LDGSTS"] > 0, (name, arch, c)
    return rows


def params_for(seqlen_q: int, seqlen_k: int, mask=None, heads: int = 2, batch: int = 1, **kw) -> AttnParams:
    """AttnParams of a ``(batch, heads, Lq, 32) x (batch, heads, Lk, 32)`` call (for tile summaries in tests)."""
    q, k = torch.empty(batch, heads, seqlen_q, 32), torch.empty(batch, heads, seqlen_k, 32)
    return AttnParams.for_tensors(q, k, k, 1.0, mask=mask, **kw)


def fwd_args(q, k, v, mask=None, summary=(), philox=None, scale=1.0, dropout_p=0.0, left=-1, right=-1, q_offset=0,
             chunk=0, softcap=0.0, alibi=None, sinks=None, blocks=None) -> tuple:  # fmt: skip
    """The arguments of ``fastattn::cuda_attn_fwd`` (the registry's order), with defaults for a plain call."""
    blocks = list(blocks or (cuda_backend.BLOCK_M, cuda_backend.block_n(q.shape[-1])))
    variant = [float(x) for x in (left, right, q_offset, chunk, softcap)]
    return (q, k, v, mask, alibi, sinks, list(summary), philox, scale, dropout_p, variant, blocks)


def bwd_args(grad_out, q, k, v, out, lse, mask=None, summary=(), philox=None, scale=1.0, dropout_p=0.0, left=-1,
             right=-1, q_offset=0, chunk=0, softcap=0.0, alibi=None, need_mask_grad=False,
             blocks=None) -> tuple:  # fmt: skip
    """The arguments of ``fastattn::cuda_attn_bwd`` (the registry's order), with defaults for a plain call."""
    blocks = list(blocks or (cuda_backend.BLOCK_M_DQ, cuda_backend.BLOCK_N, cuda_backend.BLOCK_M_KV))
    variant = [float(x) for x in (left, right, q_offset, chunk, softcap)]
    return (grad_out, q, k, v, out, lse, mask, alibi, list(summary), philox, scale, dropout_p, variant, blocks,
            need_mask_grad)  # fmt: skip

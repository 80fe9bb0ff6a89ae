"""Counter-based dropout for the Triton kernels: forward draws, backward regenerates, nothing is stored.

Contract (fixed; the forward and backward kernels both rely on it, do not change one side alone):

* ``philox`` is an int64 tensor of shape ``(2,)`` on the inputs' device: ``[seed, offset]``. It is
  drawn by ``philox_seed_offset(device)`` from torch's default generator for that device (so
  ``torch.manual_seed`` makes dropout reproducible) with ``torch.randint`` on the device: no host
  sync, capturable in a CUDA graph. The forward returns it as ``saved = (philox,)``; backward
  receives the same tuple.
* Kernels read it with ``seed = tl.load(philox_ptr)``, ``offset = tl.load(philox_ptr + 1)``.
* The random number of the score at (query head ``bh = b * Hq + h``, query row ``i``, key ``j``) is
  ``tl.rand(seed, offset + (bh * Lq + i) * Lk + j)`` with the element offset computed in int64
  (``tl.rand`` feeds both 32-bit halves to Philox), where ``Lq``/``Lk`` are the call's sequence
  lengths and ``Hq`` the number of query heads. The element is kept iff that number ``>= p``.
  The index is independent of block sizes, launch order and GQA grouping, so any kernel tiling
  regenerates the same mask.
* A kept probability is scaled by ``1 / (1 - p)``; the log-sum-exp never includes dropout
  (as in ``fastattn.reference.attention_forward``).

``dropout_keep`` is the one ``@triton.jit`` helper that implements this (``dropout_keep_t`` is its
transpose, for the backward's key-major tiles); ``dropout_keep_mask`` materialises the mask
(``(B, Hq, Lq, Lk)`` bool) for tests and debugging only. The CUDA backend implements the same contract
bit for bit (``csrc/cuda/dropout.cuh``; its mask: ``fastattn.backends.cuda.dropout_keep_mask``), so
either backend's backward replays the other's forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._philox import philox_seed_offset
from ._compat import fix_interpreter_index

fix_interpreter_index()  # before any kernel of this module launches (it imports no other kernel module)

__all__ = ["dropout_keep", "dropout_keep_t", "dropout_keep_mask", "philox_seed_offset"]


@triton.jit
def dropout_keep(philox_ptr, bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p):
    """Keep-mask ``(len(offs_m), len(offs_n))`` of query head ``bh`` for rows ``offs_m``, keys ``offs_n``."""
    seed = tl.load(philox_ptr)
    offset = tl.load(philox_ptr + 1)
    row = bh.to(tl.int64) * seqlen_q + offs_m.to(tl.int64)
    elem = offset + row[:, None] * seqlen_k + offs_n.to(tl.int64)[None, :]
    return tl.rand(seed, elem) >= dropout_p


@triton.jit
def dropout_keep_t(philox_ptr, bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p):
    """``dropout_keep`` transposed, ``(len(offs_n), len(offs_m))``: the same numbers, keys as rows."""
    seed = tl.load(philox_ptr)
    offset = tl.load(philox_ptr + 1)
    row = bh.to(tl.int64) * seqlen_q + offs_m.to(tl.int64)
    elem = offset + row[None, :] * seqlen_k + offs_n.to(tl.int64)[:, None]
    return tl.rand(seed, elem) >= dropout_p


@triton.jit
def _dropout_keep_mask_kernel(
    philox_ptr, out_ptr, seqlen_q, seqlen_k, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = out_ptr + bh.to(tl.int64) * seqlen_q * seqlen_k
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(philox_ptr, bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
        ptrs = base + offs_m[:, None].to(tl.int64) * seqlen_k + offs_n[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


def dropout_keep_mask(philox: Tensor, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, p: float) -> Tensor:
    """The keep-mask the kernels apply, materialised as ``(B, Hq, Lq, Lk)`` bool (tests/debugging only)."""
    out = torch.empty(batch, heads_q, seqlen_q, seqlen_k, dtype=torch.int8, device=philox.device)
    block_m, block_n = 16, 32
    grid = (triton.cdiv(seqlen_q, block_m), batch * heads_q)
    _dropout_keep_mask_kernel[grid](philox, out, seqlen_q, seqlen_k, float(p), BLOCK_M=block_m, BLOCK_N=block_n)
    return out.bool()

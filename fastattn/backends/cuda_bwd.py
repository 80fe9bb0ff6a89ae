"""The CUDA backend's backward: hand-written FlashAttention-2-style kernels, deterministic.

Kernels ``attn_bwd_preprocess_kernel``, ``attn_bwd_dkdv_kernel``, ``attn_bwd_dq_kernel``
(``csrc/cuda/attn_bwd.cu``, design note at its top) → op ``fastattn::cuda_attn_bwd``
(``csrc/attn_bwd_ops.cpp``) → :func:`attn_bwd`, with the Triton backward's contract. Importing this
module is cheap and never fails: the extension is built (shared with the forward, ``fastattn._ext``)
and the op's fake registered on first use. ``FASTATTN_CUDA_EMULATE=1`` runs the same kernel source
on CPU tensors through the emulator (slow; for tests without a GPU).

The gradient of a float mask (``need_mask_grad``, a learned bias) is ``dS``, the scores' gradient, written
``(B, Hq, Lq, Lk)`` in the mask's dtype by the dQ pass (zeros in the tiles it skips); autograd then reduces
it over the mask's broadcast dims. Head dims 32, 64, 96, 128 and 256 (the forward's): at 256 both passes split
the head dim between pairs of warps (design note). Dropout regenerates the forward's keep-mask from
``saved = (philox,)`` (the Triton backend's contract, ``csrc/cuda/dropout.cuh``), in both passes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..masks import MaskSpec, TileSummary

__all__ = ["attn_bwd", "HEAD_DIMS", "BLOCK_N", "BLOCK_M_KV", "BLOCK_M_DQ"]

BLOCK_N = 64  # keys per tile (csrc/cuda/attn_bwd_params.h: attn_bwd::kBlockN)
BLOCK_M_KV = 32  # query rows streamed past the dK/dV pass (kBlockMkv)
BLOCK_M_DQ = 64  # query rows resident in the dQ pass (kBlockMdq)
HEAD_DIMS = (32, 64, 96, 128, 256)  # instantiated head dims (kHeadDims)
_DTYPES = (torch.float16, torch.bfloat16)

_fake_registered = False


def _ensure_loaded() -> None:
    """Build (first use, cached) and load the extension of the current kind, then register the fake."""
    global _fake_registered
    from . import cuda

    cuda._ensure_loaded()  # one library for forward and backward: builds/loads it for this kind
    if not _fake_registered:
        torch.library.register_fake("fastattn::cuda_attn_bwd")(_cuda_attn_bwd_fake)
        _fake_registered = True


def _cuda_attn_bwd_fake(grad_out, q, k, v, out, lse, mask, kv_state, kv_count, kv_index, q_state, q_count, q_index,
                        scale, window_left, window_right, q_offset, need_mask_grad=False, philox=None,
                        dropout_p=0.0):  # fmt: skip
    if need_mask_grad:
        dmask = q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=mask.dtype)
    else:
        dmask = q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def summaries(spec: MaskSpec) -> tuple[Optional[Tensor], ...]:
    """``(kv_state, kv_count, kv_index, q_state, q_count, q_index)`` for a mask tensor, else six Nones.

    The dQ pass walks the summary for ``(BLOCK_M_DQ, BLOCK_N)``; the dK/dV pass walks the transpose of the
    one for ``(BLOCK_M_KV, BLOCK_N)``: per key tile, its non-empty query tiles (``(Bm, Hm, nK, nQ)``).
    """
    if spec.tensor is None:
        return (None,) * 6
    if torch.compiler.is_compiling():  # writing the spec's cache is a side effect Dynamo refuses
        spec = dataclasses.replace(spec, _cache={})
    s_dq = spec.tile_summary(BLOCK_M_DQ, BLOCK_N)
    s_kv = spec.tile_summary(BLOCK_M_KV, BLOCK_N)
    t = TileSummary.from_state(BLOCK_N, BLOCK_M_KV, s_kv.state.transpose(-1, -2).contiguous())
    return s_dq.state, s_dq.kv_count, s_dq.kv_index, t.state, t.kv_count, t.kv_index


def unsupported_reason(q: Tensor, v: Tensor, dropout_p: float, need_mask_grad: bool) -> Optional[str]:
    """Why the CUDA backward cannot run this problem, or None (``need_mask_grad`` and dropout are supported)."""
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not supported (torch.float16 or torch.bfloat16)"
    if q.shape[-1] not in HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return (
            f"head dims (q {q.shape[-1]}, v {v.shape[-1]}) are not supported: both must be one of "
            f"{', '.join(map(str, HEAD_DIMS))}"
        )
    return None


def attn_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    spec: MaskSpec,
    scale: float,
    dropout_p: float,
    saved: tuple[Tensor, ...],
    need_mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, dmask or None)`` from the forward's ``(out, lse)``: the Triton backward's contract.

    ``saved``: ``(philox,)`` from the forward (CUDA's or Triton's: one keep-mask contract) when ``dropout_p > 0``.

    ``dmask`` only when ``need_mask_grad`` (a float mask): ``(B, Hq, Lq, Lk)`` in the mask's dtype.

    Only the lse format matters (natural log, ``(B, Hq, Lq)``, -inf for a row that attends nothing; cast
    to fp32 here), not which forward produced it. Deterministic: bit-identical run to run.
    """
    reason = unsupported_reason(q, v, dropout_p, need_mask_grad)
    if reason is not None:
        raise NotImplementedError(f"fastattn CUDA backward: {reason}")
    if need_mask_grad and (spec.tensor is None or not spec.tensor.dtype.is_floating_point):
        got = "no mask" if spec.tensor is None else f"a {spec.tensor.dtype} mask"
        raise ValueError(f"need_mask_grad: expected a floating attn_mask to differentiate, got {got}")
    philox = None
    if dropout_p > 0.0:
        if len(saved) != 1 or saved[0].dtype != torch.int64 or saved[0].shape != (2,):
            got = [(tuple(t.shape), t.dtype) for t in saved]
            raise ValueError(
                f"saved: expected (philox,), the forward's int64 [seed, offset] tensor, when dropout_p > 0, got {got}"
            )
        (philox,) = saved
    _ensure_loaded()
    left, right = spec.bounds
    dq, dk, dv, dmask = torch.ops.fastattn.cuda_attn_bwd(
        grad_out, q, k, v, out, lse.float(), spec.tensor, *summaries(spec), float(scale), left, right, spec.q_offset,
        bool(need_mask_grad), philox, float(dropout_p),
    )  # fmt: skip
    return dq, dk, dv, (dmask if need_mask_grad else None)

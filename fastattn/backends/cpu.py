"""The native CPU backend (``backend="cpu"``): fused, tiled, multi-threaded attention in C++.

The ops ``fastattn::cpu_attn_fwd`` / ``fastattn::cpu_attn_bwd`` live in ``csrc/cpu`` (design note in
``csrc/cpu/attn_cpu_kernel.h``), a library of their own built with the plain C++ compiler by
``fastattn._ext.load("cpu")`` on first use (one line on stderr says so; the build is cached). Importing
this module is cheap: nothing is built or loaded until a call needs it.

Masks reach the kernel as the band ``(left, right, q_offset)`` plus the broadcast mask view, read
through its strides. The per-tile states that drive tile skipping are built inside the op by one
pass over the mask's own elements (much cheaper than ``MaskSpec.tile_summary``'s generic reductions
at long lengths); a ``fastattn.Mask``'s cached summary is passed in instead, so reused masks are never
scanned again.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validate import Problem
from ..masks import MaskSpec
from .registry import Backend, register

__all__ = ["CPUBackend", "block_sizes", "load"]

_LOADED = False
_LOAD_ERROR: Optional[str] = None


def load() -> None:
    """Build (if needed) and load the CPU library, and register the ops' fake implementations."""
    global _LOADED, _LOAD_ERROR
    if _LOADED:
        return
    from .. import _ext

    try:
        _ext.load("cpu")
    except Exception as exc:  # a failed build: remember why, for unavailable_reason
        _LOAD_ERROR = f"building the CPU extension failed: {exc}"
        raise
    _register_fakes()
    _LOADED = True


def _register_fakes() -> None:
    @torch.library.register_fake("fastattn::cpu_attn_fwd")
    def _fwd_fake(q, k, v, mask, tile_state, block_q, block_k, scale, window_left, window_right, q_offset):
        out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        return out, q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("fastattn::cpu_attn_bwd")
    def _bwd_fake(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        mask,
        tile_state,
        block_q,
        block_k,
        scale,
        window_left,
        window_right,
        q_offset,
        need_mask_grad,
    ):
        if need_mask_grad:
            dmask = q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.float32)
        else:
            dmask = q.new_empty(0, dtype=torch.float32)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def block_sizes(spec: MaskSpec, seqlen_k: int) -> tuple[int, int]:
    """``(BQ, BK)``: small key tiles where a mask or band can skip them, longer ones when dense."""
    if spec.tensor is not None or spec.has_band:
        return 64, 64
    return 64, 256 if seqlen_k >= 256 else 64


def _mask_args(spec: MaskSpec, block_q: int, block_k: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The mask (bool or float32, broadcast dims kept at size 1) and a cached tile state, if any."""
    if spec.base is None:
        return None, None
    base = spec.base
    if base.dtype != torch.bool and base.dtype != torch.float32:
        base = base.to(torch.float32)  # the mask's own size, never Lq x Lk per head
    state = None
    if spec.mask_obj is not None:
        state = spec.tile_summary(block_q, block_k).state
    return base, state


class CPUBackend(Backend):
    name = "cpu"
    description = "native C++ kernels: tiled, at::vec + oneDNN brgemm, multi-threaded, tile skipping (fp32, bf16)"

    def unavailable_reason(self) -> Optional[str]:
        if _LOADED:
            return None
        if _LOAD_ERROR:
            return _LOAD_ERROR
        from .. import _ext

        return _ext.unavailable_reason("cpu")

    def unsupported_reason(self, problem: Problem, spec: MaskSpec, dropout_p: float) -> Optional[str]:
        if problem.device.type != "cpu":
            return f"it runs on CPU tensors only, got device {problem.device}"
        if problem.dtype not in (torch.float32, torch.bfloat16):
            return f"it supports float32 and bfloat16, got {problem.dtype}"
        if dropout_p > 0.0:
            return "it has no dropout (dropout_p > 0): use backend='reference' or dropout_p=0"
        return None

    def forward(self, q, k, v, spec, scale, dropout_p):
        load()
        block_q, block_k = block_sizes(spec, k.shape[2])
        mask, state = _mask_args(spec, block_q, block_k)
        left, right = spec.bounds
        out, lse = torch.ops.fastattn.cpu_attn_fwd(
            q, k, v, mask, state, block_q, block_k, float(scale), left, right, spec.q_offset
        )
        return out, lse, ()

    def backward(self, grad_out, q, k, v, out, lse, spec, scale, dropout_p, saved, need_mask_grad):
        load()
        block_q, block_k = 64, 64
        mask, state = _mask_args(spec, block_q, block_k)
        left, right = spec.bounds
        dq, dk, dv, dmask = torch.ops.fastattn.cpu_attn_bwd(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            mask,
            state,
            block_q,
            block_k,
            float(scale),
            left,
            right,
            spec.q_offset,
            bool(need_mask_grad),
        )
        if not need_mask_grad:
            return dq, dk, dv, None
        if spec.tensor is not None and spec.tensor.dtype.is_floating_point:
            dmask = dmask.to(spec.tensor.dtype)
        return dq, dk, dv, dmask


register(CPUBackend())

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

Dropout follows the GPU backends' contract (``fastattn/backends/triton/dropout.py``) bit for bit
(``csrc/cpu/attn_cpu_dropout.h``): the forward draws ``philox = [seed, offset]`` from torch's CPU
generator and returns ``saved = (philox,)``; the backward regenerates the keep-mask from it, so nothing
of size Lq x Lk is stored and one torch seed gives the same mask on every backend.

``torch.compile`` cannot build or load a library while it traces, so an already built library is
loaded when this module is imported (:func:`_load_if_built`): a compiled model then finds the ops
registered. Only before the first build does a compiled call see the backend unavailable (one eager
call, or ``fastattn build --kind cpu``, builds it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validate import Problem
from ..masks import MaskSpec
from .registry import Backend, register

__all__ = ["CPUBackend", "block_sizes", "load", "dropout_keep_mask"]

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


def _load_if_built() -> None:
    """Load the CPU library at import when it is already built and intact (cheap; never builds, never raises)."""
    global _LOADED
    from .. import _ext

    try:
        if _ext.unavailable_reason("cpu") is None and _ext.cached_library("cpu") is not None:
            _ext.load("cpu")
            _register_fakes()
            _LOADED = True
    except Exception:  # whatever failed here fails again, with its message, on the first call
        pass


def _register_fakes() -> None:
    @torch.library.register_fake("fastattn::cpu_attn_fwd")
    def _fwd_fake(
        q, k, v, mask, tile_state, block_q, block_k, scale, window_left, window_right, q_offset, philox=None,
        dropout_p=0.0,
    ):  # fmt: skip
        out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
        return out, q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("fastattn::cpu_dropout_keep_mask")
    def _keep_fake(philox, batch, heads_q, seqlen_q, seqlen_k, dropout_p):
        return philox.new_empty((batch, heads_q, seqlen_q, seqlen_k), dtype=torch.uint8)

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
        philox=None,
        dropout_p=0.0,
    ):
        if need_mask_grad:
            dmask = q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.float32)
        else:
            dmask = q.new_empty(0, dtype=torch.float32)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def dropout_keep_mask(philox: Tensor, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, p: float) -> Tensor:
    """The keep-mask the CPU kernels apply, ``(B, Hq, Lq, Lk)`` bool (``fastattn::cpu_dropout_keep_mask``).

    Same arguments and result as the Triton and CUDA backends' ``dropout_keep_mask``; the attention kernels
    never materialise it (tests, and replaying a forward with an explicit mask).
    """
    load()
    return torch.ops.fastattn.cpu_dropout_keep_mask(philox, batch, heads_q, seqlen_q, seqlen_k, float(p)).bool()


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
    description = (
        "native C++ kernels: tiled, at::vec + oneDNN brgemm, multi-threaded, tile skipping, dropout with the "
        "GPU backends' Philox stream (fp32, bf16)"
    )
    slow_cases = (
        "CPU tensors in float16 or float64: cast them to float32 or bfloat16",
        "before the CPU library is built, calls under torch.compile: run `fastattn build --kind cpu` or one eager call",
        "no C++ compiler or ninja: install them (apt-get install g++; pip install ninja)",
    )

    def unavailable_reason(self) -> Optional[str]:
        if _LOADED:
            return None
        if _LOAD_ERROR:
            return _LOAD_ERROR
        if torch.compiler.is_compiling():  # nothing may touch the file system while torch.compile traces
            return (
                "its library is not built yet, and a call under torch.compile cannot build it: run "
                "`fastattn build --kind cpu` or one eager call first"
            )
        from .. import _ext

        return _ext.unavailable_reason("cpu")

    def unsupported_reason(self, problem: Problem, spec: MaskSpec, dropout_p: float) -> Optional[str]:
        if problem.device.type != "cpu":
            return f"it runs on CPU tensors only, got device {problem.device}"
        if problem.dtype not in (torch.float32, torch.bfloat16):
            return (
                f"it supports float32 and bfloat16, got {problem.dtype}: cast the inputs with .float() or .bfloat16()"
            )
        return None

    def forward(self, q, k, v, spec, scale, dropout_p):
        from ._philox import philox_seed_offset

        load()
        block_q, block_k = block_sizes(spec, k.shape[2])
        mask, state = _mask_args(spec, block_q, block_k)
        left, right = spec.bounds
        philox = philox_seed_offset(q.device) if dropout_p > 0.0 else None
        out, lse = torch.ops.fastattn.cpu_attn_fwd(
            q, k, v, mask, state, block_q, block_k, float(scale), left, right, spec.q_offset, philox, float(dropout_p)
        )
        return out, lse, (() if philox is None else (philox,))

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
            saved[0] if dropout_p > 0.0 else None,
            float(dropout_p),
        )
        if not need_mask_grad:
            return dq, dk, dv, None
        if spec.tensor is not None and spec.tensor.dtype.is_floating_point:
            dmask = dmask.to(spec.tensor.dtype)
        return dq, dk, dv, dmask


register(CPUBackend())
_load_if_built()

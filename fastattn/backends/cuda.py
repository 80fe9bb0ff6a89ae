"""The CUDA backend (``backend="cuda"``): the hand-written FlashAttention-2-style forward kernel.

Kernel ``attn_fwd_kernel`` (``csrc/cuda/attn_fwd.cu``, design note at its top) → op
``fastattn::cuda_attn_fwd`` (``csrc/attn_ops.cpp``) → :class:`CudaBackend` → the shared
``AttentionFunction``. Importing this module is cheap and never fails: the extension is built
(``fastattn._ext.load``) and its fake implementation registered on first use. With
``FASTATTN_CUDA_EMULATE=1`` the same kernel source runs on CPU tensors through the emulator
(``load("cuda_emulate")``, slow; for tests on machines without a GPU).

Backward: the CUDA backward kernels (``cuda_bwd``); where they cannot run, the Triton backend's
kernels on CUDA tensors when Triton can run, else the float64-capable reference backend (always on
CPU tensors under emulation). All take the forward's ``(out, lse)`` as they are.

Dropout follows the Triton backend's contract (``fastattn/backends/triton/dropout.py``), implemented
bit for bit in ``csrc/cuda/dropout.cuh``: the forward draws ``philox = [seed, offset]`` on the device
and returns ``saved = (philox,)``; the CUDA and Triton backwards regenerate the keep-mask from it, and
for the reference backward (which replays an explicit mask) it is materialised by
:func:`dropout_keep_mask`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .registry import Backend, get, names, register

__all__ = ["CudaBackend", "BLOCK_M", "HEAD_DIMS", "block_n", "attn_fwd", "dropout_keep_mask"]

BLOCK_M = 64  # query rows per block (csrc/cuda/attn_params.h: attn_fwd::kBlockM)
HEAD_DIMS = (32, 64, 96, 128, 256)  # the instantiated head dims (attn_params.h: kHeadDims)
_DTYPES = (torch.float16, torch.bfloat16)
_MAX_GRID_YZ = 65535  # batch and heads are grid dims y and z

_loaded_kind: Optional[str] = None  # "cuda" or "cuda_emulate" once that library is loaded and its fake registered


def block_n(head_dim: int) -> int:
    """Key tile of the kernel for a head dim (attn_params.h: attn_fwd::block_n)."""
    return 64 if head_dim <= 128 else 32


def _emulating() -> bool:
    return os.environ.get("FASTATTN_CUDA_EMULATE", "") not in ("", "0")


def _kind() -> str:
    return "cuda_emulate" if _emulating() else "cuda"


def _ensure_loaded() -> None:
    """Build (first use, cached) and load the extension, then register the op's fake implementation.

    Once loaded, this and ``unavailable_reason`` touch no files, so ``torch.compile`` traces through them.
    """
    global _loaded_kind
    if _loaded_kind is not None:
        return
    from .. import _ext

    _ext.load(_kind())
    torch.library.register_fake("fastattn::cuda_attn_fwd")(_cuda_attn_fwd_fake)
    torch.library.register_fake("fastattn::cuda_dropout_keep_mask")(_cuda_dropout_keep_mask_fake)
    _loaded_kind = _kind()


def _cuda_attn_fwd_fake(q, k, v, mask, tile_state, kv_count, kv_index, scale, window_left, window_right, q_offset,
                        philox=None, dropout_p=0.0):  # fmt: skip
    out = q.new_empty(q.shape)
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


def _cuda_dropout_keep_mask_fake(philox, batch, heads_q, seqlen_q, seqlen_k, dropout_p):
    return philox.new_empty((batch, heads_q, seqlen_q, seqlen_k), dtype=torch.uint8)


def dropout_keep_mask(philox: Tensor, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, p: float) -> Tensor:
    """The keep-mask the CUDA kernels apply, ``(B, Hq, Lq, Lk)`` bool (``fastattn::cuda_dropout_keep_mask``).

    Same arguments and result as the Triton backend's ``dropout_keep_mask``; the attention kernels never
    materialise it (tests, and the reference backward replaying a CUDA forward).
    """
    _ensure_loaded()
    return torch.ops.fastattn.cuda_dropout_keep_mask(philox, batch, heads_q, seqlen_q, seqlen_k, float(p)).bool()


def attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, spec, scale: float, dropout_p: float = 0.0, philox: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Run ``fastattn::cuda_attn_fwd``: ``(out (B, Hq, Lq, D), lse (B, Hq, Lq) fp32)``.

    Builds (or reuses, cached on ``spec``) the tile summary for the kernel's block when there is a
    mask tensor; the band (causal, window, q_offset) is handled inside the kernel analytically.
    With ``dropout_p > 0``, ``philox`` is the ``[seed, offset]`` tensor of ``philox_seed_offset``.
    """
    if dropout_p > 0.0 and philox is None:
        raise ValueError("philox: expected the [seed, offset] int64 tensor when dropout_p > 0, got None")
    _ensure_loaded()
    state = count = index = None
    if spec.tensor is not None:
        summary = spec.tile_summary(BLOCK_M, block_n(q.shape[-1]))
        state, count, index = summary.state, summary.kv_count, summary.kv_index
    left, right = spec.bounds
    return torch.ops.fastattn.cuda_attn_fwd(
        q, k, v, spec.tensor, state, count, index, float(scale), left, right, spec.q_offset,
        philox if dropout_p > 0.0 else None, float(dropout_p),
    )  # fmt: skip


class CudaBackend(Backend):
    name = "cuda"
    description = (
        "hand-written CUDA forward kernel (FlashAttention-2 schedule: mma.sync/ldmatrix/cp.async, masks with "
        "tile skipping, GQA, dropout with Triton's Philox stream; fp16/bf16, head dims 32/64/96/128/256) and "
        "backward (deterministic, the same head dims, float-mask gradient, dropout). "
        "FASTATTN_CUDA_EMULATE=1 runs the kernel source on CPU tensors (slow; tests)"
    )

    def unavailable_reason(self) -> Optional[str]:
        kind = _kind()
        if kind == _loaded_kind and (kind == "cuda_emulate" or torch.cuda.is_available()):
            return None
        from .. import _ext

        if kind == "cuda" and not torch.cuda.is_available():
            return (
                "no CUDA GPU (torch.cuda.is_available() is False), and FASTATTN_CUDA_EMULATE=1 is not set "
                "(it runs the kernel source on CPU tensors, slowly)"
            )
        if torch.compiler.is_compiling():  # nothing may touch the file system while torch.compile traces
            return (
                f"its {kind} library is not loaded, and a call under torch.compile cannot build or load it: run "
                "`fastattn build` or one eager call first"
            )
        reason = _ext.unavailable_reason(kind)
        return f"cannot build the {kind} extension: {reason}" if reason else None

    def unsupported_reason(self, problem, spec, dropout_p) -> Optional[str]:
        device = problem.device
        if _emulating():
            if device.type != "cpu":
                return f"FASTATTN_CUDA_EMULATE=1 runs the kernel on CPU tensors, got device {device}"
        elif device.type != "cuda":
            return f"expected CUDA tensors (or CPU tensors with FASTATTN_CUDA_EMULATE=1), got device {device}"
        elif torch.cuda.get_device_capability(device)[0] < 8:
            return "the kernel needs compute capability 8.0 or newer (mma.m16n8k16, cp.async)"
        if problem.dtype not in _DTYPES:
            return f"dtype {problem.dtype} is not supported (torch.float16 or torch.bfloat16)"
        if problem.head_dim not in HEAD_DIMS:
            return f"head_dim {problem.head_dim} is not supported (one of {', '.join(map(str, HEAD_DIMS))})"
        if problem.head_dim_v != problem.head_dim:
            return f"head_dim_v {problem.head_dim_v} must equal head_dim {problem.head_dim}"
        if problem.batch > _MAX_GRID_YZ or problem.heads_q > _MAX_GRID_YZ:
            return f"batch and heads must be at most {_MAX_GRID_YZ}, got {problem.batch} and {problem.heads_q}"
        return None

    def forward(self, q, k, v, spec, scale, dropout_p):
        from ._philox import philox_seed_offset

        philox = philox_seed_offset(q.device) if dropout_p > 0.0 else None
        out, lse = attn_fwd(q, k, v, spec, scale, dropout_p, philox)
        return out, lse, (() if philox is None else (philox,))

    def backward_backend(self, device: torch.device) -> Backend:
        """The backend whose backward runs where the CUDA backward kernel cannot (``cuda_bwd.unsupported_reason``)."""
        if device.type == "cuda" and "triton" in names():
            triton = get("triton")
            if triton.unavailable_reason() is None:
                return triton
        return get("reference")

    def backward(self, grad_out, q, k, v, out, lse, spec, scale, dropout_p, saved, need_mask_grad):
        from . import cuda_bwd

        if cuda_bwd.unsupported_reason(q, v, dropout_p, need_mask_grad) is None:
            return cuda_bwd.attn_bwd(grad_out, q, k, v, out, lse, spec, scale, dropout_p, saved, need_mask_grad)
        fallback = self.backward_backend(q.device)
        if dropout_p > 0.0 and fallback.name == "reference":  # it replays an explicit mask, not a philox seed
            (philox,) = saved
            saved = (dropout_keep_mask(philox, q.shape[0], q.shape[1], q.shape[2], k.shape[2], dropout_p),)
        return fallback.backward(grad_out, q, k, v, out, lse, spec, scale, dropout_p, saved, need_mask_grad)


register(CudaBackend())

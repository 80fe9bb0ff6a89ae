"""The Triton backend (``backend="triton"``): fused forward (``fwd.py``) and backward (``bwd.py``) kernels.

Importing this package is cheap and never fails: triton and the kernels are imported on first use.
It runs on CUDA GPUs, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..registry import Backend, register

__all__ = ["TritonBackend"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Settled at import: unavailable_reason runs while torch.compile traces, where find_spec (file system) breaks the graph.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _autocast(q, k, v):
    """Under ``torch.autocast`` fp32 inputs run in the autocast dtype (fp32 accumulation inside the kernel)."""
    device_type = q.device.type
    if q.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in (torch.float16, torch.bfloat16):
            return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


class TritonBackend(Backend):
    name = "triton"
    description = (
        "fused Triton kernels: FlashAttention-2 tiling, masks fused with empty-tile skipping, GQA, dropout "
        "(CUDA GPUs; CPU tensors only under TRITON_INTERPRET=1); on sm_75 the backward runs the reference "
        "backward beyond fp16 at head dim <= 64 (no spill-free FMA kernel there)"
    )
    slow_cases = (
        "CUDA tensors without triton installed (and outside the cuda backend's dtypes and head dims): "
        "pip install 'triton>=3.6'",
        "CUDA tensors in float64: cast them to float32, float16 or bfloat16",
        f"head dims above {MAX_HEAD_DIM}",
        "bfloat16 on GPUs older than sm_80: use float16",
    )

    def unavailable_reason(self) -> Optional[str]:
        if not _TRITON_INSTALLED:
            return "triton is not installed (pip install 'triton>=3.6')"
        if not torch.cuda.is_available() and not _interpreting():
            return "no CUDA GPU, and TRITON_INTERPRET=1 is not set (the interpreter runs it on CPU tensors, slowly)"
        return None

    def unsupported_reason(self, problem, spec, dropout_p) -> Optional[str]:
        device = problem.device
        if device.type == "cpu":
            if not _interpreting():
                return "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
        elif device.type != "cuda":
            return f"expected CUDA tensors (or CPU under TRITON_INTERPRET=1), got device {device}"
        if problem.dtype not in _DTYPES:
            return f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)"
        if device.type == "cuda" and problem.dtype == torch.bfloat16:
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8:
                return "bfloat16 needs compute capability 8.0 or newer"
        for name, dim in (("head_dim", problem.head_dim), ("head_dim_v", problem.head_dim_v)):
            if dim > MAX_HEAD_DIM:
                return f"{name} {dim} is above the supported {MAX_HEAD_DIM}"
        return None

    def forward(self, q, k, v, spec, scale, dropout_p):
        from .fwd import forward

        q, k, v = _autocast(q, k, v)
        return forward(q, k, v, spec, scale, dropout_p)

    def backward(self, grad_out, q, k, v, out, lse, spec, scale, dropout_p, saved, need_mask_grad):
        from .bwd import attn_bwd, fallback_reason

        if q.dtype != out.dtype:  # the forward ran under autocast: replay it in the same dtype
            q, k, v, grad_out = (t.to(out.dtype) for t in (q, k, v, grad_out))
        if fallback_reason(q, v, spec, dropout_p) is not None:
            # No spill-free kernel for this GPU/variant (sm_75 beyond fp16 at head dim <= 64): the
            # reference backward, with the forward's dropout keep-mask regenerated from its philox.
            from ..registry import get
            from .dropout import dropout_keep_mask

            if dropout_p > 0.0:
                b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
                saved = (dropout_keep_mask(saved[0], b, h, lq, lk, dropout_p),)
            ref = get("reference")
            return ref.backward(grad_out, q, k, v, out, lse, spec, scale, dropout_p, saved, need_mask_grad)
        return attn_bwd(grad_out, q, k, v, out, lse, spec, scale, dropout_p, saved, need_mask_grad)


register(TritonBackend())

"""The Triton backend (``backend="triton"``): fused forward (``fwd.py``) and backward (``bwd.py``) kernels.

Importing this package is cheap and never fails: triton and the kernels are imported on first use.
It runs on CUDA GPUs, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ...params import FEATURES
from ..registry import Backend, Capabilities, register

__all__ = ["TritonBackend"]

MAX_HEAD_DIM = 256
# Settled at import: unavailable_reason runs while torch.compile traces, where find_spec (file system) breaks the graph.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"
    description = (
        "fused Triton kernels: FlashAttention-2 tiling, masks fused with empty-tile skipping, GQA, dropout "
        "(CUDA GPUs; CPU tensors only under TRITON_INTERPRET=1); on sm_75 the backward runs on another "
        "backend beyond fp16 at head dim <= 64 (no spill-free FMA kernel there)"
    )
    capabilities = Capabilities(
        devices=("cuda", "cpu"),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        max_head_dim=MAX_HEAD_DIM,
        features=frozenset(FEATURES),
    )
    kvcache_capabilities = capabilities
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

    def extra_reason(self, params) -> Optional[str]:
        device = params.device
        if device.type == "cpu" and not _interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
        if device.type == "cuda" and params.dtype == torch.bfloat16:
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8:
                return "bfloat16 needs compute capability 8.0 or newer"
        return None

    def backward_reason(self, params) -> Optional[str]:
        from .bwd import fallback_reason

        return fallback_reason(params)

    def forward(self, q, k, v, params, philox):
        from .fwd import forward

        return forward(q, k, v, params, philox)

    def kvcache_forward(
        self, query, key_cache, value_cache, cache_seqlens, key, value, block_table, params, num_splits
    ):
        from .._kvcache import kvcache_fwd_triton, op_args

        return kvcache_fwd_triton(
            query, key_cache, value_cache, cache_seqlens, key, value, block_table, *op_args(params, num_splits)
        )

    def backward(self, grad_out, q, k, v, out, lse, params, philox, need_mask_grad):
        from .bwd import attn_bwd

        return attn_bwd(grad_out, q, k, v, out, lse, params, philox, need_mask_grad)


register(TritonBackend())

"""The CUDA backend (``backend="cuda"``): hand-written FlashAttention-2-style forward and backward kernels.

Forward: kernel ``attn_fwd_kernel`` (``csrc/cuda/attn_fwd.cu``, design note at its top) → op
``fastattn::cuda_attn_fwd`` (``csrc/attn_ops.cpp``) → :func:`attn_fwd`. Backward: kernels
``attn_bwd_preprocess_kernel``, ``attn_bwd_dkdv_kernel``, ``attn_bwd_dq_kernel`` (``csrc/cuda/attn_bwd.cu``)
→ op ``fastattn::cuda_attn_bwd`` (``csrc/attn_bwd_ops.cpp``) → :func:`attn_bwd`, deterministic. Both run
through :class:`CudaBackend` and the shared ``AttentionFunction``.

Importing this module is cheap and never fails: the extension is built (``fastattn._ext.load``) and the
ops' fakes registered on first use. With ``FASTATTN_CUDA_EMULATE=1`` the same kernel sources run on CPU
tensors through the emulator (``load("cuda_emulate")``, slow; for tests on machines without a GPU).

The gradient of a float mask (``need_mask_grad``, a learned bias) is ``dS``, written ``(B, Hq, Lq, Lk)`` in
the mask's dtype by the dQ pass (zeros in the tiles it skips); autograd then reduces it over the mask's
broadcast dims. Dropout follows the shared contract (``backends/_philox.py``), implemented bit for bit in
``csrc/cuda/dropout.cuh``: the kernels regenerate the keep-mask from the call's ``philox`` seed in both
directions; :func:`dropout_keep_mask` materialises it (tests only).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..masks import TileSummary
from ..params import FEATURES, AttnParams
from .registry import Backend, Capabilities, fake_backward, fake_forward, op_layout, op_scalars, register

__all__ = [
    "CudaBackend",
    "BLOCK_M",
    "HEAD_DIMS",
    "BLOCK_N",
    "BLOCK_M_KV",
    "BLOCK_M_DQ",
    "block_n",
    "attn_fwd",
    "attn_bwd",
    "summaries",
    "dropout_keep_mask",
]

BLOCK_M = 64  # forward: query rows per block (csrc/cuda/attn_params.h: attn_fwd::kBlockM)
HEAD_DIMS = (32, 64, 96, 128, 256)  # the instantiated head dims (attn_params.h: kHeadDims)
BLOCK_N = 64  # backward: keys per tile (csrc/cuda/attn_bwd_params.h: attn_bwd::kBlockN)
BLOCK_M_KV = 32  # backward: query rows streamed past the dK/dV pass (kBlockMkv)
BLOCK_M_DQ = 64  # backward: query rows resident in the dQ pass (kBlockMdq)
_DTYPES = (torch.float16, torch.bfloat16)
# Every feature but a value head dim different from the query's (the kernels share one head dim); packed
# sequences run through the same kernels (csrc/cuda/attn_common.cuh: seq_info).
_FEATURES = frozenset(FEATURES) - {"head_dim_v"}
_MAX_GRID_YZ = 65535  # batch and heads are grid dims y and z

_loaded_kind: Optional[str] = None  # "cuda" or "cuda_emulate" once that library is loaded and its fakes registered


def block_n(head_dim: int) -> int:
    """Key tile of the forward kernel for a head dim (attn_params.h: attn_fwd::block_n)."""
    return 64 if head_dim <= 128 else 32


def _emulating() -> bool:
    return os.environ.get("FASTATTN_CUDA_EMULATE", "") not in ("", "0")


def _kind() -> str:
    return "cuda_emulate" if _emulating() else "cuda"


def _ensure_loaded() -> None:
    """Build (first use, cached) and load the extension, then register the ops' fake implementations.

    Once loaded, this and ``unavailable_reason`` touch no files, so ``torch.compile`` traces through them.
    """
    global _loaded_kind
    if _loaded_kind is not None:
        return
    from .. import _ext

    _ext.load(_kind())
    # The registry's shared fakes (one per direction, as every backend's op).
    torch.library.register_fake("fastattn::cuda_attn_fwd")(fake_forward)
    torch.library.register_fake("fastattn::cuda_attn_bwd")(fake_backward)
    torch.library.register_fake("fastattn::cuda_dropout_keep_mask")(_cuda_dropout_keep_mask_fake)
    _loaded_kind = _kind()


def _variant_args(params: AttnParams) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The ALiBi slopes and the sinks as the kernels read them: contiguous float32, or None."""
    alibi = None if params.alibi is None else params.alibi.float().contiguous()
    sinks = None if params.sinks is None else params.sinks.detach().float().contiguous()
    return alibi, sinks


def _cuda_dropout_keep_mask_fake(philox, batch, heads_q, seqlen_q, seqlen_k, dropout_p):
    return philox.new_empty((batch, heads_q, seqlen_q, seqlen_k), dtype=torch.uint8)


def dropout_keep_mask(philox: Tensor, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, p: float) -> Tensor:
    """The keep-mask the CUDA kernels apply, ``(B, Hq, Lq, Lk)`` bool (``fastattn::cuda_dropout_keep_mask``).

    Same arguments and result as ``backends._philox.keep_mask``; the attention kernels never materialise it
    (tests of the kernels' bits).
    """
    _ensure_loaded()
    return torch.ops.fastattn.cuda_dropout_keep_mask(philox, batch, heads_q, seqlen_q, seqlen_k, float(p)).bool()


def attn_fwd(q: Tensor, k: Tensor, v: Tensor, params: AttnParams, philox: Optional[Tensor] = None):
    """Run ``fastattn::cuda_attn_fwd``: ``(out (B, Hq, Lq, D), lse (B, Hq, Lq) fp32)``.

    Builds (or reuses, cached on ``params``) the tile summary for the kernel's block when there is a mask
    tensor; the band (causal, window, q_offset) is handled inside the kernel analytically. Packed sequences
    (``params.is_packed``): ``q``, ``k``, ``v`` are ``(1, H, total, D)`` views, ``out`` comes back token-major and
    the lse ``(1, Hq, total_q)`` (the registry's layout arguments, ``op_layout``).
    """
    if params.dropout_p > 0.0 and philox is None:
        raise ValueError("philox: expected the [seed, offset] int64 tensor when dropout_p > 0, got None")
    _ensure_loaded()
    summary = []
    if params.mask is not None:
        s = params.tile_summary(BLOCK_M, block_n(q.shape[-1]))
        summary = [s.state, s.kv_count, s.kv_index]
    return torch.ops.fastattn.cuda_attn_fwd(
        q, k, v, params.mask, *_variant_args(params), summary, philox if params.dropout_p > 0.0 else None,
        *op_scalars(params), [BLOCK_M, block_n(q.shape[-1])], *op_layout(params),
    )  # fmt: skip


def summaries(params: AttnParams) -> list[Tensor]:
    """``[kv_state, kv_count, kv_index, q_state, q_count, q_index]`` for a mask tensor, else ``[]``.

    The dQ pass walks the summary for ``(BLOCK_M_DQ, BLOCK_N)``; the dK/dV pass walks the transpose of the
    one for ``(BLOCK_M_KV, BLOCK_N)``: per key tile, its non-empty query tiles (``(Bm, Hm, nK, nQ)``).
    """
    if params.mask is None:
        return []
    s_dq = params.tile_summary(BLOCK_M_DQ, BLOCK_N)
    s_kv = params.tile_summary(BLOCK_M_KV, BLOCK_N)
    t = TileSummary.from_state(BLOCK_N, BLOCK_M_KV, s_kv.state.transpose(-1, -2).contiguous())
    return [s_dq.state, s_dq.kv_count, s_dq.kv_index, t.state, t.kv_count, t.kv_index]


def attn_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    params: AttnParams,
    philox: Optional[Tensor],
    need_mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(dq, dk, dv, dmask or None)`` from the forward's ``(out, lse)``: the Triton backward's contract.

    ``philox``: the call's dropout seed. ``dmask`` only when ``need_mask_grad`` (a float mask):
    ``(B, Hq, Lq, Lk)`` in the mask's dtype. Only the lse format matters (natural log, ``(B, Hq, Lq)``, -inf
    for a row that attends nothing; cast to fp32 here), not which forward produced it. Deterministic:
    bit-identical run to run.
    """
    if need_mask_grad and (params.mask is None or not params.mask.dtype.is_floating_point):
        got = "no mask" if params.mask is None else f"a {params.mask.dtype} mask"
        raise ValueError(f"need_mask_grad: expected a floating attn_mask to differentiate, got {got}")
    if params.dropout_p > 0.0 and (philox is None or philox.dtype != torch.int64 or philox.shape != (2,)):
        raise ValueError(f"philox: expected the call's int64 [seed, offset] tensor when dropout_p > 0, got {philox}")
    _ensure_loaded()
    alibi, _ = _variant_args(params)
    dq, dk, dv, dmask = torch.ops.fastattn.cuda_attn_bwd(
        grad_out, q, k, v, out, lse.float(), params.mask, alibi, summaries(params),
        philox if params.dropout_p > 0.0 else None, *op_scalars(params), [BLOCK_M_DQ, BLOCK_N, BLOCK_M_KV],
        bool(need_mask_grad), *op_layout(params),
    )  # fmt: skip
    return dq, dk, dv, (dmask if need_mask_grad else None)


@torch.library.custom_op("fastattn::kvcache_fwd_cuda", mutates_args=("key_cache", "value_cache"))
def kvcache_fwd_cuda(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    key: Optional[Tensor],
    value: Optional[Tensor],
    block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    sinks: Optional[Tensor],
    scale: float,
    variant: list[float],
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """The CUDA split-KV kernel (``csrc/cuda/decode.cu``, op ``fastattn::cuda_kvcache_fwd``) after the append;
    splits fill the SMs (``backends/_kvcache.py``: the schema and fake every backend's op shares)."""
    from ..kvcache import append_
    from ._kvcache import gpu_workers, splits_for

    _ensure_loaded()
    append_(key_cache, value_cache, cache_seqlens, key, value, block_table)
    splits = splits_for(num_splits, query, key_cache, block_table, gpu_workers(query.device))
    new = 0 if key is None else key.shape[2]
    return torch.ops.fastattn.cuda_kvcache_fwd(
        query, key_cache, value_cache, cache_seqlens.contiguous(), new, block_table, alibi_slopes, sinks, scale,
        variant, splits,
    )  # fmt: skip


def _kvcache_fake(*args):
    from ._kvcache import fake_kvcache

    return fake_kvcache(*args)


kvcache_fwd_cuda.register_fake(_kvcache_fake)


class CudaBackend(Backend):
    name = "cuda"
    description = (
        "hand-written CUDA kernels (FlashAttention-2 schedule: mma.sync/ldmatrix/cp.async, masks with tile "
        "skipping, GQA, dropout with the shared Philox stream; fp16/bf16, head dims 32/64/96/128/256), forward "
        "and deterministic backward with the float-mask gradient. FASTATTN_CUDA_EMULATE=1 runs the kernel "
        "source on CPU tensors (slow; tests)"
    )

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return Capabilities(
            devices=("cpu",) if _emulating() else ("cuda",), dtypes=_DTYPES, head_dims=HEAD_DIMS, features=_FEATURES
        )

    @property
    def kvcache_capabilities(self) -> Capabilities:  # type: ignore[override]
        """The decode kernel (``csrc/cuda/decode.cu``): fp16/bf16, any head dims up to 256, every feature."""
        return Capabilities(
            devices=("cpu",) if _emulating() else ("cuda",), dtypes=_DTYPES, max_head_dim=256,
            features=frozenset(FEATURES),
        )  # fmt: skip

    def kvcache_forward(
        self, query, key_cache, value_cache, cache_seqlens, key, value, block_table, params, num_splits
    ):
        from ._kvcache import op_args

        _ensure_loaded()
        return kvcache_fwd_cuda(
            query, key_cache, value_cache, cache_seqlens, key, value, block_table, *op_args(params, num_splits)
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

    def extra_reason(self, params) -> Optional[str]:
        if params.device.type == "cuda" and torch.cuda.get_device_capability(params.device)[0] < 8:
            return "the kernel needs compute capability 8.0 or newer (mma.m16n8k16, cp.async)"
        if params.batch > _MAX_GRID_YZ or params.heads_q > _MAX_GRID_YZ:
            return f"batch and heads must be at most {_MAX_GRID_YZ}, got {params.batch} and {params.heads_q}"
        return None

    def forward(self, q, k, v, params, philox):
        return attn_fwd(q, k, v, params, philox)

    def backward(self, grad_out, q, k, v, out, lse, params, philox, need_mask_grad):
        return attn_bwd(grad_out, q, k, v, out, lse, params, philox, need_mask_grad)


register(CudaBackend())

"""The oracle as a registered backend (``backend="reference"``), through ``torch.library`` ops.

It runs anywhere torch runs, takes every input the entry point accepts (float64 included) and is the
automatic choice's last resort. Its backward works from the saved ``out`` and ``lse`` as the fused kernels
do, so it also serves blocks of a larger softmax (ring attention) and any backend's backward fallback.
Dropout applies the shared contract's keep-mask (``_philox.keep_mask``) drawn from the call's seed, the
same numbers the kernels draw, so a forward on one backend and a backward here agree.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as oracle
from ..params import AttnParams, VariantScalars
from ._philox import keep_mask
from .registry import Backend, Capabilities, fake_backward, fake_forward, op_layout, op_scalars, register


def _params(q, k, v, mask, alibi_slopes, sinks, scale, dropout_p, variant, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k) -> AttnParams:  # fmt: skip
    return AttnParams.for_tensors(
        q, k, v, scale, mask=mask, alibi=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
        **VariantScalars.unpack(variant).params_kwargs(), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip


def _keep(philox: Optional[Tensor], q: Tensor, k: Tensor, dropout_p: float) -> Optional[Tensor]:
    if dropout_p <= 0.0:
        return None
    return keep_mask(philox, q.shape[0], q.shape[1], q.shape[2], k.shape[2], dropout_p)


@torch.library.custom_op("fastattn::reference_fwd", mutates_args=())
def reference_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    sinks: Optional[Tensor],
    summary: list[Tensor],
    philox: Optional[Tensor],
    scale: float,
    dropout_p: float,
    variant: list[float],
    blocks: list[int],
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[Tensor, Tensor]:
    params = _params(q, k, v, mask, alibi_slopes, sinks, scale, dropout_p, variant, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k)  # fmt: skip
    if params.is_packed:
        return oracle.packed_forward(q, k, v, params, philox)
    return oracle.attention_forward(q, k, v, params, _keep(philox, q, k, dropout_p))


reference_fwd.register_fake(fake_forward)


@torch.library.custom_op("fastattn::reference_bwd", mutates_args=())
def reference_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    summary: list[Tensor],
    philox: Optional[Tensor],
    scale: float,
    dropout_p: float,
    variant: list[float],
    blocks: list[int],
    need_mask_grad: bool,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    params = _params(q, k, v, mask, alibi_slopes, None, scale, dropout_p, variant, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k)  # fmt: skip
    if params.is_packed:
        dq, dk, dv = oracle.packed_backward(grad_out, q, k, v, out, lse, params, philox)
        return dq, dk, dv, q.new_empty(0)
    keep = _keep(philox, q, k, dropout_p)
    dq, dk, dv, ds, _ = oracle.attention_backward(grad_out, q, k, v, params, keep, out=out, lse=lse)
    dmask = ds.to(mask.dtype) if need_mask_grad else q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask


reference_bwd.register_fake(fake_backward)


class ReferenceBackend(Backend):
    name = "reference"
    description = "the float64-capable oracle: naive O(L^2) memory, any device and dtype, every feature"
    capabilities = Capabilities(devices=None, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    kvcache_capabilities = capabilities

    def kvcache_forward(
        self, query, key_cache, value_cache, cache_seqlens, key, value, block_table, params, num_splits
    ):
        from ._kvcache import kvcache_fwd_reference, op_args

        return kvcache_fwd_reference(
            query, key_cache, value_cache, cache_seqlens, key, value, block_table, *op_args(params, num_splits)
        )

    def forward(self, q, k, v, params, philox):
        return reference_fwd(
            q, k, v, params.mask, params.alibi, params.sinks, [], philox, *op_scalars(params), [], *op_layout(params)
        )

    def backward(self, grad_out, q, k, v, out, lse, params, philox, need_mask_grad):
        dq, dk, dv, dmask = reference_bwd(
            grad_out, q, k, v, out, lse, params.mask, params.alibi, [], philox, *op_scalars(params), [],
            bool(need_mask_grad), *op_layout(params),
        )  # fmt: skip
        return dq, dk, dv, (dmask if need_mask_grad else None)


register(ReferenceBackend())

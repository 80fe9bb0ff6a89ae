"""The oracle as a registered backend (``backend="reference"``), through ``torch.library`` ops.

It runs anywhere torch runs, takes every input the entry point accepts (float64 included) and is
the automatic choice's last resort. Its backward works from the saved ``out`` and ``lse`` as the
fused kernels do, so it also serves blocks of a larger softmax (ring attention). Dropout draws an
explicit keep-mask from torch's generator in forward and saves it, so backward replays exactly
the same mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as oracle
from ..masks import MaskSpec
from .registry import Backend, register


def _spec(q: Tensor, k: Tensor, mask: Optional[Tensor], window_left: int, window_right: int, q_offset: int) -> MaskSpec:
    return MaskSpec(
        seqlen_q=q.shape[2],
        seqlen_k=k.shape[2],
        window=(window_left, window_right),
        q_offset=q_offset,
        tensor=mask,
        base=mask,
    )


@torch.library.custom_op("fastattn::reference_fwd", mutates_args=())
def reference_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    keep_mask: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    q_offset: int,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    spec = _spec(q, k, mask, window_left, window_right, q_offset)
    return oracle.attention_forward(q, k, v, spec, scale, keep_mask, dropout_p)


@reference_fwd.register_fake
def _(q, k, v, mask, keep_mask, scale, window_left, window_right, q_offset, dropout_p):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("fastattn::reference_bwd", mutates_args=())
def reference_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    keep_mask: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    q_offset: int,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec = _spec(q, k, mask, window_left, window_right, q_offset)
    dq, dk, dv, ds = oracle.attention_backward(grad_out, q, k, v, spec, scale, keep_mask, dropout_p, out=out, lse=lse)
    dmask_dtype = mask.dtype if mask is not None and mask.dtype.is_floating_point else q.dtype
    return dq, dk, dv, ds.to(dmask_dtype)


@reference_bwd.register_fake
def _(grad_out, q, k, v, out, lse, mask, keep_mask, scale, window_left, window_right, q_offset, dropout_p):
    dmask_dtype = mask.dtype if mask is not None and mask.dtype.is_floating_point else q.dtype
    scores = q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=dmask_dtype)
    # The real op's gradients come out of matmuls: contiguous, whatever the inputs' strides.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), scores


class ReferenceBackend(Backend):
    name = "reference"
    description = "the float64-capable oracle: naive O(L^2) memory, any device and dtype"

    def forward(self, q, k, v, spec, scale, dropout_p):
        keep = None
        if dropout_p > 0.0:
            keep = torch.rand(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device) >= dropout_p
        left, right = spec.bounds
        out, lse = reference_fwd(q, k, v, spec.tensor, keep, scale, left, right, spec.q_offset, dropout_p)
        return out, lse, (() if keep is None else (keep,))

    def backward(self, grad_out, q, k, v, out, lse, spec, scale, dropout_p, saved, need_mask_grad):
        keep = saved[0] if saved else None
        left, right = spec.bounds
        dq, dk, dv, dmask = reference_bwd(
            grad_out, q, k, v, out, lse, spec.tensor, keep, scale, left, right, spec.q_offset, dropout_p
        )
        return dq, dk, dv, (dmask if need_mask_grad else None)


register(ReferenceBackend())

"""The one ``autograd.Function`` that serves every backend.

It draws the call's dropout seed (one per call, shared by forward and backward, whichever backend runs
the backward), saves ``(q, k, v, out, lse)``, and calls the registry's backward. The mask tensor and the
sinks are inputs of their own so that a float mask that requires grad (a learned bias) and learned sinks
receive their gradients; autograd's expand backward then reduces the mask's over its broadcast dims. The
sinks' gradient needs only ``out``, ``lse`` and ``grad_out`` (``variants.sink_grad``), so it is computed
here, once, for every backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import variants
from .backends._philox import philox_seed_offset
from .backends.registry import Backend, run_backward
from .params import AttnParams


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Optional[Tensor],
        sinks: Optional[Tensor],
        backend: Backend,
        params: AttnParams,
    ):
        philox = philox_seed_offset(q.device) if params.dropout_p > 0.0 else None
        out, lse = backend.forward(q, k, v, params, philox)
        ctx.save_for_backward(q, k, v, out, lse, philox, sinks)
        ctx.backend, ctx.params = backend, params
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
        q, k, v, out, lse, philox, sinks = ctx.saved_tensors
        need_mask_grad = bool(ctx.needs_input_grad[3])
        grad_out = grad_out.contiguous()
        dq, dk, dv, dmask = run_backward(ctx.backend, grad_out, q, k, v, out, lse, ctx.params, philox, need_mask_grad)
        dsinks = variants.sink_grad(sinks, lse, grad_out, out) if ctx.needs_input_grad[4] else None
        return dq, dk, dv, (dmask if need_mask_grad else None), dsinks, None, None


class EmptyAttention(torch.autograd.Function):
    """Attention with no queries or no keys: zeros (lse -inf, or the sink) and zero gradients, never NaN."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor]):
        ctx.save_for_backward(q, k, v, sinks)
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=lse_dtype, device=q.device)
        if sinks is not None:  # nothing to attend but the sink: lse is the sink's logit
            lse = sinks.to(lse_dtype).view(1, -1, 1).expand_as(lse).contiguous()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, sinks = ctx.saved_tensors
        dsinks = torch.zeros_like(sinks) if sinks is not None else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dsinks

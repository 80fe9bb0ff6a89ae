"""The one ``autograd.Function`` that serves every backend.

It saves ``(q, k, v, out, lse)`` plus whatever the backend needs to replay dropout, and calls the
backend's backward op. The mask tensor is an input of its own so that a float mask that requires
grad (a learned bias) receives its gradient; autograd's expand backward then reduces it over the
mask's broadcast dims.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends.registry import Backend
from .masks import MaskSpec


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Optional[Tensor],
        backend: Backend,
        spec: MaskSpec,
        scale: float,
        dropout_p: float,
    ):
        out, lse, saved = backend.forward(q, k, v, spec, scale, dropout_p)
        ctx.save_for_backward(q, k, v, out, lse, *saved)
        ctx.backend, ctx.spec, ctx.scale, ctx.dropout_p = backend, spec, scale, dropout_p
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        need_mask_grad = bool(ctx.needs_input_grad[3])
        dq, dk, dv, dmask = ctx.backend.backward(
            grad_out.contiguous(), q, k, v, out, lse, ctx.spec, ctx.scale, ctx.dropout_p, tuple(saved), need_mask_grad
        )
        return dq, dk, dv, (dmask if need_mask_grad else None), None, None, None, None


class EmptyAttention(torch.autograd.Function):
    """Attention with no queries or no keys: zeros (lse -inf) and zero gradients, never NaN."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor):
        ctx.save_for_backward(q, k, v)
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=lse_dtype, device=q.device)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

"""The oracle: naive attention written plainly, the ground truth of every test.

Explicit scores, scale, mask, softmax and ``@ V``; never torch's own SDPA. It materialises the
``Lq × Lk`` scores on purpose: it is meant to be obviously right, not fast. Call it with float64
inputs (or ``compute_dtype=torch.float64``) for ground truth, or with low-precision inputs and
``compute_dtype`` equal to their dtype to measure "plain PyTorch's own error" for tolerances.

``attention_backward`` states the gradients the fused kernels must produce, written out
(``dS = P ∘ (dP − delta)``, ``delta = rowsum(dO ∘ O)``) rather than left to autograd, so it
doubles as the executable statement of every backward kernel.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ._validate import validate
from .masks import MaskSpec

__all__ = ["attention", "attention_forward", "attention_backward", "allowed_and_bias"]


def allowed_and_bias(spec: MaskSpec, device, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """Dense ``(B|1, H|1, Lq, Lk)`` boolean of attended pairs, and the additive bias (or None)."""
    allowed = spec.band(device).view(1, 1, spec.seqlen_q, spec.seqlen_k)
    bias = None
    if spec.tensor is not None:
        if spec.tensor.dtype == torch.bool:
            allowed = allowed & spec.tensor
        else:
            bias = spec.tensor.to(dtype)
    return allowed, bias


def _masked_scores(q: Tensor, k: Tensor, spec: MaskSpec, scale: float, compute_dtype: torch.dtype) -> Tensor:
    """Scaled scores ``(B, Hq, Lq, Lk)`` plus the float mask, ``-inf`` where a pair does not attend."""
    group = q.shape[1] // k.shape[1]
    # (B, Hkv, Lk, D) → (B, Hq, Lk, D): query head h reads key head h // group.
    k = k.to(compute_dtype).repeat_interleave(group, dim=1)
    scores = (q.to(compute_dtype) @ k.transpose(-1, -2)) * scale
    allowed, bias = allowed_and_bias(spec, q.device, compute_dtype)
    if bias is not None:
        scores = scores + bias
    return scores.masked_fill(~allowed, float("-inf"))


def _probabilities(
    q: Tensor, k: Tensor, spec: MaskSpec, scale: float, compute_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Softmax probabilities ``(B, Hq, Lq, Lk)`` and the log-sum-exp ``(B, Hq, Lq)`` in compute_dtype."""
    scores = _masked_scores(q, k, spec, scale, compute_dtype)
    lse = torch.logsumexp(scores, dim=-1)
    # A row with nothing to attend has lse = -inf: its probabilities are 0, not NaN.
    finite = torch.isfinite(lse) | torch.isnan(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0).unsqueeze(-1))
    probs = torch.where(finite.unsqueeze(-1), probs, 0.0)
    return probs, lse


def _probabilities_from_lse(
    q: Tensor, k: Tensor, spec: MaskSpec, scale: float, compute_dtype: torch.dtype, lse: Tensor
) -> Tensor:
    """``exp(S - lse)`` with a given log-sum-exp; 0 where masked and in rows whose lse is -inf."""
    scores = _masked_scores(q, k, spec, scale, compute_dtype)
    lse = lse.to(compute_dtype).unsqueeze(-1)
    return torch.where(torch.isneginf(lse), 0.0, torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)))


def _default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _lse_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: MaskSpec,
    scale: float,
    keep_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """4-D oracle forward: ``(out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq))``.

    ``keep_mask``: boolean ``(B, Hq, Lq, Lk)``, True keeps a probability (scaled by ``1/(1-p)``).
    The lse is float32 (float64 when computing in float64) and never includes dropout.
    """
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    probs, lse = _probabilities(q, k, spec, scale, compute_dtype)
    if keep_mask is not None:
        probs = probs * keep_mask / (1.0 - dropout_p)
    group = q.shape[1] // k.shape[1]
    out = probs @ v.to(compute_dtype).repeat_interleave(group, dim=1)
    return out.to(q.dtype), lse.to(_lse_dtype(compute_dtype))


def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: MaskSpec,
    scale: float,
    keep_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    compute_dtype: Optional[torch.dtype] = None,
    *,
    out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """4-D oracle backward: ``(dq, dk, dv, dscores)``.

    ``dscores`` ``(B, Hq, Lq, Lk)`` is the gradient of the scores after scaling, which is also the
    gradient of an additive mask before it is reduced over its broadcast dims. K/V gradients are
    summed over each GQA group.

    Given ``out`` and ``lse`` it works as the fused kernels do: ``P = exp(S - lse)`` and
    ``delta = rowsum(dO ∘ out)``. Those may then belong to a larger problem than these keys (a
    block of ring attention, whose softmax normalises over every rank's keys); without them the
    softmax is recomputed over these keys alone.
    """
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    batch, heads_q = q.shape[:2]
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    if lse is None:
        probs, _ = _probabilities(q, k, spec, scale, compute_dtype)
    else:
        probs = _probabilities_from_lse(q, k, spec, scale, compute_dtype, lse)
    do = grad_out.to(compute_dtype)
    kk = k.to(compute_dtype).repeat_interleave(group, dim=1)
    vv = v.to(compute_dtype).repeat_interleave(group, dim=1)
    drop = keep_mask / (1.0 - dropout_p) if keep_mask is not None else None
    probs_d = probs * drop if drop is not None else probs
    dv = probs_d.transpose(-1, -2) @ do
    dp = do @ vv.transpose(-1, -2)
    if drop is not None:
        dp = dp * drop
    if out is None:
        delta = (probs * dp).sum(-1, keepdim=True)  # = rowsum(dO ∘ O) over these keys
    else:
        delta = (do * out.to(compute_dtype)).sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    dq = (ds @ kk) * scale
    dk = (ds.transpose(-1, -2) @ q.to(compute_dtype)) * scale
    # (B, Hq, Lk, D) → (B, Hkv, group, Lk, D) → sum over the group.
    dk = dk.view(batch, heads_kv, group, seqlen_k, -1).sum(2)
    dv = dv.view(batch, heads_kv, group, seqlen_k, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    window: Optional[tuple[int, int]] = None,
    q_offset: int = 0,
    keep_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
):
    """The oracle with the entry point's arguments; differentiable through plain autograd.

    ``keep_mask`` (boolean, broadcastable to ``(B, Hq, Lq, Lk)``) applies dropout explicitly so
    that other backends' dropout can be checked against it; ``dropout_p`` is then its rate.
    ``compute_dtype`` defaults to float32 for half types and to the input dtype otherwise.
    """
    problem, q, k, v, spec = validate(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, q_offset
    )
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    if keep_mask is not None:
        keep_mask = keep_mask.reshape((1,) * (4 - keep_mask.dim()) + tuple(keep_mask.shape))
    if problem.seqlen_k == 0:
        out = q.new_zeros(problem.batch, problem.heads_q, problem.seqlen_q, problem.head_dim_v)
        lse = torch.full(out.shape[:-1], float("-inf"), dtype=_lse_dtype(compute_dtype), device=q.device)
    else:
        out, lse = attention_forward(q, k, v, spec, problem.scale, keep_mask, dropout_p, compute_dtype)
    if problem.three_d:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out

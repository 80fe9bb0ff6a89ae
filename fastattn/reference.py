"""The oracle: naive attention written plainly, the ground truth of every test.

Explicit scores, scale, the score rules, ALiBi, mask, softmax (with the sink logit in its denominator) and ``@ V``;
never torch's own SDPA. It materialises the ``Lq × Lk`` scores on purpose: it is meant to be obviously
right, not fast. Call it with float64 inputs (or ``compute_dtype=torch.float64``) for ground truth, or with
low-precision inputs and ``compute_dtype`` equal to their dtype to measure "plain PyTorch's own error" for
tolerances. Every rule comes from ``fastattn.variants``.

``attention_backward`` states the gradients the fused kernels must produce, written out
(``dS = P ∘ (dP − delta)``, ``delta = rowsum(dO ∘ O)``, the score rules' derivative, the sink's
``-sum exp(sink - lse) delta``) rather than left to autograd, so it doubles as the executable statement of
every backward kernel; ``attention`` is differentiable through plain autograd, the independent check.

Packed sequences: ``packed_forward`` / ``packed_backward`` run the dense oracle on each sequence alone (its own
keys, aligned bottom-right, its ALiBi slopes and dropout numbers), the statement of ``varlen_attention``;
``varlen_attention`` is the same with the entry point's arguments, through plain autograd.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import variants
from ._validate import validate, validate_packed
from .backends._philox import keep_mask_sequence
from .params import AttnParams

__all__ = [
    "attention",
    "attention_forward",
    "attention_backward",
    "allowed_and_bias",
    "packed_forward",
    "packed_backward",
    "varlen_attention",
]


def allowed_and_bias(params: AttnParams, device, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """Dense ``(B|1, H|1, Lq, Lk)`` boolean of attended pairs (band, chunk, bool mask), and the float mask or None."""
    allowed = params.allowed(device).view(1, 1, params.seqlen_q, params.seqlen_k)
    bias = None
    if params.mask is not None:
        if params.mask.dtype == torch.bool:
            allowed = allowed & params.mask
        else:
            bias = params.mask.to(dtype)
    return allowed, bias


def _scores(q: Tensor, k: Tensor, params: AttnParams, compute_dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """Scores ``(B, Hq, Lq, Lk)`` after scale, the score rules, ALiBi and the float mask, ``-inf`` where a pair
    does not attend; and what ``variants.score_grad`` needs (or None)."""
    group = q.shape[1] // k.shape[1]
    # (B, Hkv, Lk, D) → (B, Hq, Lk, D): query head h reads key head h // group.
    k = k.to(compute_dtype).repeat_interleave(group, dim=1)
    scores = (q.to(compute_dtype) @ k.transpose(-1, -2)) * params.scale
    scores, t = variants.score_mod(scores, params.alibi, params.q_offset, **params.score_rules)
    allowed, bias = allowed_and_bias(params, q.device, compute_dtype)
    if bias is not None:
        scores = scores + bias
    return scores.masked_fill(~allowed, float("-inf")), t


def _lse(scores: Tensor, params: AttnParams) -> Tensor:
    """Log-sum-exp of each row ``(B, Hq, Lq)``, the sink's logit included."""
    if params.sinks is not None:
        # (Hq,) → (B, Hq, Lq, 1): one more column in every row's softmax.
        sink = params.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    # A row with nothing to attend: -inf, computed on zeros so that autograd through it gives 0, not NaN.
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(empty, 0.0, scores), dim=-1)
    return torch.where(empty.squeeze(-1), float("-inf"), lse)


def _probabilities_from_lse(scores: Tensor, lse: Tensor) -> Tensor:
    """``exp(S - lse)``; 0 where masked and in rows whose lse is -inf (never NaN)."""
    lse = lse.to(scores.dtype).unsqueeze(-1)
    empty = torch.isneginf(lse)
    return torch.where(empty, 0.0, torch.exp(scores - torch.where(empty, 0.0, lse)))


def _default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _lse_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _dropped(probs: Tensor, keep_mask: Optional[Tensor], p: float) -> Tensor:
    return probs if keep_mask is None else probs * keep_mask / (1.0 - p)


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: AttnParams,
    keep_mask: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """4-D oracle forward: ``(out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq))``.

    ``keep_mask``: boolean ``(B, Hq, Lq, Lk)``, True keeps a probability (scaled by
    ``1/(1 - params.dropout_p)``). The lse is float32 (float64 when computing in float64), includes the
    sink and never includes dropout.
    """
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    scores, _ = _scores(q, k, params, compute_dtype)
    lse = _lse(scores, params)
    probs = _dropped(_probabilities_from_lse(scores, lse), keep_mask, params.dropout_p)
    group = q.shape[1] // k.shape[1]
    out = probs @ v.to(compute_dtype).repeat_interleave(group, dim=1)
    return out.to(q.dtype), lse.to(_lse_dtype(compute_dtype))


def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: AttnParams,
    keep_mask: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
    *,
    out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """4-D oracle backward: ``(dq, dk, dv, dscores, dsinks or None)``.

    ``dscores`` ``(B, Hq, Lq, Lk)`` is the gradient of the scores after scale, the score rules and ALiBi, which is
    also the gradient of an additive mask before it is reduced over its broadcast dims. K/V gradients are
    summed over each GQA group.

    Given ``out`` and ``lse`` it works as the fused kernels do: ``P = exp(S - lse)`` and
    ``delta = rowsum(dO ∘ out)``. Those may then belong to a larger problem than these keys (a block of
    ring attention, whose softmax normalises over every rank's keys); without them the softmax is
    recomputed over these keys (and the sink).
    """
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    batch, heads_q = q.shape[:2]
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scores, t = _scores(q, k, params, compute_dtype)
    if lse is None:
        lse = _lse(scores, params)
    probs = _probabilities_from_lse(scores, lse)
    do = grad_out.to(compute_dtype)
    kk = k.to(compute_dtype).repeat_interleave(group, dim=1)
    vv = v.to(compute_dtype).repeat_interleave(group, dim=1)
    dv = _dropped(probs, keep_mask, params.dropout_p).transpose(-1, -2) @ do
    dp = _dropped(do @ vv.transpose(-1, -2), keep_mask, params.dropout_p)
    if out is None:
        out = (_dropped(probs, keep_mask, params.dropout_p) @ vv).to(q.dtype)
    delta = (do * out.to(compute_dtype)).sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    ds_pre = variants.score_grad(ds, t, **params.score_rules)
    dq = (ds_pre @ kk) * params.scale
    dk = (ds_pre.transpose(-1, -2) @ q.to(compute_dtype)) * params.scale
    # (B, Hq, Lk, D) → (B, Hkv, group, Lk, D) → sum over the group.
    dk = dk.view(batch, heads_kv, group, seqlen_k, -1).sum(2)
    dv = dv.view(batch, heads_kv, group, seqlen_k, -1).sum(2)
    dsinks = None
    if params.sinks is not None:
        dsinks = variants.sink_grad(params.sinks, lse, grad_out, out)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds, dsinks


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
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    chunk: Optional[int] = None,
    keep_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
    **score_rules: Optional[float],
):
    """The oracle with the entry point's arguments; differentiable through plain autograd (sinks included).
    ``score_rules``: the scalar score rules, as the entry point's keywords (``fastattn.variants.SCORE_RULES``).

    ``keep_mask`` (boolean, broadcastable to ``(B, Hq, Lq, Lk)``) applies dropout explicitly so that other
    backends' dropout can be checked against it; ``dropout_p`` is then its rate (without ``keep_mask``,
    ``dropout_p`` is ignored: the oracle draws nothing). ``compute_dtype`` defaults to float32 for half types
    and to the input dtype otherwise; ``sinks`` join the softmax in ``compute_dtype``.
    """
    params, q, k, v = validate(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, q_offset,
        alibi_slopes=alibi_slopes, sinks=sinks, chunk=chunk, **score_rules,
    )  # fmt: skip
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    if keep_mask is not None:
        keep_mask = keep_mask.reshape((1,) * (4 - keep_mask.dim()) + tuple(keep_mask.shape))
    if params.seqlen_k == 0:
        out = q.new_zeros(params.batch, params.heads_q, params.seqlen_q, params.head_dim_v)
        lse = torch.full(out.shape[:-1], float("-inf"), dtype=_lse_dtype(compute_dtype), device=q.device)
        if params.sinks is not None:  # nothing to attend but the sink
            lse = params.sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
    else:
        out, lse = attention_forward(q, k, v, params, keep_mask, compute_dtype)
    if params.three_d:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------- packed sequences


def _empty_rows_lse(params: AttnParams, rows: int, dtype: torch.dtype, device) -> Tensor:
    """The lse ``(1, Hq, rows)`` of rows with no keys: the sink's logit, or -inf."""
    if params.sinks is not None:
        return params.sinks.to(dtype).view(1, -1, 1).expand(1, params.heads_q, rows)
    return torch.full((1, params.heads_q, rows), float("-inf"), dtype=dtype, device=device)


def _sequence_keep(philox: Optional[Tensor], params: AttnParams, b: int, lq: int, lk: int) -> Optional[Tensor]:
    if philox is None or params.dropout_p <= 0.0:
        return None
    return keep_mask_sequence(philox, b, params.heads_q, lq, lk, params.seqlen_q, params.seqlen_k, params.dropout_p)


def packed_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    params: AttnParams,
    philox: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """Packed oracle forward: ``q (1, Hq, total_q, D)`` etc. → ``(out (1, Hq, total_q, Dv), lse (1, Hq, total_q))``.

    Each sequence runs ``attention_forward`` alone; ``out`` is token-major (``registry.packed_empty``). Rows of a
    sequence with no keys give zeros and the sink's logit (or -inf).
    """
    from .backends.registry import packed_empty

    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    lse_dtype = _lse_dtype(compute_dtype)
    out = packed_empty(q, params.heads_q, params.total_q, params.head_dim_v)
    lse = q.new_empty(1, params.heads_q, params.total_q, dtype=lse_dtype)
    for b, (sq, lq, sk, lk) in enumerate(zip(*params.seq_lengths())):
        if lq == 0:
            continue
        rows = slice(sq, sq + lq)
        if lk == 0:
            out[:, :, rows] = 0
            lse[:, :, rows] = _empty_rows_lse(params, lq, lse_dtype, q.device)
            continue
        keys = slice(sk, sk + lk)
        keep = _sequence_keep(philox, params, b, lq, lk)
        out[:, :, rows], lse[:, :, rows] = attention_forward(
            q[:, :, rows], k[:, :, keys], v[:, :, keys], params.sequence(b, lq, lk), keep, compute_dtype
        )
    return out, lse


def packed_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    params: AttnParams,
    philox: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Packed oracle backward: ``(dq, dk, dv)`` token-major (``registry.packed_empty``), from the saved ``out``/``lse``.

    Each sequence runs ``attention_backward`` alone; rows and keys of empty pairs get zero gradients.
    """
    from .backends.registry import packed_empty

    dq, dk, dv = (packed_empty(t, t.shape[1], t.shape[2], t.shape[3]).zero_() for t in (q, k, v))
    for b, (sq, lq, sk, lk) in enumerate(zip(*params.seq_lengths())):
        if lq == 0 or lk == 0:
            continue
        rows, keys = slice(sq, sq + lq), slice(sk, sk + lk)
        keep = _sequence_keep(philox, params, b, lq, lk)
        dq_b, dk_b, dv_b, _, _ = attention_backward(
            grad_out[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], params.sequence(b, lq, lk), keep,
            compute_dtype, out=out[:, :, rows], lse=lse[:, :, rows],
        )  # fmt: skip
        dq[:, :, rows], dk[:, :, keys], dv[:, :, keys] = dq_b, dk_b, dv_b
    return dq, dk, dv


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    window: Optional[tuple[int, int]] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    chunk: Optional[int] = None,
    keep_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
    **score_rules: Optional[float],
):
    """The packed oracle with ``fastattn.varlen_attention``'s arguments: ``attention`` on each sequence alone.

    Differentiable through plain autograd (the sinks included): the independent statement of every packed
    gradient. ``keep_mask`` (``(B, Hq, max_seqlen_q, max_seqlen_k)`` bool, the padded batch's) applies dropout
    explicitly, sequence ``b`` taking ``keep_mask[b, :, :Lq_b, :Lk_b]``. Returns ``out (total_q, Hq, Dv)`` and,
    with ``return_lse``, ``lse (Hq, total_q)``.
    """
    params, q, k, v = validate_packed(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
        enable_gqa, window, alibi_slopes=alibi_slopes, sinks=sinks, chunk=chunk, **score_rules,
    )  # fmt: skip
    compute_dtype = compute_dtype or _default_compute_dtype(q.dtype)
    outs, lses = [], []
    for b, (sq, lq, sk, lk) in enumerate(zip(*params.seq_lengths())):
        alibi = params.alibi
        if alibi is not None and alibi.shape[0] > 1:
            alibi = alibi[b : b + 1]
        keep = None if keep_mask is None else keep_mask[b : b + 1, :, :lq, :lk]
        out_b, lse_b = attention(
            q[:, :, sq : sq + lq], k[:, :, sk : sk + lk], v[:, :, sk : sk + lk], is_causal=params.causal,
            scale=params.scale, enable_gqa=enable_gqa, window=window, q_offset=lk - lq, alibi_slopes=alibi,
            sinks=sinks, chunk=chunk, keep_mask=keep, dropout_p=dropout_p, return_lse=True,
            compute_dtype=compute_dtype, **score_rules,
        )  # fmt: skip
        outs.append(out_b)
        lses.append(lse_b.expand(1, params.heads_q, lq))
    # (1, Hq, total_q, Dv) → (total_q, Hq, Dv)
    out = torch.cat(outs, dim=2)[0].transpose(0, 1) if outs else q.new_zeros(0, params.heads_q, params.head_dim_v)
    lse = torch.cat(lses, dim=2)[0] if lses else q.new_zeros(params.heads_q, 0, dtype=_lse_dtype(compute_dtype))
    return (out, lse) if return_lse else out

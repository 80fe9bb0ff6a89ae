"""The entry points: validate → ``AttnParams`` → backend → one autograd.Function.

``scaled_dot_product_attention`` takes dense ``(B, H, L, D)`` batches; ``varlen_attention`` takes packed
sequences (``cu_seqlens``). Both go through the same autograd function and the same backend ops, which read
the layout from the params.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor

from ._autograd import AttentionFunction, EmptyAttention
from ._validate import validate, validate_packed
from .backends.registry import autocast_inputs, choose

__all__ = ["scaled_dot_product_attention", "varlen_attention"]


def _distinct(*tensors):
    """The same tensors, a tensor passed twice (self-attention's ``q = k = v``) as a view of itself the second time.

    ``torch.compile`` cannot trace an ``autograd.Function`` given one tensor for two inputs; a view is free, and
    gradients reach the original through it. Compared with ``is``, not ``id()``: torch 2.11's dynamo cannot take
    ``id()`` of a tensor computed inside the graph (``q = k = v = x @ w``) and raises under ``fullgraph=True``.
    """
    out: list = []
    for t in tensors:
        if t is not None:
            for u in out:
                if u is t:
                    t = t.view(t.shape)
                    break
        out.append(t)
    return out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    window: Optional[tuple[int, int]] = None,
    q_offset: int = 0,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    chunk: Optional[int] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Masked scaled dot-product attention with the signature of torch's, and fused masks and variants.

    Shapes (4-D; 3-D inputs drop the batch dim)::

        query  (B, Hq,  Lq, E)      key (B, Hkv, Lk, E)      value (B, Hkv, Lk, Ev)
        attn_mask broadcastable to (B, Hq, Lq, Lk)            out   (B, Hq, Lq, Ev)
        lse    (B, Hq, Lq) float32, natural log, -inf for a row that attends nothing (without sinks)

    Semantics follow ``torch.nn.functional.scaled_dot_product_attention`` (boolean mask True =
    attend, a float mask is added to the scores, ``scale`` defaults to ``1/sqrt(E)``, GQA with
    ``enable_gqa`` where query head ``h`` reads key head ``h // (Hq // Hkv)``), with these
    differences:

    * ``attn_mask`` and ``is_causal=True`` may be given together: they combine.
    * A query row that attends nothing gives zeros (and zero gradients), never NaN.
    * key and value must have the same length (torch's CPU path does not check).
    * ``window=(left, right)``: query ``i`` attends keys ``j`` with
      ``i + q_offset - left <= j <= i + q_offset + right``; ``-1`` leaves that side unbounded.
    * ``q_offset``: query ``i`` sits at key position ``i + q_offset`` for causal, window, chunk and
      ALiBi. 0 is torch's top-left ``is_causal``; ``Lk - Lq`` is FlashAttention's bottom-right
      alignment, the one KV-cache decoding needs. torch's ``causal_upper_left`` /
      ``causal_lower_right`` objects are accepted as ``attn_mask``. Example, Lq = 2, Lk = 4, causal
      (``x`` attends)::

          q_offset=0        q_offset=2 (= Lk - Lq)
          x . . .           x x x .
          x x . .           x x x x

    * ``softcap``: the score becomes ``softcap * tanh(score / softcap)`` (Gemma 2), after the scale.
    * ``alibi_slopes`` (``(Hq,)`` or ``(B, Hq)``, float32): ``-slope * |i + q_offset - j|`` is added to
      the score after the softcap, computed in the kernels (no bias tensor); no gradient.
    * ``sinks`` (``(Hq,)``): one learned logit per query head that joins every row's softmax
      denominator and carries no value (gpt-oss); its gradient is computed. The lse includes it; a row
      with nothing to attend gives zeros (and lse = the sink).
    * ``chunk``: query ``i`` attends key ``j`` only when ``(i + q_offset) // chunk == j // chunk``
      (Llama 4's chunked attention); empty tiles are skipped as for causal.
    * Order: scale, softcap, ALiBi, float mask; the allowed set is causal ∧ window ∧ chunk ∧ boolean mask.
    * ``attn_mask`` may be a ``fastattn.Mask``: its per-tile summary is built once and reused.
    * ``return_lse=True`` returns ``(out, lse)``; the lse carries no gradient.
    * ``backend``: ``None``/``"auto"`` picks one (``FASTATTN_BACKEND`` overrides), or a name from
      ``fastattn.backends.names()``; a named backend that cannot take the inputs raises with its
      reason.
    * Under ``torch.autocast``, float32 inputs run in the autocast dtype.

    Dropout (``dropout_p > 0``) is applied whenever asked, as in torch's functional form.
    """
    if isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor):
        query, key, value = autocast_inputs(query, key, value)
    params, q, k, v = validate(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, q_offset,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, chunk=chunk,
    )  # fmt: skip
    if q.numel() == 0 or params.seqlen_k == 0 or params.head_dim_v == 0:
        out, lse = EmptyAttention.apply(q, k, v, params.sinks)
    else:
        chosen = choose(backend, params)
        out, lse = AttentionFunction.apply(*_distinct(q, k, v, params.mask, params.sinks), chosen, params)
    if params.three_d:
        # (1, H, L, Ev) → (H, L, Ev)
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    window: Optional[tuple[int, int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    chunk: Optional[int] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention over packed variable-length sequences (FlashAttention's ``flash_attn_varlen_func``).

    Shapes::

        query (total_q, Hq, E)     key (total_k, Hkv, E)     value (total_k, Hkv, Ev)
        cu_seqlens_q, cu_seqlens_k (B + 1,) int32 or int64, on the inputs' device
        out   (total_q, Hq, Ev)    lse (Hq, total_q) float32, natural log

    Sequence ``b`` is queries ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` and keys ``cu_seqlens_k[b] :
    cu_seqlens_k[b + 1]``; it attends only its own keys. The offsets start at 0, never decrease and end at the
    tensors' token counts; a sequence may be empty on either side (rows with no keys give zeros, and zero
    gradients). ``max_seqlen_q``/``max_seqlen_k`` are Python ints at least the longest sequence (the kernels
    size nothing by them, but ints keep ``torch.compile(fullgraph=True)`` free of ``.item()``).

    Alignment is **bottom-right per sequence**: query ``i`` of sequence ``b`` sits at key position
    ``i + Lk_b - Lq_b`` for ``is_causal``, ``window``, ``chunk`` and ALiBi (FlashAttention's convention); with
    equal lengths this is ordinary causal attention. Example, ``Lq_b = 2``, ``Lk_b = 4``, causal::

        x x x .
        x x x x

    The other keywords are those of ``scaled_dot_product_attention`` (``window=(left, right)``, ``softcap``,
    ``sinks (Hq,)``, ``chunk``, GQA with ``enable_gqa``); ``alibi_slopes`` is ``(Hq,)`` or ``(B, Hq)``, one row
    per sequence. Dropout (``dropout_p > 0``) draws for sequence ``b`` the numbers of row ``b`` of the batch
    padded to the maximum lengths (``fastattn.backends._philox``). The lse of a row with no keys is the sink's
    logit, or ``-inf``.

    Work is proportional to ``sum_b Lq_b * Lk_b`` (less under causal/window/chunk): no padding is computed and no
    ``(total_q, total_k)`` or ``B * max_q * max_k`` tensor exists (except on ``backend="reference"``, the oracle).
    Bad offsets raise an error naming the argument; their values are checked once per tensor, eagerly (while
    ``torch.compile`` traces they are trusted, as FlashAttention does).
    """
    if isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor):
        query, key, value = autocast_inputs(query, key, value)
    params, q, k, v = validate_packed(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale,
        enable_gqa, window, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, chunk=chunk,
    )  # fmt: skip
    if params.total_q == 0 or params.total_k == 0 or params.head_dim_v == 0 or params.batch == 0:
        out, lse = EmptyAttention.apply(q, k, v, params.sinks)
    else:
        chosen = choose(backend, params)
        out, lse = AttentionFunction.apply(q, k, v, None, params.sinks, chosen, params)
    # (1, Hq, total_q, Ev) → (total_q, Hq, Ev); (1, Hq, total_q) → (Hq, total_q)
    out, lse = out[0].transpose(0, 1), lse[0]
    return (out, lse) if return_lse else out

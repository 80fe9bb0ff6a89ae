"""``scaled_dot_product_attention``: validate → MaskSpec → backend → one autograd.Function."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor

from ._autograd import AttentionFunction, EmptyAttention
from ._validate import validate
from .backends.registry import choose

__all__ = ["scaled_dot_product_attention"]


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
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Masked scaled dot-product attention with the signature of torch's, and fused masks.

    Shapes (4-D; 3-D inputs drop the batch dim)::

        query  (B, Hq,  Lq, E)      key (B, Hkv, Lk, E)      value (B, Hkv, Lk, Ev)
        attn_mask broadcastable to (B, Hq, Lq, Lk)            out   (B, Hq, Lq, Ev)
        lse    (B, Hq, Lq) float32, natural log, -inf for a row that attends nothing

    Semantics follow ``torch.nn.functional.scaled_dot_product_attention`` (boolean mask True =
    attend, a float mask is added to the scores, ``scale`` defaults to ``1/sqrt(E)``, GQA with
    ``enable_gqa`` where query head ``h`` reads key head ``h // (Hq // Hkv)``), with these
    differences:

    * ``attn_mask`` and ``is_causal=True`` may be given together: they combine.
    * A query row that attends nothing gives zeros (and zero gradients), never NaN.
    * key and value must have the same length (torch's CPU path does not check).
    * ``window=(left, right)``: query ``i`` attends keys ``j`` with
      ``i + q_offset - left <= j <= i + q_offset + right``; ``-1`` leaves that side unbounded.
    * ``q_offset``: query ``i`` sits at key position ``i + q_offset`` for causal and window. 0 is
      torch's top-left ``is_causal``; ``Lk - Lq`` is FlashAttention's bottom-right alignment, the
      one KV-cache decoding needs. torch's ``causal_upper_left`` / ``causal_lower_right`` objects
      are accepted as ``attn_mask``. Example, Lq = 2, Lk = 4, causal (``x`` attends)::

          q_offset=0        q_offset=2 (= Lk - Lq)
          x . . .           x x x .
          x x . .           x x x x

    * ``attn_mask`` may be a ``fastattn.Mask``: its per-tile summary is built once and reused.
    * ``return_lse=True`` returns ``(out, lse)``; the lse carries no gradient.
    * ``backend``: ``None``/``"auto"`` picks one (``FASTATTN_BACKEND`` overrides), or a name from
      ``fastattn.backends.names()``; a named backend that cannot take the inputs raises with its
      reason.

    Dropout (``dropout_p > 0``) is applied whenever asked, as in torch's functional form.
    """
    problem, q, k, v, spec = validate(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, q_offset
    )
    if q.numel() == 0 or problem.seqlen_k == 0 or problem.head_dim_v == 0:
        chosen = None
        out, lse = EmptyAttention.apply(q, k, v)
    else:
        chosen = choose(backend, problem, spec, float(dropout_p))
        out, lse = AttentionFunction.apply(q, k, v, spec.tensor, chosen, spec, problem.scale, float(dropout_p))
    if problem.three_d:
        # (1, H, L, Ev) → (H, L, Ev)
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out

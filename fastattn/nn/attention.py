"""``Attention``: the seq2seq attention in which decoder states attend over encoder states.

The classic Bahdanau/Luong-style block (one decoder state at a time, ``Lq = 1``), with learned
query/key/value projections and two scores: ``"dot"`` (scaled by ``1/sqrt(hidden_size)``) and
``"cosine"`` (normalised query and key, divided by a temperature). The attended vector comes from
the fused entry point; the returned weights are computed explicitly beside it: for ``Lq = 1`` that
is ``O(B * Lk)`` memory and as many FLOPs as the attention itself, and it keeps their gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import scaled_dot_product_attention
from .multihead import _shape, check_backend

__all__ = ["Attention"]

_TYPES = ("dot", "cosine")


class Attention(nn.Module):
    """``attended, weights = Attention("dot" | "cosine", hidden_size)(query, context, mask)``.

    Shapes: ``query`` ``(B, hidden)`` (one decoder state) or ``(B, Lq, hidden)``; ``context``
    ``(B, Lk, hidden)``; ``mask`` ``(B, Lk)`` boolean, **True = attend** (fastattn's convention,
    the opposite of ``nn.MultiheadAttention``'s ``key_padding_mask``). Returns ``attended`` shaped
    like ``query`` and ``weights`` ``(B, Lk)`` or ``(B, Lq, Lk)``; a row with no key to attend gives
    zeros in both.

    ``temperature`` (cosine only): similarities in ``[-1, 1]`` are divided by it before the
    softmax; smaller is sharper.
    """

    def __init__(
        self,
        attention_type: str = "dot",
        hidden_size: int = 256,
        *,
        temperature: float = 1.0,
        bias: bool = True,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if attention_type not in _TYPES:
            raise ValueError(f"attention_type: expected one of {_TYPES}, got {attention_type!r}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size!r}")
        if attention_type == "cosine" and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        self.attention_type = attention_type
        self.hidden_size = hidden_size
        self.temperature = float(temperature)
        self.backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.query_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)
        self.key_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)
        self.value_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)

    def extra_repr(self) -> str:
        extra = f", temperature={self.temperature}" if self.attention_type == "cosine" else ""
        return f"{self.attention_type!r}, hidden_size={self.hidden_size}{extra}, backend={self.backend or 'auto'}"

    def forward(self, query: Tensor, context: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        hidden = self.hidden_size
        if not isinstance(query, Tensor) or query.dim() not in (2, 3) or query.shape[-1] != hidden:
            got = _shape(query) if isinstance(query, Tensor) else type(query).__name__
            raise ValueError(f"query: expected shape (B, {hidden}) or (B, Lq, {hidden}), got {got}")
        if not isinstance(context, Tensor) or context.dim() != 3 or context.shape[-1] != hidden:
            got = _shape(context) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context: expected shape (B, Lk, {hidden}), got {got}")
        batch, seqlen_k = context.shape[0], context.shape[1]
        if query.shape[0] != batch:
            raise ValueError(f"query: expected batch size {batch} (context's), got shape {_shape(query)}")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, seqlen_k):
                got = f"{mask.dtype} {_shape(mask)}" if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(
                    f"mask: expected a bool tensor of shape ({batch}, {seqlen_k}), True = attend; got {got}"
                )
        single = query.dim() == 2
        # (B, [Lq,] hidden) → (B, 1 head, Lq, hidden)
        q = self.query_proj(query).view(batch, 1, -1, hidden)
        k = self.key_proj(context).unsqueeze(1)
        v = self.value_proj(context).unsqueeze(1)
        if self.attention_type == "cosine":
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scale = 1.0 / self.temperature
        else:
            scale = 1.0 / math.sqrt(hidden)
        # (B, Lk) → (B, 1, 1, Lk): a key-padding mask, broadcast over heads and queries.
        mask4 = None if mask is None else mask.view(batch, 1, 1, seqlen_k)
        attended = scaled_dot_product_attention(q, k, v, attn_mask=mask4, scale=scale, backend=self.backend)
        scores = (q @ k.transpose(-2, -1)) * scale
        if mask4 is not None:
            # A row with nothing to attend gives zero weights (as the fused output gives zeros), and
            # finite scores before the softmax keep its gradient free of NaN.
            empty = ~mask4.any(dim=-1, keepdim=True)
            scores = scores.masked_fill(~mask4, float("-inf")).masked_fill(empty, 0.0)
        weights = torch.softmax(scores, dim=-1)
        if mask4 is not None:
            weights = weights.masked_fill(empty, 0.0)
        # (B, 1, Lq, ·) → (B, Lq, ·) or (B, ·)
        attended, weights = attended.squeeze(1), weights.squeeze(1)
        if single:
            attended, weights = attended.squeeze(1), weights.squeeze(1)
        return attended, weights

"""Every input check of the entry point, and the normalisation to 4-D plus a ``MaskSpec``.

One module owns every error message so that all backends refuse bad input the same way: each
error names the argument, what was expected and what was received.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .masks import Mask, MaskSpec

__all__ = ["Problem", "validate"]


@dataclass(frozen=True)
class Problem:
    """Sizes of one attention call, after normalising 3-D inputs to 4-D."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    three_d: bool

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv if self.heads_kv else 1


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


_LAYOUT_HINT = (
    "; the shapes look like (batch, seqlen, heads, head_dim): fastattn, like torch's SDPA, takes "
    "(batch, heads, seqlen, head_dim), so pass {names}"
)


def _layout_hint(query: Tensor, key: Tensor, value: Tensor) -> str:
    """A hint when exchanging the heads and seqlen dims of some of the inputs makes their shapes agree.

    The usual cause of a head-count or length error is a ``(batch, seqlen, heads, head_dim)`` tensor (the
    layout of FlashAttention's API and of many models' projections): if transposing all three inputs, or
    key and value, or one of them, gives consistent heads and lengths, and one of those reads as more
    heads than positions (rare in a real (batch, heads, seqlen, head_dim) tensor), say so.
    """
    dims = {"query": tuple(query.shape[-3:-1]), "key": tuple(key.shape[-3:-1]), "value": tuple(value.shape[-3:-1])}
    for names in (("query", "key", "value"), ("key", "value"), ("query",), ("key",), ("value",)):
        if not any(dims[n][0] > dims[n][1] for n in names):  # read as heads > seqlen: the mark of a transpose
            continue
        (hq, _), (hk, lk), (hv, lv) = ((d[1], d[0]) if n in names else d for n, d in dims.items())
        if hk == hv and lk == lv and hk > 0 and hq % hk == 0:
            return _LAYOUT_HINT.format(names=", ".join(f"{n}.transpose(-3, -2)" for n in names))
    return ""


def _causal_bias(attn_mask: Any) -> Optional[str]:
    """'upper_left' / 'lower_right' for torch's CausalBias objects, else None."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover - torch without the module
        return None
    if isinstance(attn_mask, CausalBias):
        return "upper_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "lower_right"
    return None


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    return int(value)


def validate(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: Any = 0.0,
    is_causal: Any = False,
    scale: Any = None,
    enable_gqa: Any = False,
    window: Any = None,
    q_offset: Any = 0,
) -> tuple[Problem, Tensor, Tensor, Tensor, MaskSpec]:
    """Checks the inputs and returns ``(problem, q, k, v, spec)`` with q, k, v as 4-D views."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(
                f"{name}: expected a 3-D (heads, seqlen, head_dim) or 4-D (batch, heads, seqlen, head_dim) "
                f"tensor, got {t.dim()}-D with shape {_shape(t)}"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            f"key, value: expected the same number of dims as query ({query.dim()}-D), "
            f"got key {key.dim()}-D and value {value.dim()}-D"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key, value: expected one dtype, got query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key, value: expected one device, got query {query.device}, key {key.device}, value {value.device}"
        )
    three_d = query.dim() == 3
    # (H, L, E) → (1, H, L, E): one code path below.
    q, k, v = (t.unsqueeze(0) if three_d else t for t in (query, key, value))
    batch, heads_q, seqlen_q, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(
            f"key, value: expected batch size {batch} (query's), got key {k.shape[0]} and value {v.shape[0]}"
        )
    if k.shape[-1] != head_dim:
        raise ValueError(
            f"key: expected head_dim {head_dim} (query's last dim), got {k.shape[-1]} (key shape {_shape(key)})"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"value: expected the same seqlen as key ({k.shape[-2]}), got {v.shape[-2]} (value shape {_shape(value)})"
            + _layout_hint(query, key, value)
        )
    if k.shape[-3] != v.shape[-3]:
        raise ValueError(
            f"value: expected {k.shape[-3]} heads (key's), got {v.shape[-3]}" + _layout_hint(query, key, value)
        )
    heads_kv = k.shape[-3]
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa: expected a bool, got {type(enable_gqa).__name__}")
    if heads_kv != heads_q:
        if not enable_gqa:
            raise ValueError(
                f"key, value: expected {heads_q} heads (query's) unless enable_gqa=True, got {heads_kv}"
                + _layout_hint(query, key, value)
            )
        if heads_kv == 0 or heads_q % heads_kv:
            raise ValueError(
                f"key, value: with enable_gqa, expected a head count dividing query's {heads_q}, got {heads_kv}"
                + _layout_hint(query, key, value)
            )
    seqlen_k = k.shape[-2]

    if scale is None:
        scale_f = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    else:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__} {scale!r}")
        scale_f = float(scale)
        if not math.isfinite(scale_f):
            raise ValueError(f"scale: expected a finite number, got {scale_f}")

    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    offset = _check_int("q_offset", q_offset)

    if window is None:
        win = (-1, -1)
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise TypeError(f"window: expected a pair (left, right) of integers >= -1, got {window!r}")
        win = (_check_int("window[0]", window[0]), _check_int("window[1]", window[1]))
        if win[0] < -1 or win[1] < -1:
            raise ValueError(f"window: expected integers >= -1 (-1 = unbounded), got {tuple(window)}")

    causal = is_causal
    mask_obj: Optional[Mask] = None
    variant = _causal_bias(attn_mask)
    if variant is not None:
        bias_lq, bias_lk = attn_mask.seq_len_q, attn_mask.seq_len_kv
        if (bias_lq, bias_lk) != (seqlen_q, seqlen_k):
            raise ValueError(
                f"attn_mask: expected a CausalBias for seqlens ({seqlen_q}, {seqlen_k}), got ({bias_lq}, {bias_lk})"
            )
        if variant == "lower_right":
            if offset != 0:
                raise ValueError(
                    f"q_offset: causal_lower_right already aligns queries at Lk - Lq; expected 0, got {offset}"
                )
            offset = seqlen_k - seqlen_q
        causal = True
        attn_mask = None
    elif isinstance(attn_mask, Mask):
        mask_obj = attn_mask
        attn_mask = attn_mask.tensor

    tensor = base = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(
                f"attn_mask: expected a torch.Tensor, fastattn.Mask, CausalBias or None, got {type(attn_mask).__name__}"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"attn_mask: expected dtype bool or a floating dtype, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: expected device {q.device} (query's), got {attn_mask.device}")
        target = (heads_q, seqlen_q, seqlen_k) if three_d else (batch, heads_q, seqlen_q, seqlen_k)
        if attn_mask.dim() > len(target) or any(
            m not in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target))
        ):
            raise ValueError(
                f"attn_mask: expected a shape broadcastable to ({', '.join(map(str, target))}), got {_shape(attn_mask)}"
                + (_layout_hint(query, key, value) if heads_q > seqlen_q else "")
            )
        # Left-pad to 4-D with size-1 dims (base), then a stride-0 broadcast view (never copied).
        base = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        tensor = base.expand(batch, heads_q, seqlen_q, seqlen_k)

    problem = Problem(
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        head_dim_v=v.shape[-1],
        dtype=q.dtype,
        device=q.device,
        scale=scale_f,
        three_d=three_d,
    )
    spec = MaskSpec(
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        causal=causal,
        window=win,
        q_offset=offset,
        tensor=tensor,
        base=base,
        mask_obj=mask_obj,
    )
    return problem, q, k, v, spec

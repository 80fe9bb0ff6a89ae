"""Every input check of the entry point, and the normalisation into an ``AttnParams`` and 4-D tensors.

One module owns every error message so that all backends refuse bad input the same way: each error names
the argument, what was expected and what was received. ``validate`` runs the checks in order, each a
function of its own that checks one thing (the tensors, their shapes, each scalar, the mask, each variant).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from .masks import Mask
from .params import AttnParams
from .variants import check_score_rules

__all__ = ["validate", "validate_packed"]


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


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def _check_tensors(query: Any, key: Any, value: Any) -> None:
    """Tensors, 3-D or 4-D alike, one floating dtype, one device."""
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


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> None:
    """Batch, head dim, key/value lengths and head counts agree (GQA only with ``enable_gqa``)."""

    def hint() -> str:
        return _layout_hint(query, key, value)

    batch, heads_q, _, head_dim = q.shape
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
            + hint()
        )
    if k.shape[-3] != v.shape[-3]:
        raise ValueError(f"value: expected {k.shape[-3]} heads (key's), got {v.shape[-3]}" + hint())
    heads_kv = k.shape[-3]
    if heads_kv != heads_q:
        if not enable_gqa:
            raise ValueError(
                f"key, value: expected {heads_q} heads (query's) unless enable_gqa=True, got {heads_kv}" + hint()
            )
        if heads_kv == 0 or heads_q % heads_kv:
            raise ValueError(
                f"key, value: with enable_gqa, expected a head count dividing query's {heads_q}, got {heads_kv}"
                + hint()
            )


def _check_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale: expected a finite number, got {float(scale)}")
    return float(scale)


def _check_dropout(dropout_p: Any) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _check_window(window: Any) -> tuple[int, int]:
    if window is None:
        return (-1, -1)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window: expected a pair (left, right) of integers >= -1, got {window!r}")
    win = (_check_int("window[0]", window[0]), _check_int("window[1]", window[1]))
    if win[0] < -1 or win[1] < -1:
        raise ValueError(f"window: expected integers >= -1 (-1 = unbounded), got {tuple(window)}")
    return win


def _causal_bias(attn_mask: Any) -> Optional[str]:
    """'upper_left' / 'lower_right' for torch's CausalBias objects, else None."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover - torch without the module
        return None
    if isinstance(attn_mask, CausalBias):
        return "upper_left" if attn_mask.variant == CausalVariant.UPPER_LEFT else "lower_right"
    return None


def _resolve_causal_bias(attn_mask: Any, seqlen_q: int, seqlen_k: int, q_offset: int) -> tuple[Any, bool, int]:
    """A torch ``CausalBias`` as ``is_causal`` (``q_offset = Lk - Lq`` if lower-right): ``(mask, causal, offset)``."""
    variant = _causal_bias(attn_mask)
    if variant is None:
        return attn_mask, False, q_offset
    bias_lq, bias_lk = attn_mask.seq_len_q, attn_mask.seq_len_kv
    if (bias_lq, bias_lk) != (seqlen_q, seqlen_k):
        raise ValueError(
            f"attn_mask: expected a CausalBias for seqlens ({seqlen_q}, {seqlen_k}), got ({bias_lq}, {bias_lk})"
        )
    if variant == "lower_right":
        if q_offset != 0:
            raise ValueError(
                f"q_offset: causal_lower_right already aligns queries at Lk - Lq; expected 0, got {q_offset}"
            )
        q_offset = seqlen_k - seqlen_q
    return None, True, q_offset


def _check_mask(
    attn_mask: Any, q: Tensor, three_d: bool, seqlen_k: int, hint: Callable[[], str]
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Mask]]:
    """``(view broadcast to (B, Hq, Lq, Lk), the mask with size-1 dims kept, the fastattn.Mask)``, or Nones."""
    mask_obj = None
    if isinstance(attn_mask, Mask):
        mask_obj, attn_mask = attn_mask, attn_mask.tensor
    if attn_mask is None:
        return None, None, None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(
            f"attn_mask: expected a torch.Tensor, fastattn.Mask, CausalBias or None, got {type(attn_mask).__name__}"
        )
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask: expected dtype bool or a floating dtype, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask: expected device {q.device} (query's), got {attn_mask.device}")
    batch, heads_q, seqlen_q, _ = q.shape
    target = (heads_q, seqlen_q, seqlen_k) if three_d else (batch, heads_q, seqlen_q, seqlen_k)
    if attn_mask.dim() > len(target) or any(
        m not in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target))
    ):
        raise ValueError(
            f"attn_mask: expected a shape broadcastable to ({', '.join(map(str, target))}), got {_shape(attn_mask)}"
            + (hint() if heads_q > seqlen_q else "")
        )
    # Left-pad to 4-D with size-1 dims (base), then a stride-0 broadcast view (never copied).
    base = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    return base.expand(batch, heads_q, seqlen_q, seqlen_k), base, mask_obj


def _check_chunk(chunk: Any) -> int:
    """0 for None (no chunking)."""
    if chunk is None:
        return 0
    value = _check_int("chunk", chunk)
    if value < 1:
        raise ValueError(f"chunk: expected an integer >= 1 (or None), got {value}")
    return value


def _check_alibi(alibi_slopes: Any, q: Tensor, three_d: bool, batch: Optional[int] = None) -> Optional[Tensor]:
    """``(B|1, Hq)`` float32 slopes, or None. No gradient is computed for them (as in FlashAttention).

    ``batch``: the number of sequences when it is not q's first dim (packed sequences).
    """
    if alibi_slopes is None:
        return None
    heads_q = q.shape[1]
    batch = q.shape[0] if batch is None else batch
    if not isinstance(alibi_slopes, Tensor):
        raise TypeError(f"alibi_slopes: expected a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if not alibi_slopes.dtype.is_floating_point:
        raise TypeError(f"alibi_slopes: expected a floating dtype (float32), got {alibi_slopes.dtype}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes: expected device {q.device} (query's), got {alibi_slopes.device}")
    shapes = [(heads_q,)] if three_d else [(heads_q,), (batch, heads_q)]
    if tuple(alibi_slopes.shape) not in shapes:
        expected = " or ".join("(" + ", ".join(map(str, s)) + (",)" if len(s) == 1 else ")") for s in shapes)
        raise ValueError(f"alibi_slopes: expected shape {expected}, got {_shape(alibi_slopes)}")
    if alibi_slopes.requires_grad:
        raise ValueError(
            "alibi_slopes: no gradient is computed for ALiBi slopes (as in FlashAttention), got a tensor that "
            "requires grad; pass alibi_slopes.detach()"
        )
    # (Hq,) → (1, Hq): one indexing rule, stride 0 over the batch.
    return alibi_slopes.reshape(-1 if alibi_slopes.dim() == 2 and not three_d else 1, heads_q).float().contiguous()


def _check_sinks(sinks: Any, q: Tensor) -> Optional[Tensor]:
    """``(Hq,)`` learned sink logits (their gradient is computed), or None."""
    if sinks is None:
        return None
    heads_q = q.shape[1]
    if not isinstance(sinks, Tensor):
        raise TypeError(f"sinks: expected a torch.Tensor or None, got {type(sinks).__name__}")
    if not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks: expected a floating dtype, got {sinks.dtype}")
    if sinks.device != q.device:
        raise ValueError(f"sinks: expected device {q.device} (query's), got {sinks.device}")
    if tuple(sinks.shape) != (heads_q,):
        raise ValueError(f"sinks: expected shape ({heads_q},) (one logit per query head), got {_shape(sinks)}")
    return sinks


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
    *,
    alibi_slopes: Any = None,
    sinks: Any = None,
    chunk: Any = None,
    **score_rules: Any,
) -> tuple[AttnParams, Tensor, Tensor, Tensor]:
    """Checks the inputs and returns ``(params, q, k, v)`` with q, k, v as 4-D views; ``score_rules``: the
    scalar score rules' keywords (``variants.SCORE_RULES``)."""
    _check_tensors(query, key, value)
    enable_gqa = _check_bool("enable_gqa", enable_gqa)
    three_d = query.dim() == 3
    # (H, L, E) → (1, H, L, E): one code path below.
    q, k, v = (t.unsqueeze(0) if three_d else t for t in (query, key, value))
    _check_shapes(q, k, v, query, key, value, enable_gqa)
    batch, heads_q, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[-2]
    scale_f = _check_scale(scale, head_dim)
    dropout = _check_dropout(dropout_p)
    causal = _check_bool("is_causal", is_causal)
    offset = _check_int("q_offset", q_offset)
    win = _check_window(window)
    attn_mask, bias_causal, offset = _resolve_causal_bias(attn_mask, seqlen_q, seqlen_k, offset)
    mask, base, mask_obj = _check_mask(attn_mask, q, three_d, seqlen_k, lambda: _layout_hint(query, key, value))
    params = AttnParams(
        batch=batch,
        heads_q=heads_q,
        heads_kv=k.shape[-3],
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        head_dim_v=v.shape[-1],
        dtype=q.dtype,
        device=q.device,
        scale=scale_f,
        three_d=three_d,
        dropout_p=dropout,
        causal=causal or bias_causal,
        window=win,
        q_offset=offset,
        chunk=_check_chunk(chunk),
        alibi=_check_alibi(alibi_slopes, q, three_d),
        sinks=_check_sinks(sinks, q),
        mask=mask,
        mask_base=base,
        mask_obj=mask_obj,
        **check_score_rules(score_rules),
    )
    return params, q, k, v


# ---------------------------------------------------------------------------------------------- packed sequences

_INDEX_DTYPES = (torch.int32, torch.int64)
# cu_seqlens tensors whose values passed the checks, by id: (weak reference, version counter, total, max length).
# A model calls varlen_attention once per layer with the same tensors; their values are read (a device sync on a
# GPU) once per batch, not once per layer.
_CHECKED_CU: dict[int, tuple[Any, int, int, int]] = {}


def _check_packed_tensors(query: Any, key: Any, value: Any) -> None:
    """Tensors ``(total, heads, head_dim)``, one floating dtype, one device."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name}: expected a 3-D (total_tokens, heads, head_dim) tensor of packed sequences, got "
                f"{t.dim()}-D with shape {_shape(t)}"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key, value: expected one dtype, got query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key, value: expected one device, got query {query.device}, key {key.device}, value {value.device}"
        )


def _check_packed_shapes(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> None:
    """Head dims, key/value token counts and head counts agree (GQA only with ``enable_gqa``)."""
    heads_q, head_dim = query.shape[1], query.shape[2]
    if key.shape[2] != head_dim:
        raise ValueError(f"key: expected head_dim {head_dim} (query's last dim), got {key.shape[2]}")
    if key.shape[0] != value.shape[0]:
        raise ValueError(
            f"value: expected as many tokens as key ({key.shape[0]}), got {value.shape[0]} "
            f"(value shape {_shape(value)})"
        )
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"value: expected {key.shape[1]} heads (key's), got {value.shape[1]}")
    heads_kv = key.shape[1]
    if heads_kv != heads_q:
        if not enable_gqa:
            raise ValueError(f"key, value: expected {heads_q} heads (query's) unless enable_gqa=True, got {heads_kv}")
        if heads_kv == 0 or heads_q % heads_kv:
            raise ValueError(
                f"key, value: with enable_gqa, expected a head count dividing query's {heads_q}, got {heads_kv}"
            )


def _check_cu_seqlens(name: str, cu: Any, device: torch.device) -> None:
    """A 1-D int32/int64 tensor of at least one entry on the inputs' device (its values: ``_check_cu_values``)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of int32 or int64 offsets, got {type(cu).__name__}")
    if cu.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name}: expected dtype torch.int32 or torch.int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-D tensor (batch + 1,) of offsets starting at 0, got shape {_shape(cu)}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device} (query's), got {cu.device}")


def _check_cu_values(name: str, cu: Tensor, total: int, total_name: str) -> int:
    """Starts at 0, never decreases, ends at ``total``: returns the longest sequence's length.

    Reads the values (a device sync on a GPU), once per tensor and version (``_CHECKED_CU``).
    """
    import weakref

    try:
        version = cu._version
    except RuntimeError:  # an inference-mode tensor has no version counter: check it every time
        version = None
    entry = _CHECKED_CU.get(id(cu))
    if version is not None and entry is not None and entry[0]() is cu and entry[1:3] == (version, total):
        return entry[3]
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}: expected offsets starting at 0, got {values[0]} first")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    bad = next((i for i, n in enumerate(lengths) if n < 0), None)
    if bad is not None:
        raise ValueError(
            f"{name}: expected nondecreasing offsets (sequence lengths >= 0), got {values[bad]} then "
            f"{values[bad + 1]} at entries {bad}, {bad + 1}"
        )
    if values[-1] != total:
        raise ValueError(
            f"{name}: expected the last offset to equal the {total_name} tokens ({total}, {total_name}.shape[0]), "
            f"got {values[-1]}"
        )
    longest = max(lengths, default=0)
    if version is not None:
        if len(_CHECKED_CU) > 64:
            _CHECKED_CU.clear()
        _CHECKED_CU[id(cu)] = (weakref.ref(cu), version, total, longest)
    return longest


def _check_max_seqlen(name: str, value: Any, longest: Optional[int], cu_name: str) -> int:
    """A Python int at least the longest sequence (None: not checked, while torch.compile traces)."""
    if isinstance(value, Tensor):
        raise TypeError(
            f"{name}: expected a Python int (a tensor would need a device sync, and breaks torch.compile's graph); "
            f"pass int({name})"
        )
    value = _check_int(name, value)
    if value < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {value}")
    if longest is not None and value < longest:
        raise ValueError(f"{name}: expected at least the longest sequence of {cu_name} ({longest}), got {value}")
    return value


def validate_packed(
    query: Any,
    key: Any,
    value: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: Any,
    max_seqlen_k: Any,
    dropout_p: Any = 0.0,
    is_causal: Any = False,
    scale: Any = None,
    enable_gqa: Any = False,
    window: Any = None,
    *,
    alibi_slopes: Any = None,
    sinks: Any = None,
    chunk: Any = None,
    **score_rules: Any,
) -> tuple[AttnParams, Tensor, Tensor, Tensor]:
    """Checks ``varlen_attention``'s inputs (``score_rules`` as ``validate``'s); returns ``(params, q, k, v)``
    with q, k, v as ``(1, H, total, D)`` views.

    The values of ``cu_seqlens_*`` are checked eagerly (once per tensor); while ``torch.compile`` traces they
    cannot be read without breaking the graph, and are trusted, as FlashAttention's varlen functions do.
    """
    _check_packed_tensors(query, key, value)
    enable_gqa = _check_bool("enable_gqa", enable_gqa)
    _check_packed_shapes(query, key, value, enable_gqa)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, query.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, query.device)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_k: expected the same number of sequences as cu_seqlens_q ({cu_seqlens_q.shape[0] - 1}, "
            f"shape ({cu_seqlens_q.shape[0]},)), got {cu_seqlens_k.shape[0] - 1} (shape ({cu_seqlens_k.shape[0]},))"
        )
    longest_q = longest_k = None
    if not torch.compiler.is_compiling():
        longest_q = _check_cu_values("cu_seqlens_q", cu_seqlens_q, query.shape[0], "query")
        longest_k = _check_cu_values("cu_seqlens_k", cu_seqlens_k, key.shape[0], "key")
    max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, longest_q, "cu_seqlens_q")
    max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, longest_k, "cu_seqlens_k")
    # (total, H, D) → (H, total, D) → (1, H, total, D): views, never copies; the kernels read any strides.
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    batch = cu_seqlens_q.shape[0] - 1
    head_dim = query.shape[2]
    params = AttnParams(
        batch=batch,
        heads_q=query.shape[1],
        heads_kv=key.shape[1],
        seqlen_q=max_q,
        seqlen_k=max_k,
        head_dim=head_dim,
        head_dim_v=value.shape[2],
        dtype=query.dtype,
        device=query.device,
        scale=_check_scale(scale, head_dim),
        dropout_p=_check_dropout(dropout_p),
        causal=_check_bool("is_causal", is_causal),
        window=_check_window(window),
        chunk=_check_chunk(chunk),
        alibi=_check_alibi(alibi_slopes, q, False, batch=batch),
        sinks=_check_sinks(sinks, q),
        layout="packed",
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        total_q=query.shape[0],
        total_k=key.shape[0],
        **check_score_rules(score_rules),
    )
    return params, q, k, v

"""The attention variants' rules, written once in Python: which (query, key) pairs attend, how a score changes.

This module is the Python statement of every rule; the reference backend (dense tensors), the tile summary
(analytic per-tile states), ring attention (which blocks to skip) and the tests use it. The same rules are
written once more per language the kernels are written in, with the same names:

* Triton: ``fastattn/backends/triton/_common.py`` (``@triton.jit`` helpers of the forward and backward);
* C++: ``csrc/attn_rules.h`` (``inline`` host/device functions of the CUDA kernels, their emulator build and
  the CPU kernel).

Positions: query ``i`` sits at key position ``pos = i + q_offset``.

Which pairs attend (all must hold; together they are the "allowed set")::

    band (causal, window):  pos - left <= j <= pos + right          (-1: that side unbounded; causal is right = 0)
    chunk:                  pos // chunk == j // chunk              (floor division; Llama 4's chunked attention)
    key range:              0 <= j < Lk
    boolean mask:           mask[b, h, i, j] is True

Every one of them keeps, for each row, an interval of keys whose ends never decrease as ``i`` grows (the
band's ends are ``pos - left`` and ``pos + right``, the chunk's ``floor(pos / c) * c`` and that plus
``c - 1``): ``row_bounds`` gives the interval, and a tile of rows ``[q0, q1]`` sees keys
``[lo(q0), hi(q1)]`` and sees all of ``[lo(q1), hi(q0)]`` from every row. That is what makes the tile
states analytic (``tile_states``) and exact: consecutive rows' intervals never leave a gap (each row sees
its own position, ``lo(i) <= pos <= hi(i)``), so every key tile between the extremes is non-empty.

How a score is formed, in this order (``score_mod``)::

    s = scale * q·k
    softcap:  s = softcap * tanh(s / softcap)                         (Gemma 2)
    ALiBi:    s = s - slope[b, h] * |pos - j|                         (no gradient, as FlashAttention)
    float mask: s = s + mask[b, h, i, j]

and the softmax of a row runs over its allowed keys plus, with ``sinks``, one extra logit ``sinks[h]`` that
carries no value (gpt-oss): ``lse = log(sum_j exp(s_j) + exp(sinks[h]))``, ``out = sum_j exp(s_j - lse) v_j``.
A row with nothing allowed gives zeros (and ``lse = sinks[h]``, or ``-inf`` without sinks).

Gradients: ``ds_pre = ds * (1 - tanh^2)`` under softcap (``score_grad``), where ``ds`` (the gradient of the
score after softcap and ALiBi, also the float mask's gradient) is ``P * (dP - delta)`` as always; the sink's
is ``dsinks[h] = -sum_{b,i} exp(sinks[h] - lse[b,h,i]) * delta[b,h,i]`` with ``delta = rowsum(dO * O)``
(``sink_grad``): the sink only enters through ``lse``, and ``d out_i / d sink = -P_sink,i * out_i``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "floor_div",
    "row_bounds",
    "allowed",
    "tile_states",
    "SCORE_RULES",
    "check_score_rules",
    "score_mod",
    "score_grad",
    "sink_grad",
    "merge_sinks",
]

EMPTY, PARTIAL, FULL = 0, 1, 2

IntOrTensor = Union[int, Tensor]


def floor_div(a: IntOrTensor, c: int) -> IntOrTensor:
    """``floor(a / c)`` for ``c > 0``, for ints and integer tensors alike (C and Triton truncate instead)."""
    if isinstance(a, Tensor):
        return torch.div(a, c, rounding_mode="floor")
    return a // c


def row_bounds(pos: IntOrTensor, left: int, right: int, chunk: int, big: int) -> tuple[IntOrTensor, IntOrTensor]:
    """Keys ``[lo, hi]`` (inclusive, not clipped to ``[0, Lk)``) that key position ``pos`` may attend.

    ``left``/``right``: the band with causal folded in (-1 unbounded); ``chunk``: 0 for none; ``big``: any
    number larger than every reachable distance (stands for an unbounded side).
    """
    lo = pos - left if left >= 0 else pos - big
    hi = pos + right if right >= 0 else pos + big
    if chunk > 0:
        start = floor_div(pos, chunk) * chunk
        if isinstance(pos, Tensor):
            lo, hi = torch.maximum(lo, start), torch.minimum(hi, start + chunk - 1)
        else:
            lo, hi = max(lo, start), min(hi, start + chunk - 1)
    return lo, hi


def _big(seqlen_q: int, seqlen_k: int, q_offset: int) -> int:
    return seqlen_q + seqlen_k + abs(q_offset) + 1


def allowed(
    seqlen_q: int,
    seqlen_k: int,
    left: int,
    right: int,
    q_offset: int,
    chunk: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Dense ``(Lq, Lk)`` boolean of the pairs the band and the chunk allow (for the oracle and tests)."""
    pos = torch.arange(seqlen_q, device=device).unsqueeze(1) + q_offset
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    lo, hi = row_bounds(pos, left, right, chunk, _big(seqlen_q, seqlen_k, q_offset))
    return (j >= lo) & (j <= hi)


def tile_states(
    seqlen_q: int,
    seqlen_k: int,
    left: int,
    right: int,
    q_offset: int,
    chunk: int,
    block_q: int,
    block_k: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Analytic ``(1, 1, n_q, n_k)`` int8 EMPTY/PARTIAL/FULL states of the band and chunk, per tile.

    A tile of rows ``[q0, q1]`` and keys ``[k0, k1]`` (in range) is EMPTY when ``hi(q1) < k0`` or
    ``lo(q0) > k1`` and FULL when ``lo(q1) <= k0`` and ``hi(q0) >= k1`` (see the module docstring).
    """
    n_q, n_k = max(1, math.ceil(seqlen_q / block_q)), max(1, math.ceil(seqlen_k / block_k))
    big = _big(seqlen_q, seqlen_k, q_offset)
    q_start = torch.arange(n_q, device=device) * block_q
    first = (q_start + q_offset).unsqueeze(1)
    last = (torch.clamp(q_start + block_q, max=max(seqlen_q, 1)) - 1 + q_offset).unsqueeze(1)
    k0 = (torch.arange(n_k, device=device) * block_k).unsqueeze(0)
    k1 = torch.clamp(k0 + block_k, max=max(seqlen_k, 1)) - 1
    lo_first, hi_first = row_bounds(first, left, right, chunk, big)
    lo_last, hi_last = row_bounds(last, left, right, chunk, big)
    empty = (hi_last < k0) | (lo_first > k1)
    full = (lo_last <= k0) & (hi_first >= k1)
    state = torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)
    return state.view(1, 1, n_q, n_k)


# The scalar score rules: each one a keyword of the entry points and the oracle, a float field of ``AttnParams``
# (0.0: off) and a keyword of ``score_mod`` and ``score_grad``; ``check_score_rules`` reads them from a call.
SCORE_RULES = ("softcap",)


def _check_positive(name: str, value: Any) -> float:
    """0.0 for None (the rule is off), else a finite float > 0."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a positive float or None, got {type(value).__name__} {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0.0):
        raise ValueError(f"{name}: expected a finite number > 0 (or None), got {value}")
    return float(value)


def check_score_rules(rules: Mapping[str, Any]) -> dict[str, float]:
    """The scalar score rules of a call (keyword → value, None for off) checked: every ``SCORE_RULES`` name
    with its float (0.0 for off); a keyword that names no rule is a TypeError."""
    unknown = sorted(set(rules) - set(SCORE_RULES))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (the score rules are {', '.join(SCORE_RULES)})")
    return {name: _check_positive(name, rules.get(name)) for name in SCORE_RULES}


def score_mod(
    scores: Tensor, alibi: Optional[Tensor], q_offset: int, *, softcap: float = 0.0
) -> tuple[Tensor, Optional[Tensor]]:
    """``(scores after the score rules and ALiBi, what score_grad needs or None)`` for scaled scores
    ``(B, Hq, Lq, Lk)``; the rules as ``SCORE_RULES`` keywords (0.0: off).

    ``alibi``: ``(B|1, Hq)`` slopes; the bias is ``-slope * |i + q_offset - j|``. ``softcap``: the tanh is
    what ``score_grad`` needs.
    """
    t = None
    if softcap > 0.0:
        t = torch.tanh(scores / softcap)
        scores = t * softcap
    if alibi is not None:
        lq, lk = scores.shape[-2], scores.shape[-1]
        pos = torch.arange(lq, device=scores.device).unsqueeze(1) + q_offset
        dist = (pos - torch.arange(lk, device=scores.device).unsqueeze(0)).abs().to(scores.dtype)
        # (B|1, Hq) → (B|1, Hq, 1, 1) against (Lq, Lk)
        scores = scores - alibi.to(scores.dtype)[:, :, None, None] * dist
    return scores, t


def score_grad(ds: Tensor, t: Optional[Tensor], *, softcap: float = 0.0) -> Tensor:
    """The gradient of the scores before the score rules from the one after them (``t``: ``score_mod``'s
    second result; ALiBi and the mask have derivative 1): the softcap's ``ds * (1 - tanh^2)``."""
    if softcap > 0.0:
        ds = ds * (1.0 - t * t)
    return ds


def sink_grad(sinks: Tensor, lse: Tensor, grad_out: Tensor, out: Tensor) -> Tensor:
    """``dsinks[h] = -sum_{b, i} exp(sinks[h] - lse[b, h, i]) * rowsum(dO * O)[b, h, i]``, in sinks' dtype.

    ``lse`` ``(B, Hq, Lq)`` includes the sink; computed in float32 (float64 for float64 inputs).
    """
    acc = torch.float64 if lse.dtype == torch.float64 or sinks.dtype == torch.float64 else torch.float32
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
    p_sink = torch.exp(sinks.to(acc)[None, :, None] - lse.to(acc))
    return (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)


def merge_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of a softmax over some keys, with the sink logit added to its denominator once.

    ``out`` ``(B, Hq, Lq, Dv)``, ``lse`` ``(B, Hq, Lq)`` (-inf for a row that attended nothing). For merging
    partial results (ring attention): blocks are computed without the sink and it joins at the end.
    """
    sink = sinks.to(lse.dtype)[None, :, None]
    new = torch.logaddexp(lse, sink)
    weight = torch.where(torch.isneginf(lse), 0.0, torch.exp(lse - new))
    return out * weight.unsqueeze(-1).to(out.dtype), new

"""The dropout contract every backend shares: the seed tensor, and its keep-mask written in plain torch ops.

The contract (stated with the Triton kernels in ``fastattn/backends/triton/dropout.py``, implemented bit
for bit in ``csrc/cuda/dropout.cuh`` and by the CPU kernel): ``philox`` is an int64 ``[seed, offset]``
tensor on the inputs' device; score ``(bh = b * Hq + h, i, j)`` is kept iff
``tl.rand(seed, offset + (bh * Lq + i) * Lk + j) >= p``. The autograd function draws ``philox`` once per
call (``philox_seed_offset``) and hands the same tensor to the forward and the backward of whichever
backend runs them, so a backward that falls back to another backend replays the same mask.

``keep_mask`` is that contract in torch ops (Philox-4x32-10 on int64 tensors, 32-bit words masked): the
reference backend applies it, so it follows the same stream as the kernels without importing any of them.
It materialises ``(B, Hq, Lq, Lk)``, as the reference does everything.

Packed sequences (``varlen_attention``) follow the same contract with ``b`` the sequence, ``i``/``j`` positions
inside it and ``Lq``/``Lk`` the call's ``max_seqlen_q``/``max_seqlen_k``: sequence ``b`` draws exactly the
numbers of row ``b`` of the same batch padded to the maximum lengths (``keep_mask_sequence``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["philox_seed_offset", "keep_mask", "keep_mask_sequence"]

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10


def philox_seed_offset(device: torch.device | str) -> Tensor:
    """``[seed, offset]`` (int64, on ``device``) drawn from torch's default generator of the device."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def _mul(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """``(high, low)`` 32-bit words of the 64-bit product of 32-bit words (int64 wraps: its bits are exact)."""
    prod = a * b
    return (prod >> 32) & _M32, prod & _M32


def _philox(seed: Tensor, elem: Tensor) -> Tensor:
    """The first output word of Philox-4x32-10, counter ``(lo(elem), hi(elem), 0, 0)``, key ``(lo, hi)(seed)``."""
    c0, c1 = elem & _M32, (elem >> 32) & _M32
    c2 = c3 = torch.zeros_like(elem)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul(c2, _ROUND_B)
        hi_a, lo_a = _mul(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def keep_mask(philox: Tensor, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, p: float) -> Tensor:
    """The keep-mask of the dropout contract, ``(B, Hq, Lq, Lk)`` bool, on ``philox``'s device."""
    return _keep(philox, 0, batch, heads_q, seqlen_q, seqlen_k, seqlen_q, seqlen_k, p)


def keep_mask_sequence(
    philox: Tensor, b: int, heads_q: int, seqlen_q: int, seqlen_k: int, max_seqlen_q: int, max_seqlen_k: int, p: float
) -> Tensor:
    """The keep-mask ``(1, Hq, Lq_b, Lk_b)`` of packed sequence ``b``: ``keep_mask(philox, B, Hq, max_q, max_k)[b,
    :, :Lq_b, :Lk_b]``, computed for that sequence's pairs only."""
    return _keep(philox, b, 1, heads_q, seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k, p)


def _keep(
    philox: Tensor,
    first: int,
    batch: int,
    heads_q: int,
    rows: int,
    cols: int,
    seqlen_q: int,
    seqlen_k: int,
    p: float,
) -> Tensor:
    """Rows ``[0, rows)`` and keys ``[0, cols)`` of batch rows ``first .. first + batch`` of the contract."""
    device = philox.device
    seed, offset = philox[0], philox[1]
    bh = torch.arange(first * heads_q, (first + batch) * heads_q, dtype=torch.int64, device=device)
    bh = bh.view(batch, heads_q, 1, 1)
    i = torch.arange(rows, dtype=torch.int64, device=device).view(1, 1, rows, 1)
    j = torch.arange(cols, dtype=torch.int64, device=device).view(1, 1, 1, cols)
    elem = offset + (bh * seqlen_q + i) * seqlen_k + j
    bits = _philox(seed, elem)
    # uint_to_uniform_float: the word as int32, x < 0 ? ~x : x, times 2^-31 in fp32.
    x = torch.where(bits >= 2**31, bits - 2**32, bits)
    x = torch.where(x < 0, -x - 1, x)
    uniform = x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=device)
    return uniform >= torch.tensor(p, dtype=torch.float32, device=device)

"""Attention dropout of the graph kernels: counter-based, so the backward regenerates the forward's mask.

Contract (every graph backend implements it bit for bit; do not change one side alone):

* ``philox`` is an int64 tensor ``[seed, offset]`` of shape ``(2,)`` on the features' device, drawn by
  :func:`fastattn.backends._philox.philox_seed_offset` from torch's generator (``torch.manual_seed``
  makes dropout reproducible). The forward op takes it as an input and the backward op gets the same one.
* The random number of edge id ``e`` (see ``fastattn.graph._structure``: edges of ``edge_index``
  first, then the added self loops) and head ``h`` is Triton's ``tl.rand(seed, offset + e * H + h)``
  (Philox-4x32-10, the element index in int64). The pair is kept iff that number is ``>= p``, and a
  kept probability is scaled by ``1 / (1 - p)``. The index depends on neither the CSR order, nor the
  block sizes, nor the thread count, so any kernel regenerates the same mask; the log-sum-exp
  never includes dropout.

Implementations: ``tl.rand`` in the Triton kernels, ``philox_uniform`` in ``csrc/cpu/graph_cpu_params.h``
(the CPU kernels) and :func:`uniform` below, in plain torch integer arithmetic, which the float64
reference uses; the tests check that the three masks are equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends._philox import philox_seed_offset

__all__ = ["philox_seed_offset", "uniform", "keep_mask"]

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a * b`` (``a`` a 32-bit constant, ``b`` uint32 values in int64)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo, p_hi = a * b_lo, a * b_hi  # each below 2**48: no int64 overflow
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def uniform(seed: int, offset: int, index: Tensor) -> Tensor:
    """``tl.rand(seed, offset + index)`` (float32 in [0, 1)) for an int64 ``index`` tensor."""
    elem = index.to(torch.int64) + offset
    c0, c1 = elem & _M32, (elem >> 32) & _M32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the word as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=x.device)


def keep_mask(philox: Tensor, num_ids: int, heads: int, p: float) -> Tensor:
    """The keep-mask ``(num_ids, heads)`` bool of the contract, in plain torch (the reference's)."""
    seed, offset = (int(v) for v in philox.tolist())
    index = torch.arange(num_ids * heads, dtype=torch.int64, device=philox.device)
    return (uniform(seed, offset, index) >= p).view(num_ids, heads)

"""Scheduling packed sequences on the device: one program per real (sequence, tile), no host read.

A kernel over packed sequences must not launch ``B · ceil(max_len / block)`` programs (most of them idle when
lengths vary) nor read ``cu_seqlens`` on the host to count the real tiles (a device sync, and a graph break
under ``torch.compile``). The number of real tiles is at most ``ceil(total / block) + B`` (each sequence wastes
less than one tile), which the host knows from the tensors' shapes; ``tile_schedule`` fills that many
``(sequence, tile)`` entries with torch ops on the device (FlashAttention-3's varlen tile scheduler does the
same prefix sum inside its kernels). The last entries, at most ``B`` of them, name sequence ``B``: the
programs that draw them return at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["num_programs", "tile_schedule"]


def num_programs(total: int, batch: int, block: int) -> int:
    """The upper bound ``ceil(total / block) + batch`` on the real tiles of sequences summing to ``total``."""
    return -(-total // block) + batch


def tile_schedule(cu_seqlens: Tensor, block: int, total: int) -> Tensor:
    """int32 ``(num_programs(total, B, block), 2)``: the ``(sequence, tile)`` of every program, in order.

    Sequence ``b``'s tiles ``0 .. ceil(L_b / block) - 1`` come in order after those of ``b - 1``; empty
    sequences have none; the surplus entries are ``(B, 0)``. O(n log B) device work, no host read.
    """
    batch = cu_seqlens.shape[0] - 1
    n = num_programs(total, batch, block)
    lengths = torch.diff(cu_seqlens.to(torch.int64))
    ends = torch.cumsum(torch.div(lengths + block - 1, block, rounding_mode="floor"), 0)  # (B,) tiles up to b
    t = torch.arange(n, device=cu_seqlens.device, dtype=torch.int64)
    seq = torch.searchsorted(ends, t, right=True)  # the first b whose tiles end after t; B when none
    first = torch.cat([ends.new_zeros(1), ends])[seq]  # (n,) the first tile index of seq
    tile = torch.where(seq < batch, t - first, 0)
    return torch.stack([seq, tile], dim=1).to(torch.int32)

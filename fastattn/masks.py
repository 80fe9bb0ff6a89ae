"""Mask tensors and the per-tile summary that lets every fused backend skip empty tiles.

The summary says, for each (query tile, key tile) pair of a block size, whether the tile is EMPTY (skip
it), FULL (no mask arithmetic needed) or PARTIAL. Its structural part (causal, window, offset, chunk) is
analytic (``fastattn.variants.tile_states``); a mask tensor's part is one reduction over the mask, at a
cost proportional to the mask's own size, and keeps the mask's broadcast (size-1) batch and head dims
(``tensor_tile_summary``). ``AttnParams.tile_summary`` combines the two per tile as ``min(structure,
tensor)``: always sound, though a tile that only their conjunction empties stays PARTIAL (exactness would
cost ``Lq x Lk`` work for a padding mask). It is plain tensors, so it passes through op schemas, and it
never syncs with the host.

``Mask`` wraps a mask tensor reused across calls so that its summary is computed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .variants import EMPTY, FULL, PARTIAL

__all__ = ["EMPTY", "PARTIAL", "FULL", "Mask", "TileSummary", "tensor_tile_summary"]


@dataclass(frozen=True)
class TileSummary:
    """Per-tile states of a mask for one block size.

    ``state``: int8 ``(Bm, Hm, n_q_tiles, n_k_tiles)``, EMPTY/PARTIAL/FULL, where ``Bm``/``Hm`` are
    1 when the mask broadcasts over batch/heads (index them with stride 0).
    ``kv_count``: int32 ``(Bm, Hm, n_q_tiles)``, the number of non-empty key tiles of each query tile.
    ``kv_index``: int32 ``(Bm, Hm, n_q_tiles, n_k_tiles)``; its first ``kv_count`` entries are the
    non-empty key tiles in increasing order (the rest are the empty ones).
    Tiles are judged on in-range positions only: bounds checks at the sequence ends stay the
    kernel's job.
    """

    block_q: int
    block_k: int
    state: Tensor
    kv_count: Tensor
    kv_index: Tensor

    @staticmethod
    def from_state(block_q: int, block_k: int, state: Tensor) -> TileSummary:
        n_k = state.shape[-1]
        nonempty = state != EMPTY
        order = torch.arange(n_k, device=state.device, dtype=torch.int32)
        # Non-empty tiles sort first, each group in increasing tile order.
        key = torch.where(nonempty, order, order + n_k)
        kv_index = torch.argsort(key, dim=-1, stable=True).to(torch.int32)
        kv_count = nonempty.sum(-1, dtype=torch.int32)
        return TileSummary(block_q, block_k, state.contiguous(), kv_count.contiguous(), kv_index.contiguous())

    def coarsen(self, block_q: int, block_k: int) -> TileSummary:
        """The summary for a block that is a multiple of this one: EMPTY if all parts are, FULL if all are."""
        if block_q % self.block_q or block_k % self.block_k:
            raise ValueError(
                f"block: expected multiples of the base block ({self.block_q}, {self.block_k}), "
                f"got ({block_q}, {block_k})"
            )
        fq, fk = block_q // self.block_q, block_k // self.block_k
        if fq == 1 and fk == 1:
            return self
        s = self.state
        bm, hm, nq, nk = s.shape
        nq2, nk2 = math.ceil(nq / fq), math.ceil(nk / fk)
        pad = (0, nk2 * fk - nk, 0, nq2 * fq - nq)
        # Padding tiles lie past the sequence ends: neutral for both reductions.
        hi = torch.nn.functional.pad(s, pad, value=EMPTY).view(bm, hm, nq2, fq, nk2, fk).amax((3, 5))
        lo = torch.nn.functional.pad(s, pad, value=FULL).view(bm, hm, nq2, fq, nk2, fk).amin((3, 5))
        state = torch.where(hi == EMPTY, EMPTY, torch.where(lo == FULL, FULL, PARTIAL)).to(torch.int8)
        return TileSummary.from_state(block_q, block_k, state)


class Mask:
    """A mask tensor that is used for many calls: its tile summary is computed once and reused.

    Pass it as ``attn_mask``. ``base_block`` should divide the tile sizes of the kernels that read
    it (16 divides every kernel tile in fastattn); summaries for larger blocks are derived from the
    base one without touching the tensor again. The tensor must not change while this object is
    in use.
    """

    def __init__(self, tensor: Tensor, *, base_block: tuple[int, int] = (16, 16)) -> None:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"Mask: expected a torch.Tensor, got {type(tensor).__name__}")
        self.tensor = tensor
        self.base_block = (int(base_block[0]), int(base_block[1]))
        self._base: dict[tuple, TileSummary] = {}

    def _tensor_summary(self, mask4: Tensor, seqlen_q: int, seqlen_k: int, block_q: int, block_k: int) -> TileSummary:
        bq0, bk0 = self.base_block
        if block_q % bq0 or block_k % bk0:
            return tensor_tile_summary(mask4, seqlen_q, seqlen_k, block_q, block_k)
        key = (tuple(mask4.shape), seqlen_q, seqlen_k)
        if key not in self._base:
            self._base[key] = tensor_tile_summary(mask4, seqlen_q, seqlen_k, bq0, bk0)
        return self._base[key].coarsen(block_q, block_k)

    def __repr__(self) -> str:
        return (
            f"fastattn.Mask(shape={tuple(self.tensor.shape)}, dtype={self.tensor.dtype}, base_block={self.base_block})"
        )


def tensor_tile_summary(mask4: Tensor, seqlen_q: int, seqlen_k: int, block_q: int, block_k: int) -> TileSummary:
    """States of a mask tensor (4-D, broadcast dims of size 1 kept): one reduction over it."""
    bm, hm, mq, mk = mask4.shape
    n_q, n_k = max(1, math.ceil(seqlen_q / block_q)), max(1, math.ceil(seqlen_k / block_k))
    # A size-1 query or key dim broadcasts: reduce it as a single tile and expand afterwards.
    tq, nq_here = (block_q, n_q) if mq == seqlen_q and seqlen_q > 1 else (1, 1)
    tk, nk_here = (block_k, n_k) if mk == seqlen_k and seqlen_k > 1 else (1, 1)
    pad = (0, nk_here * tk - mk, 0, nq_here * tq - mq)
    # uint8 with max/min reductions: several times faster than bool any/all over strided dims. A free view in eager;
    # a conversion under torch.compile, whose inductor in torch 2.11 cannot lower a bool tensor viewed as uint8.
    attend = mask4 if mask4.dtype == torch.bool else mask4 != float("-inf")
    attend = attend.to(torch.uint8) if torch.compiler.is_compiling() else attend.view(torch.uint8)

    def reduce(fill: int, op) -> Tensor:
        x = torch.nn.functional.pad(attend, pad, value=fill) if any(pad) else attend
        # (Bm, Hm, n_q·block_q, n_k·block_k) → (Bm, Hm, n_q, block_q, n_k, block_k) → reduce the in-tile dims.
        return op(x.reshape(bm, hm, nq_here, tq, nk_here, tk), dim=(3, 5))

    has = reduce(0, torch.amax) != 0  # positions past the ends count as "nothing here"...
    if mask4.dtype == torch.bool:
        every = reduce(1, torch.amin) != 0  # ...and as "attended" for the all-check
        state = torch.where(~has, EMPTY, torch.where(every, FULL, PARTIAL))
    else:
        state = torch.where(~has, EMPTY, PARTIAL)  # an additive mask must always be read: never FULL
    state = state.to(torch.int8).expand(bm, hm, n_q, n_k)
    return TileSummary.from_state(block_q, block_k, state)

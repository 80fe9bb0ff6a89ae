"""The one mask language below the entry point: ``MaskSpec`` and its per-tile summary.

Every backend receives a ``MaskSpec`` and applies the same rules (the reference backend is their
executable statement):

* query ``i`` sits at key position ``i + q_offset``;
* causal: key ``j`` is visible when ``j <= i + q_offset`` (torch's ``tril(ones(Lq, Lk))`` when
  ``q_offset == 0``);
* window ``(left, right)``: ``i + q_offset - left <= j <= i + q_offset + right``, ``-1`` unbounded;
* a boolean mask tensor: True takes part; a floating mask tensor is added to the scores;
* all of them combine; a row with nothing to attend gives zeros and a log-sum-exp of ``-inf``.

Causal and window are both bands around the diagonal, so a spec folds them into one pair of
bounds (``bounds``); kernels only ever see ``(left, right, q_offset)`` and an optional tensor.

The per-tile summary says, for each (query tile, key tile) pair of a block size, whether the tile
is EMPTY (skip it), FULL (no mask arithmetic needed) or PARTIAL. The structural part (causal,
window, offset) is analytic; the tensor part is one reduction over the mask, at a cost
proportional to the mask's own size, and keeps the mask's broadcast (size-1) batch and head dims.
The two combine per tile as ``min(band, tensor)``: always sound, though a tile that only their
conjunction empties stays PARTIAL (exactness would cost ``Lq × Lk`` work for a padding mask).
It is plain tensors, so it passes through op schemas, and it never syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2

__all__ = ["EMPTY", "PARTIAL", "FULL", "Mask", "MaskSpec", "TileSummary", "band_allowed"]


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
            return _tensor_tile_summary(mask4, seqlen_q, seqlen_k, block_q, block_k)
        key = (tuple(mask4.shape), seqlen_q, seqlen_k)
        if key not in self._base:
            self._base[key] = _tensor_tile_summary(mask4, seqlen_q, seqlen_k, bq0, bk0)
        return self._base[key].coarsen(block_q, block_k)

    def __repr__(self) -> str:
        return (
            f"fastattn.Mask(shape={tuple(self.tensor.shape)}, dtype={self.tensor.dtype}, base_block={self.base_block})"
        )


def band_allowed(
    seqlen_q: int, seqlen_k: int, left: int, right: int, q_offset: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Dense ``(Lq, Lk)`` boolean of the band ``i + q_offset - left <= j <= i + q_offset + right``."""
    i = torch.arange(seqlen_q, device=device).unsqueeze(1) + q_offset
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def _band_tile_state(
    seqlen_q: int, seqlen_k: int, left: int, right: int, q_offset: int, block_q: int, block_k: int, device
) -> Tensor:
    """Analytic ``(n_q, n_k)`` states of the band: row ``i`` sees keys in ``[i+off-left, i+off+right]``."""
    n_q, n_k = max(1, math.ceil(seqlen_q / block_q)), max(1, math.ceil(seqlen_k / block_k))
    q0 = torch.arange(n_q, device=device).unsqueeze(1) * block_q + q_offset
    q1 = torch.clamp(torch.arange(n_q, device=device) * block_q + block_q, max=seqlen_q).unsqueeze(1) - 1 + q_offset
    k0 = torch.arange(n_k, device=device).unsqueeze(0) * block_k
    k1 = torch.clamp(torch.arange(n_k, device=device) * block_k + block_k, max=seqlen_k).unsqueeze(0) - 1
    big = seqlen_q + seqlen_k + abs(q_offset) + 1
    lo_first = q0 - left if left >= 0 else q0 - big  # lowest visible key of the tile's first row
    lo_last = q1 - left if left >= 0 else q1 - big
    hi_first = q0 + right if right >= 0 else q0 + big
    hi_last = q1 + right if right >= 0 else q1 + big
    # Bounds grow with i, so the tile's extremes come from its first and last rows.
    empty = (hi_last < k0) | (lo_first > k1)
    full = (lo_last <= k0) & (hi_first >= k1)
    state = torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)
    return state.view(1, 1, n_q, n_k)


def _tensor_tile_summary(mask4: Tensor, seqlen_q: int, seqlen_k: int, block_q: int, block_k: int) -> TileSummary:
    """States of a mask tensor (4-D, broadcast dims of size 1 kept): one reduction over it."""
    bm, hm, mq, mk = mask4.shape
    n_q, n_k = max(1, math.ceil(seqlen_q / block_q)), max(1, math.ceil(seqlen_k / block_k))
    # A size-1 query or key dim broadcasts: reduce it as a single tile and expand afterwards.
    tq, nq_here = (block_q, n_q) if mq == seqlen_q and seqlen_q > 1 else (1, 1)
    tk, nk_here = (block_k, n_k) if mk == seqlen_k and seqlen_k > 1 else (1, 1)
    pad = (0, nk_here * tk - mk, 0, nq_here * tq - mq)
    # uint8 with max/min reductions: several times faster than bool any/all over strided dims.
    attend = (mask4 if mask4.dtype == torch.bool else mask4 != float("-inf")).view(torch.uint8)

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


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Normalised mask description of one call (see the module docstring for the rules).

    ``tensor`` is ``None`` or a 4-D view broadcast to ``(B, Hq, Lq, Lk)`` with stride 0 on the
    broadcast dims (never materialised); ``base`` is the same mask with its size-1 dims kept.
    """

    seqlen_q: int
    seqlen_k: int
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    q_offset: int = 0
    tensor: Optional[Tensor] = None
    base: Optional[Tensor] = None
    mask_obj: Optional[Mask] = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def bounds(self) -> tuple[int, int]:
        """``(left, right)`` of the band with causal folded in; -1 is unbounded."""
        left, right = self.window
        if self.causal:
            right = 0 if right < 0 else min(right, 0)
        return left, right

    @property
    def kind(self) -> str:
        if self.tensor is None:
            return "none"
        return "bool" if self.tensor.dtype == torch.bool else "float"

    @property
    def is_key_padding(self) -> bool:
        """A tensor mask that depends on the key only (``(B|1, 1|H, 1, Lk)``)."""
        return self.base is not None and self.base.shape[-2] == 1

    @property
    def has_band(self) -> bool:
        return self.bounds != (-1, -1)

    def band(self, device=None) -> Tensor:
        """Dense ``(Lq, Lk)`` boolean of causal and window (for the oracle and tests)."""
        left, right = self.bounds
        return band_allowed(self.seqlen_q, self.seqlen_k, left, right, self.q_offset, device or "cpu")

    def tile_summary(self, block_q: int, block_k: int) -> TileSummary:
        """The per-tile summary for ``(block_q, block_k)``, cached on this spec."""
        key = (block_q, block_k)
        if key in self._cache:
            return self._cache[key]
        device = self.tensor.device if self.tensor is not None else "cpu"
        left, right = self.bounds
        band = _band_tile_state(self.seqlen_q, self.seqlen_k, left, right, self.q_offset, block_q, block_k, device)
        if self.base is None:
            state = band
        else:
            if self.mask_obj is not None:
                tens = self.mask_obj._tensor_summary(self.base, self.seqlen_q, self.seqlen_k, block_q, block_k)
            else:
                tens = _tensor_tile_summary(self.base, self.seqlen_q, self.seqlen_k, block_q, block_k)
            state = torch.minimum(band.to(tens.state.device), tens.state)
        summary = TileSummary.from_state(block_q, block_k, state)
        self._cache[key] = summary
        return summary

    def attended_pairs(self, batch: int, heads: int) -> int:
        """Number of (query, key) pairs that take part, summed over batch and heads (for FLOP counts)."""
        allowed = self.band(self.tensor.device if self.tensor is not None else "cpu")
        if self.tensor is not None:
            base = self.base if self.base.dtype == torch.bool else self.base != float("-inf")
            allowed = allowed & base
            return int(allowed.expand(batch, heads, -1, -1).sum())
        return int(allowed.sum()) * batch * heads

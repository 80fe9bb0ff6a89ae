"""``@triton.jit`` helpers shared by the forward and backward kernels: band ranges, masks, tile states.

Semantics are those of ``fastattn.masks``: query row ``i`` sits at key position ``i + q_offset``
and sees key ``j`` iff ``i + q_offset - left <= j <= i + q_offset + right`` (``HAS_LEFT`` /
``HAS_RIGHT`` false = that side unbounded; causal is folded into ``right`` by ``MaskSpec.bounds``),
``j < seqlen_k``, and the tensor mask allows it. Scores live in the exp2 domain in the kernels, so
an additive mask is multiplied by ``bias_scale`` (``log2(e)``) before it is added.

The signatures below are a contract with the backward kernels: extend, do not change.

Tile ranges come in three stages, ``[lo, full_lo)`` masked, ``[full_lo, full_hi)`` free of any
mask arithmetic (inside the band for every valid row and inside ``seqlen_k``), ``[full_hi, hi)``
masked; tiles outside ``[lo, hi)`` are empty and never loaded. For a query tile the counts agree
with ``MaskSpec.tile_summary`` (both judge a tile by its first and last valid row).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._compat import fix_interpreter_index

fix_interpreter_index()  # every kernel module imports this one, so the fix precedes any launch

MASK_NONE: tl.constexpr = tl.constexpr(0)
MASK_BOOL: tl.constexpr = tl.constexpr(1)
MASK_FLOAT: tl.constexpr = tl.constexpr(2)
TILE_EMPTY: tl.constexpr = tl.constexpr(0)
TILE_PARTIAL: tl.constexpr = tl.constexpr(1)
TILE_FULL: tl.constexpr = tl.constexpr(2)

__all__ = [
    "MASK_NONE",
    "MASK_BOOL",
    "MASK_FLOAT",
    "TILE_EMPTY",
    "TILE_PARTIAL",
    "TILE_FULL",
    "band_k_tile_range",
    "band_q_tile_range",
    "band_allowed",
    "band_allowed_t",
    "load_tensor_mask",
    "apply_tensor_mask",
    "summary_tile",
]


@triton.jit
def band_k_tile_range(
    start_m,
    seqlen_q,
    seqlen_k,
    left,
    right,
    q_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """Key-tile indices ``(lo, full_lo, full_hi, hi)`` for the query tile of rows ``[start_m, start_m+BLOCK_M)``."""
    first = start_m + q_offset  # key position of the tile's first row
    last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + q_offset  # and of its last valid row
    key_lo = 0
    key_hi = seqlen_k  # exclusive
    full_key_lo = 0
    full_key_hi = (seqlen_k // BLOCK_N) * BLOCK_N  # whole tiles only: the last partial tile is masked
    if HAS_LEFT:
        key_lo = tl.maximum(first - left, 0)
        full_key_lo = tl.maximum(last - left, 0)
    if HAS_RIGHT:
        key_hi = tl.minimum(last + right + 1, seqlen_k)
        full_key_hi = tl.minimum(first + right + 1, full_key_hi)
    lo = key_lo // BLOCK_N
    hi = tl.maximum(tl.cdiv(key_hi, BLOCK_N), lo)  # empty when key_hi <= key_lo
    hi = tl.where(key_hi <= key_lo, lo, hi)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_key_lo, BLOCK_N), lo), hi)
    full_hi = tl.minimum(tl.maximum(full_key_hi // BLOCK_N, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def band_q_tile_range(
    start_n,
    seqlen_q,
    seqlen_k,
    left,
    right,
    q_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """Query-tile indices ``(lo, full_lo, full_hi, hi)`` for the key tile ``[start_n, start_n+BLOCK_N)`` (backward).

    Row ``i`` sees key ``j`` iff ``j - q_offset - right <= i <= j - q_offset + left``; ``full`` tiles
    see every key of the key tile (which must lie inside ``seqlen_k``) and lie inside ``seqlen_q``.
    """
    first = start_n  # first key of the tile
    last = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    row_lo = 0
    row_hi = seqlen_q
    full_row_lo = 0
    full_row_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if start_n + BLOCK_N > seqlen_k:
        full_row_hi = 0  # a key tile crossing seqlen_k always needs its bounds mask
    if HAS_RIGHT:
        row_lo = tl.maximum(first - q_offset - right, 0)
        full_row_lo = tl.maximum(last - q_offset - right, 0)
    if HAS_LEFT:
        row_hi = tl.minimum(last - q_offset + left + 1, seqlen_q)
        full_row_hi = tl.minimum(first - q_offset + left + 1, full_row_hi)
    row_hi = tl.maximum(row_hi, 0)
    lo = row_lo // BLOCK_M
    hi = tl.maximum(tl.cdiv(row_hi, BLOCK_M), lo)
    hi = tl.where(row_hi <= row_lo, lo, hi)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_row_lo, BLOCK_M), lo), hi)
    full_hi = tl.minimum(tl.maximum(tl.maximum(full_row_hi, 0) // BLOCK_M, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def band_allowed(offs_m, offs_n, seqlen_k, left, right, q_offset, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Boolean ``(BLOCK_M, BLOCK_N)``: key in range and inside the band (rows past ``seqlen_q`` are not masked)."""
    pos = offs_m[:, None] + q_offset
    ok = offs_n[None, :] < seqlen_k
    if HAS_LEFT:
        ok = ok & (offs_n[None, :] >= pos - left)
    if HAS_RIGHT:
        ok = ok & (offs_n[None, :] <= pos + right)
    return ok


@triton.jit
def band_allowed_t(offs_m, offs_n, seqlen_k, left, right, q_offset, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """``band_allowed`` transposed, ``(BLOCK_N, BLOCK_M)`` (keys are rows), built in that shape directly."""
    pos = offs_m[None, :] + q_offset
    ok = offs_n[:, None] < seqlen_k
    if HAS_LEFT:
        ok = ok & (offs_n[:, None] >= pos - left)
    if HAS_RIGHT:
        ok = ok & (offs_n[:, None] <= pos + right)
    return ok


@triton.jit
def load_tensor_mask(mask_ptr, stride_mm, stride_mn, offs_m, offs_n, seqlen_q, seqlen_k, need, MASK_KIND: tl.constexpr):
    """The mask tile ``(BLOCK_M, BLOCK_N)`` of one (batch, head): bool → int1 (True attends), float → fp32.

    ``mask_ptr`` already points at the (batch, head) slice (broadcast dims read with stride 0);
    ``need`` (scalar) false skips the memory traffic (a FULL tile): bool then reads as all-True.
    Out-of-range elements read as "attend"/0 (bounds are ``band_allowed``'s job).
    """
    ptrs = mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :].to(tl.int64) * stride_mn
    inb = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k) & need
    if MASK_KIND == 1:
        return tl.load(ptrs, mask=inb, other=1) != 0
    else:
        return tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)


@triton.jit
def apply_tensor_mask(qk, allowed, mask_tile, bias_scale, MASK_KIND: tl.constexpr):
    """Scores with the band/bounds (``allowed``) and the tensor mask applied; excluded scores are ``-inf``."""
    if MASK_KIND == 1:
        allowed = allowed & mask_tile
    elif MASK_KIND == 2:
        qk = qk + mask_tile * bias_scale
    return tl.where(allowed, qk, float("-inf"))


@triton.jit
def summary_tile(state_ptr, index_ptr, it, stride_sm, tile_m):
    """The ``it``-th non-empty key tile of query tile ``tile_m`` and its state (EMPTY/PARTIAL/FULL).

    ``state_ptr``/``index_ptr`` point at the (batch, head) slice of ``TileSummary.state`` and
    ``kv_index`` (int8 / int32, contiguous in the key-tile dim, row stride ``stride_sm``).
    """
    tile_n = tl.load(index_ptr + tile_m * stride_sm + it)
    state = tl.load(state_ptr + tile_m * stride_sm + tile_n).to(tl.int32)
    return tile_n, state

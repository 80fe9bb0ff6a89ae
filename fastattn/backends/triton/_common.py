"""The variants' rules as ``@triton.jit`` helpers, shared by the forward and backward kernels.

The Triton statement of ``fastattn/variants.py`` (the rules, their order and why the tile ranges are
exact are written there; ``csrc/attn_rules.h`` is the C++ one), with the same names: query row ``i`` sits
at key position ``pos = i + q_offset`` and sees key ``j`` iff ``pos - left <= j <= pos + right``
(``HAS_LEFT`` / ``HAS_RIGHT`` false = that side unbounded; causal is folded into ``right`` by
``AttnParams.bounds``), ``floor(pos / chunk) == floor(j / chunk)`` with ``HAS_CHUNK``, ``j < seqlen_k``, and
the tensor mask allows it. Scores live in the exp2 domain in the kernels: ``score_mod`` turns a raw
``q·k`` into ``log2(e) · (softcap · tanh(scale · q·k / softcap) − slope · |pos − j|)`` (each part when its
flag is on), and an additive mask is multiplied by ``bias_scale`` (``log2(e)``) before it is added.

The signatures below are a contract with both kernels: extend, do not change.

Tile ranges come in three stages, ``[lo, full_lo)`` masked, ``[full_lo, full_hi)`` free of any
mask arithmetic (inside the band and the chunk for every valid row and inside ``seqlen_k``), ``[full_hi,
hi)`` masked; tiles outside ``[lo, hi)`` are empty and never loaded. For a query tile the counts agree
with ``AttnParams.tile_summary`` (both judge a tile by its first and last valid row).
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

LOG2E = 1.4426950408889634

# The score rules as every kernel takes them (``score_args``): ``score``, a tuple of the rules' runtime scalars,
# and ``SCORE``, a constexpr tuple of flags read through the indices below. The kernels pass both through to
# ``score_mod`` and ``score_grad`` without naming a rule, and compile-check's heaviest build turns every flag on
# (``SCORE_ALL``, ``SCORE_TYPES``): a new scalar score rule is a flag and a scalar here, its lines in those two
# functions and its reading in ``score_args``.
SCORE_SOFTCAP: tl.constexpr = tl.constexpr(0)  # score[0] = softcap · log2(e); qk_scale = scale / softcap
SCORE_ALIBI: tl.constexpr = tl.constexpr(1)  # ALiBi: the kernels load each head's slope from its table
SCORE_GRAD: tl.constexpr = tl.constexpr(2)  # a rule whose derivative is not 1: the backward calls score_grad
SCORE_ALL = (True, True, True)
SCORE_TYPES = ("fp32",)  # the types of ``score``'s scalars


def aot_signature(fn, consts: dict, pointers: dict, floats=(), aligned=()) -> tuple:
    """``(fn, signature, constexprs, attrs)`` for compiling ``fn`` ahead of time as a real launch specialises it
    (``fastattn compile-check``): ``consts`` as constexprs, ``pointers`` (name: type) 16-byte aligned, ``score`` as
    ``SCORE_TYPES``, ``floats`` fp32 and every other argument i32, those named in ``aligned`` divisible by 16."""
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            constexprs[name] = consts[name]
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "score":
            sig[name] = SCORE_TYPES
        else:
            sig[name] = "fp32" if name in floats else "i32"
            if name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, sig, constexprs, attrs


__all__ = [
    "MASK_NONE",
    "MASK_BOOL",
    "MASK_FLOAT",
    "TILE_EMPTY",
    "TILE_PARTIAL",
    "TILE_FULL",
    "floor_div",
    "tanh",
    "key_tile_range",
    "query_tile_range",
    "row_bounds",
    "allowed",
    "allowed_t",
    "score_mod",
    "score_grad",
    "score_args",
    "load_tensor_mask",
    "apply_tensor_mask",
    "summary_tile",
    "aot_signature",
]


@triton.jit
def floor_div(a, c):
    """``floor(a / c)`` for ``c > 0`` (Triton's ``//`` truncates toward zero, as C does)."""
    return tl.where(a >= 0, a // c, -((c - 1 - a) // c))


@triton.jit
def tanh(x):
    """``tanh`` through ``exp2`` (the same formula as ``csrc/attn_rules.h``'s, on every Triton version and the
    interpreter): ``1 - 2 / (e^{2x} + 1)``, exact at the saturated ends, ~1e-7 absolute near 0 in fp32."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def key_tile_range(
    start_m,
    seqlen_q,
    seqlen_k,
    left,
    right,
    q_offset,
    chunk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
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
    if HAS_CHUNK:  # the first row's chunk starts the range, the last row's ends it (and the reverse for "full")
        chunk_first = floor_div(first, chunk) * chunk
        chunk_last = floor_div(last, chunk) * chunk
        key_lo = tl.maximum(key_lo, chunk_first)
        key_hi = tl.minimum(key_hi, chunk_last + chunk)
        full_key_lo = tl.maximum(full_key_lo, chunk_last)
        full_key_hi = tl.minimum(full_key_hi, chunk_first + chunk)
    lo = key_lo // BLOCK_N
    hi = tl.maximum(tl.cdiv(key_hi, BLOCK_N), lo)  # empty when key_hi <= key_lo
    hi = tl.where(key_hi <= key_lo, lo, hi)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_key_lo, BLOCK_N), lo), hi)
    full_hi = tl.minimum(tl.maximum(full_key_hi // BLOCK_N, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def query_tile_range(
    start_n,
    seqlen_q,
    seqlen_k,
    left,
    right,
    q_offset,
    chunk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
):
    """Query-tile indices ``(lo, full_lo, full_hi, hi)`` for the key tile ``[start_n, start_n+BLOCK_N)``.

    Row ``i`` sees key ``j`` iff ``j - q_offset - right <= i <= j - q_offset + left`` and, with a chunk,
    ``i + q_offset`` lies in ``j``'s chunk; ``full`` tiles see every key of the key tile (which must lie
    inside ``seqlen_k``) and lie inside ``seqlen_q``.
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
    if HAS_CHUNK:  # keys are >= 0: plain division finds their chunks
        chunk_first = (first // chunk) * chunk - q_offset
        chunk_last = (last // chunk) * chunk - q_offset
        row_lo = tl.maximum(row_lo, chunk_first)
        row_hi = tl.minimum(row_hi, chunk_last + chunk)
        full_row_lo = tl.maximum(full_row_lo, chunk_last)
        full_row_hi = tl.minimum(full_row_hi, chunk_first + chunk)
    row_lo = tl.maximum(row_lo, 0)
    row_hi = tl.maximum(row_hi, 0)
    lo = row_lo // BLOCK_M
    hi = tl.maximum(tl.cdiv(row_hi, BLOCK_M), lo)
    hi = tl.where(row_hi <= row_lo, lo, hi)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_row_lo, BLOCK_M), lo), hi)
    full_hi = tl.minimum(tl.maximum(tl.maximum(full_row_hi, 0) // BLOCK_M, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def packed_entry(Schedule, CuQ, CuK, pid, num_seqs):
    """The packed kernels' program ``pid``: its schedule entry ``(sequence, tile)`` and that sequence's first
    query and key rows and lengths, from the offsets ``CuQ``/``CuK``.

    The schedule has surplus entries (it is sized before the device knows the real tile count) that name
    sequence ``num_seqs``: they get the last sequence's rows with both lengths 0, so they attend nothing.
    Returns ``(seq, tile, row_q, row_k, seqlen_q, seqlen_k)``; ``seq`` and the rows as int64.
    """
    seq = tl.load(Schedule + 2 * pid)
    tile = tl.load(Schedule + 2 * pid + 1)
    real = seq < num_seqs
    seq = tl.minimum(seq, num_seqs - 1)
    row_q = tl.load(CuQ + seq).to(tl.int64)
    row_k = tl.load(CuK + seq).to(tl.int64)
    seqlen_q = tl.where(real, tl.load(CuQ + seq + 1) - tl.load(CuQ + seq), 0)
    seqlen_k = tl.where(real, tl.load(CuK + seq + 1) - tl.load(CuK + seq), 0)
    return seq.to(tl.int64), tile, row_q, row_k, seqlen_q, seqlen_k


@triton.jit
def row_bounds(
    pos, seqlen_k, left, right, chunk, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr
):
    """Keys ``[lo, hi]`` that rows at key positions ``pos`` attend: the band and the chunk, clipped to the keys.

    Two bounds per row, so a tile of pairs costs two compares whatever the rule (``variants.row_bounds``).
    """
    lo = tl.zeros_like(pos)
    hi = tl.zeros_like(pos) + (seqlen_k - 1)
    if HAS_LEFT:
        lo = tl.maximum(lo, pos - left)
    if HAS_RIGHT:
        hi = tl.minimum(hi, pos + right)
    if HAS_CHUNK:  # in int32: a 64-bit division (the dK/dV pass's positions are int64) spilled registers
        start = floor_div(pos.to(tl.int32), chunk) * chunk
        lo = tl.maximum(lo, start)
        hi = tl.minimum(hi, start + chunk - 1)
    return lo, hi


@triton.jit
def allowed(
    offs_m, offs_n, seqlen_k, left, right, q_offset, chunk,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr,
):  # fmt: skip
    """Boolean ``(BLOCK_M, BLOCK_N)``: key in range, in the band and in the row's chunk (rows past ``seqlen_q``
    are not masked).

    With a chunk, each row's two bounds (``row_bounds``) and two compares per pair: comparing chunk indices
    instead (an integer division per key and a third tile of compares) spilled the backward by up to 500
    bytes. Without one, the band's own compares: ptxas allocates those a few registers better (measured:
    the band-only dK/dV kernels spilled 8 bytes with the bounds form).
    """
    if HAS_CHUNK:
        lo, hi = row_bounds(offs_m + q_offset, seqlen_k, left, right, chunk, HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
        ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= hi[:, None])
    else:
        pos = offs_m[:, None] + q_offset
        ok = offs_n[None, :] < seqlen_k  # (1, BLOCK_N) without a band: broadcast, never a tile of its own
        if HAS_LEFT:
            ok = ok & (offs_n[None, :] >= pos - left)
        if HAS_RIGHT:
            ok = ok & (offs_n[None, :] <= pos + right)
    return ok


@triton.jit
def allowed_t(
    offs_m, offs_n, seqlen_k, left, right, q_offset, chunk,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr,
):  # fmt: skip
    """``allowed`` transposed, ``(BLOCK_N, BLOCK_M)`` (keys are rows), built in that shape directly."""
    if HAS_CHUNK:
        lo, hi = row_bounds(offs_m + q_offset, seqlen_k, left, right, chunk, HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
        ok = (offs_n[:, None] >= lo[None, :]) & (offs_n[:, None] <= hi[None, :])
    else:
        pos = offs_m[None, :] + q_offset
        ok = offs_n[:, None] < seqlen_k
        if HAS_LEFT:
            ok = ok & (offs_n[:, None] >= pos - left)
        if HAS_RIGHT:
            ok = ok & (offs_n[:, None] <= pos + right)
    return ok


def score_args(
    scale: float, variant, alibi: bool, log2_domain: bool = True
) -> tuple[float, tuple[float, ...], tuple[bool, ...]]:
    """``(qk_scale, score, SCORE)`` of a launch from its scale, ``params.VariantScalars`` and whether it has ALiBi
    slopes: ``qk_scale`` multiplies the raw dot products (``scale · log2(e)``, or ``scale / softcap``).

    ``log2_domain``: scores for ``exp2`` (the attention kernels), else for ``exp`` (the decode kernel: each factor
    of ``log2(e)`` left out, and its ALiBi slopes taken as they are)."""
    softcap, unit = float(variant.softcap), (LOG2E if log2_domain else 1.0)
    qk_scale = float(scale) / softcap if softcap > 0.0 else float(scale) * unit
    return qk_scale, (softcap * unit,), (softcap > 0.0, bool(alibi), softcap > 0.0)


@triton.jit
def score_mod(qk, offs_m, offs_n, q_offset, qk_scale, score, slope2, SCORE: tl.constexpr, KEY_ROWS: tl.constexpr):
    """Scores in the exp2 domain from raw dot products ``qk`` (``(BLOCK_M, BLOCK_N)``, or keys as rows with
    ``KEY_ROWS``), and what ``score_grad`` needs of them (the softcap's tanh; ``qk`` itself without softcap).

    ``qk_scale``, ``score``, ``SCORE``: ``score_args``' (its ``log2_domain=False`` gives natural-domain scores);
    ``slope2``: this head's ALiBi slope in the same domain (times ``log2(e)`` for exp2; a column of per-row slopes
    also broadcasts).
    """
    if SCORE[SCORE_SOFTCAP]:
        t = tanh(qk * qk_scale)
        s = t * score[0]
    else:
        t = qk
        s = qk * qk_scale
    if SCORE[SCORE_ALIBI]:  # distances in int32 (the dK/dV pass's offsets are int64: a tile of those costs registers)
        rows = offs_m.to(tl.int32) + q_offset
        if KEY_ROWS:
            dist = rows[None, :] - offs_n.to(tl.int32)[:, None]
        else:
            dist = rows[:, None] - offs_n.to(tl.int32)[None, :]
        s = s - slope2 * tl.abs(dist).to(tl.float32)
    return s, t


@triton.jit
def score_grad(g, t, score, SCORE: tl.constexpr):
    """``g``, a gradient (or probability) tile of the scores ``score_mod`` formed, times the rules' derivative
    (``t``: ``score_mod``'s second result): the softcap's ``1 - tanh²``; ALiBi and the mask add terms of
    derivative 1. Kernels call it only under ``SCORE[SCORE_GRAD]``."""
    if SCORE[SCORE_SOFTCAP]:
        g = g * (1.0 - t * t)
    return g


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

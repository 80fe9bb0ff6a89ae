"""Split-KV decoding over a contiguous or paged key/value cache (``fastattn.kvcache_attention`` on Triton).

Grid ``(splits, batch * heads_kv, row tiles)``: one program per (sequence ``b``, key/value head ``h``, split
``s``). The ``R = group * Lq`` query rows of ``h``'s GQA group (query head ``h * group + g``, query ``i``: row
``g * Lq + i``) are packed into one ``BLOCK_R`` tile, so each K/V tile a program loads serves every query head of
the group and the cache is read exactly once per call (FlashDecoding's GQA packing); the rows also make the
``tl.dot``s tall enough for tensor cores. Only beyond 64 rows (32 at head dim 256 or in fp32: many queries per
step, e.g. a group of 8 verifying 16 drafted tokens) do the rows take several tiles, each reading the keys.

A program walks the ``s``-th of ``splits`` equal parts (multiples of ``BLOCK_N``) of the
keys its rows attend, loading K and V tiles through the block table (``page = block_table[b, j // page_size]``,
``slot = j % page_size``; a contiguous cache is page ``b`` with ``page_size = Lmax``), with an online softmax in
fp32, and writes its normalised partial output and lse; ``_merge_kernel`` combines the splits exactly through
their lse, adds the sink and writes the output in the input dtype, in one launch (``merge_splits``' formula).

Cost: ``4 * B * Hq * Lq * total * D`` FLOPs against minimum bytes of K and V of every attended key once (plus q
and out): about 8 FLOPs per byte read at ``group * Lq = 4``, far below a GPU's ratio, so it is bound by memory
bandwidth and should reach the HBM bandwidth for long caches. Splits exist so that ``B * Hkv`` programs fewer
than the SMs still fill the machine.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...params import VariantScalars
from .._kvcache import gpu_workers, splits_for
from ._common import SCORE_ALIBI, SCORE_ALL, aot_signature, score_args, score_mod
from .fwd import _arch

__all__ = ["kvcache_decode", "decode_config", "_decode_kernel", "_merge_kernel"]


@triton.jit
def _decode_kernel(
    Q, KC, VC, SEQLENS, BT, ALIBI, OUT, LSE,
    sq_b, sq_h, sq_l, sq_d,
    sk_p, sk_h, sk_s, sk_d,
    sv_p, sv_h, sv_s, sv_d,
    bt_stride, alibi_stride_b,
    heads_q, heads_kv, seqlen_q, head_dim, head_dim_v, page_size, new_len, num_splits,
    qk_scale, score, left, right,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SCORE: tl.constexpr,
):  # fmt: skip
    """One (sequence, kv head, split): partial ``OUT (S, B, Hq, Lq, Dv)`` fp32 normalised, ``LSE (S, B, Hq, Lq)``.

    Scores through ``_common.score_mod`` (``qk_scale``, ``score``, ``SCORE``: ``score_args``) in the natural
    domain, softmax with ``exp``: the attention kernels' exp2 domain cost this loop spills in a few builds.
    """
    s = tl.program_id(0)
    bh = tl.program_id(1)
    tile = tl.program_id(2)  # the group's rows beyond BLOCK_R (many queries per step) take more programs
    b = bh // heads_kv
    h = bh % heads_kv
    group = heads_q // heads_kv
    rows = group * seqlen_q
    total = tl.load(SEQLENS + b).to(tl.int32) + new_len

    r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    g = r // seqlen_q
    i = r % seqlen_q
    hq = h * group + g
    row_ok = r < rows
    pos = total - seqlen_q + i  # each row's key position (bottom-right)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_ptr = Q + b.to(tl.int64) * sq_b + hq[:, None] * sq_h + i[:, None] * sq_l + d[None, :] * sq_d
    q = tl.load(q_ptr, mask=row_ok[:, None] & (d[None, :] < head_dim), other=0.0)

    # The keys any row attends: [first row's lo, last row's hi] (bounds never decrease with the row).
    key_lo = 0
    key_hi = total
    row_lo = tl.zeros([BLOCK_R], dtype=tl.int32)
    row_hi = tl.zeros([BLOCK_R], dtype=tl.int32) + total - 1
    if HAS_LEFT:
        key_lo = tl.maximum(total - seqlen_q - left, 0)
        row_lo = pos - left
    if HAS_RIGHT:
        key_hi = tl.minimum(total + right, total)
        row_hi = tl.minimum(pos + right, total - 1)
    part = tl.cdiv(tl.cdiv(tl.maximum(key_hi - key_lo, 0), num_splits), BLOCK_N) * BLOCK_N
    k_start = key_lo + s * part
    k_end = tl.minimum(k_start + part, key_hi)

    slope = tl.zeros([BLOCK_R], dtype=tl.float32)
    if SCORE[SCORE_ALIBI]:
        slope = tl.load(ALIBI + b * alibi_stride_b + hq, mask=row_ok, other=0.0)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    for start in range(k_start, k_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        key_ok = j < k_end
        if PAGED:
            page = tl.load(BT + b.to(tl.int64) * bt_stride + j // page_size, mask=key_ok, other=0).to(tl.int64)
        else:
            page = tl.zeros([BLOCK_N], dtype=tl.int64) + b
        slot = j % page_size
        k_ptr = KC + page[:, None] * sk_p + h * sk_h + slot[:, None] * sk_s + d[None, :] * sk_d
        k = tl.load(k_ptr, mask=key_ok[:, None] & (d[None, :] < head_dim), other=0.0)
        # (BLOCK_R, BLOCK_N) fp32; rows at their key positions `pos`, so q_offset 0
        qk, _ = score_mod(tl.dot(q, tl.trans(k)), pos, j, 0, qk_scale, score, slope[:, None], SCORE, False)
        ok = key_ok[None, :] & row_ok[:, None] & (j[None, :] >= row_lo[:, None]) & (j[None, :] <= row_hi[:, None])
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptr = VC + page[:, None] * sv_p + h * sv_h + slot[:, None] * sv_s + dv[None, :] * sv_d
        v = tl.load(v_ptr, mask=key_ok[:, None] & (dv[None, :] < head_dim_v), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    batch = tl.num_programs(1) // heads_kv
    row_base = ((s * batch + b) * heads_q + hq).to(tl.int64) * seqlen_q + i  # (S, B, Hq, Lq) index
    tl.store(OUT + row_base[:, None] * head_dim_v + dv[None, :], out, mask=row_ok[:, None] & (dv[None, :] < head_dim_v))
    tl.store(LSE + row_base, lse, mask=row_ok)


def decode_config(rows: int, head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: Optional[int] = None) -> dict:
    """``BLOCK_R`` (the group's rows, at least 16 for ``tl.dot``, at most 64 or 32: more rows take more programs,
    which read the keys again), ``BLOCK_N`` keys per tile, head-dim blocks and warps: chosen so that the accumulator,
    the queries and one K/V tile stay in registers (``fastattn compile-check``: no spills on sm_75/80/86/90).
    ``arch``: the compute capability (75, 80, 90; None: the interpreter)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    big = max(block_d, block_dv)
    if arch is not None and arch < 80:
        # sm_75: Triton emits FMA code that holds the operands' rows in registers: the smallest tiles.
        # fp32 rows from 80 wide spilled 8 bytes at 4 warps under Triton 3.6: 8 halve each thread's share.
        warps = 8 if dtype == torch.float32 and big >= 128 else 4
        return dict(BLOCK_R=16, BLOCK_N=16, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=warps, num_stages=1)
    # 64 rows fit beside head dims up to 128 in 16-bit types; wider rows or fp32 tiles take 32 per program.
    most = 32 if big >= 256 or dtype == torch.float32 else 64
    block_r = min(most, max(16, triton.next_power_of_2(rows)))
    block_n = 64 if big <= 128 and block_r <= 32 else 32
    if dtype == torch.float32 and big >= 128:  # fp32 K/V tiles are twice the registers
        block_n = 16 if big >= 256 else 32
    # Rows of 64 spilled with every score rule on at 4 warps (sm_80: 16-bit at 16-32 rows, at ptxas's 128-register
    # target under Triton 3.8; fp32 at 16 rows, 168 registers, under 3.6): 8 warps halve each thread's share. fp32
    # at 32 rows keeps 4 (8 spilled 24 bytes on sm_90 at the 128-register target).
    narrow = big == 64 and (dtype != torch.float32 or block_r <= 16)
    warps = 8 if block_r >= 64 or big >= 256 or narrow else 4
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=warps, num_stages=2)


def kvcache_decode(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    new_len: int,
    block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    sinks: Optional[Tensor],
    scale: float,
    variant: VariantScalars,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq) fp32)`` over the caches as they are (the append is done);
    ``variant``: the band (from each query's bottom-right position) and the score rules' scalars."""
    batch, heads_q, seqlen_q, head_dim = query.shape
    heads_kv, page_size, head_dim_v = key_cache.shape[1], key_cache.shape[2], value_cache.shape[3]
    splits = splits_for(num_splits, query, key_cache, block_table, gpu_workers(query.device))
    cfg = decode_config((heads_q // heads_kv) * seqlen_q, head_dim, head_dim_v, query.dtype, _arch(query.device))
    part_out = torch.empty(splits, batch, heads_q, seqlen_q, head_dim_v, device=query.device, dtype=torch.float32)
    part_lse = torch.empty(splits, batch, heads_q, seqlen_q, device=query.device, dtype=torch.float32)
    alibi = None if alibi_slopes is None else alibi_slopes.float().contiguous()
    qk_scale, score, score_flags = score_args(scale, variant, alibi is not None, log2_domain=False)
    left, right = variant.window_left, variant.window_right
    table = block_table if block_table is not None else cache_seqlens  # any int32 tensor: never read unless paged
    grid = (splits, batch * heads_kv, triton.cdiv((heads_q // heads_kv) * seqlen_q, cfg["BLOCK_R"]))
    _decode_kernel[grid](
        query, key_cache, value_cache, cache_seqlens, table, alibi if alibi is not None else part_lse,
        part_out, part_lse,
        *query.stride(), *key_cache.stride(), *value_cache.stride(),
        table.stride(0) if block_table is not None else 0,
        heads_q if alibi is not None and alibi.shape[0] > 1 else 0,
        heads_q, heads_kv, seqlen_q, head_dim, head_dim_v, page_size, int(new_len), splits,
        qk_scale, score, left, right,
        PAGED=block_table is not None, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, SCORE=score_flags, **cfg,
    )  # fmt: skip
    return merge(part_out, part_lse, sinks, query.dtype)


@triton.jit
def _merge_kernel(
    PART_OUT, PART_LSE, SINKS, OUT, LSE,
    rows, heads_q, seqlen_q, head_dim_v, num_splits,
    BLOCK_DV: tl.constexpr, HAS_SINK: tl.constexpr,
):  # fmt: skip
    """One row ``r`` of ``(B, Hq, Lq)``: ``OUT[r] = sum_s exp(lse_s - lse) PART_OUT[s, r]`` in OUT's dtype and
    ``LSE[r] = log(sum_s exp(lse_s) + exp(sink))`` (-inf and zeros for a row that attended nothing), from the
    splits' normalised partials ``PART_OUT (S, rows, Dv)`` and ``PART_LSE (S, rows)`` fp32 (-inf: no keys).

    Cost per row: ``2 * S * Dv`` FLOPs against ``S * (Dv + 1) * 4`` bytes read and ``Dv`` elements written, a
    few percent of what the decode kernel reads of the cache: bound by its launch, which is why it is one kernel
    rather than the nine torch ops of ``merge_splits`` and the cast (each a launch of a few microseconds, when a
    B = 1 cache of 32k tokens takes about 30 us of an H200's bandwidth).
    """
    r = tl.program_id(0).to(tl.int64)
    split_rows = r * 0 + rows  # int64: the stride of a split in PART_LSE; times Dv in PART_OUT
    lse_ptr = PART_LSE + r
    top = tl.load(lse_ptr)  # split 0 (num_splits >= 1)
    for _ in range(1, num_splits):
        lse_ptr += split_rows
        top = tl.maximum(top, tl.load(lse_ptr))
    if HAS_SINK:
        sink = tl.load(SINKS + (r // seqlen_q) % heads_q).to(tl.float32)
        top = tl.maximum(top, sink)
    safe = tl.where(top == float("-inf"), 0.0, top)
    d = tl.arange(0, BLOCK_DV)
    d_ok = d < head_dim_v
    lse_ptr = PART_LSE + r
    out_ptr = PART_OUT + r * head_dim_v + d
    total = tl.exp(tl.load(lse_ptr) - safe)  # 0 for a split without keys
    acc = total * tl.load(out_ptr, mask=d_ok, other=0.0)
    for _ in range(1, num_splits):
        lse_ptr += split_rows
        out_ptr += split_rows * head_dim_v
        w = tl.exp(tl.load(lse_ptr) - safe)
        acc += w * tl.load(out_ptr, mask=d_ok, other=0.0)
        total += w
    if HAS_SINK:
        total += tl.exp(sink - safe)
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(OUT + r * head_dim_v + d, out.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(LSE + r, tl.where(total > 0.0, safe + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf")))


def merge(part_out: Tensor, part_lse: Tensor, sinks: Optional[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``merge_splits`` in one launch of ``_merge_kernel``: ``(out (B, Hq, Lq, Dv) in dtype, lse fp32)``."""
    splits, batch, heads_q, seqlen_q, head_dim_v = part_out.shape
    out = torch.empty(batch, heads_q, seqlen_q, head_dim_v, device=part_out.device, dtype=dtype)
    lse = torch.empty(batch, heads_q, seqlen_q, device=part_out.device, dtype=torch.float32)
    rows = batch * heads_q * seqlen_q
    if rows:
        _merge_kernel[(rows,)](
            part_out, part_lse, sinks if sinks is not None else part_lse, out, lse,
            rows, heads_q, seqlen_q, head_dim_v, splits, **merge_config(head_dim_v), HAS_SINK=sinks is not None,
        )  # fmt: skip
    return out, lse


def merge_config(head_dim_v: int) -> dict:
    """``_merge_kernel``'s tile: a row of the output per program, a warp per 128 values."""
    block_dv = max(16, triton.next_power_of_2(head_dim_v))
    return dict(BLOCK_DV=block_dv, num_warps=max(1, block_dv // 128), num_stages=1)


# ---------------------------------------------------------------------------------------------- compile-check

# The builds ``fastattn compile-check`` audits per arch, dtype and head dim: the plainest launch (contiguous cache,
# no band) and the heaviest (paged, both band bounds, every score rule), each at the smallest row tile (a GQA group
# of 4 decoding one token) and the largest the tests use (a group of 8 with 16 queries).
COMPILE_MASKS = {
    "contiguous": dict(PAGED=False, HAS_LEFT=False, HAS_RIGHT=False, SCORE=tuple(False for _ in SCORE_ALL)),
    "paged+window+variants": dict(PAGED=True, HAS_LEFT=True, HAS_RIGHT=True, SCORE=SCORE_ALL),
}
COMPILE_ROWS = (4, 128)


def compile_variants(dtype: torch.dtype, head_dim: int, arch: int) -> list[tuple[str, int, int, int, int]]:
    """``(mask, BLOCK_R, BLOCK_N, num_warps, num_stages)`` of every distinct build compile-check audits for these
    inputs on ``arch`` (row counts that choose the same tile share one build)."""
    out = []
    for mask in COMPILE_MASKS:
        for rows in COMPILE_ROWS:
            cfg = decode_config(rows, head_dim, head_dim, dtype, arch)
            build = (mask, cfg["BLOCK_R"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
            if build not in out:
                out.append(build)
    return out


def compile_signature(mask: str, dtype: str, head_dim: int, block_r: int, block_n: int):
    """``(fn, signature, constexprs, attrs)`` of ``_decode_kernel`` as a real launch specialises it: unit last-dim
    strides (constexpr 1), 16-aligned pointers and row strides."""
    elt = "*" + dtype
    pointers = {"Q": elt, "KC": elt, "VC": elt, "SEQLENS": "*i32", "BT": "*i32", "ALIBI": "*fp32", "OUT": "*fp32",
                "LSE": "*fp32"}  # fmt: skip
    block_d = max(16, triton.next_power_of_2(head_dim))
    consts = {"BLOCK_R": block_r, "BLOCK_N": block_n, "BLOCK_D": block_d, "BLOCK_DV": block_d, "sq_d": 1,
              "sk_d": 1, "sv_d": 1, **COMPILE_MASKS[mask]}  # fmt: skip
    aligned = {"sq_b", "sq_h", "sk_p", "sk_h", "sk_s", "sv_p", "sv_h", "sv_s"}
    return aot_signature(_decode_kernel, consts, pointers, floats=("qk_scale",), aligned=aligned)


# The merge's builds compile-check audits per arch, dtype and head dim: without and with the sinks.
MERGE_MASKS = {"merge": dict(HAS_SINK=False), "merge+sinks": dict(HAS_SINK=True)}


def merge_compile_signature(mask: str, dtype: str, head_dim: int):
    """``(fn, signature, constexprs, attrs)`` of ``_merge_kernel`` as ``merge`` launches it for this head dim."""
    pointers = {"PART_OUT": "*fp32", "PART_LSE": "*fp32", "SINKS": "*fp32", "OUT": "*" + dtype, "LSE": "*fp32"}
    consts = {"BLOCK_DV": merge_config(head_dim)["BLOCK_DV"], **MERGE_MASKS[mask]}
    return aot_signature(_merge_kernel, consts, pointers)

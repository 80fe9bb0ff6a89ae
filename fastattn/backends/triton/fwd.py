"""Triton forward attention: kernel ``_attn_fwd_kernel``, launcher ``attn_fwd``, op ``fastattn::triton_attn_fwd``.

Design note (FlashAttention-2 schedule):

* One program per (query tile of ``BLOCK_M`` rows, batch·query-head). The query tile, the fp32
  accumulator ``(BLOCK_M, Dv)`` and the running max/sum live in registers; key/value tiles of
  ``BLOCK_N`` rows stream through shared memory (Triton pipelines them over ``num_stages``).
* Online softmax in fp32 in the exp2 domain: scores are multiplied by ``scale·log2(e)`` once, in
  fp32, right after the ``QKᵀ`` dot (folding the factor into ``q`` before the dot would round it
  to fp16/bf16 and add an error of the order of the dtype's epsilon to every score).
* Masks: causal and window are one band ``[i+q_offset-left, i+q_offset+right]`` (``AttnParams.bounds``).
  Without a mask tensor the key-tile range is computed analytically and split into masked edge
  stages and an unmasked middle stage (``_common.band_k_tile_range``): tiles outside the band are
  never loaded, tiles inside it run without any mask arithmetic. With a mask tensor (bool or
  additive, any broadcast strides, never expanded) the program walks the tile summary's list of
  non-empty key tiles (``kv_index[:kv_count]``); FULL tiles skip the mask load.
* GQA: query head ``h`` reads K/V head ``h // (Hq // Hkv)`` through strides; nothing is copied.
* Fully masked rows: the running max stays ``-inf``; exponentials use a max of 0 instead, so
  they give 0 rather than NaN; output 0 and lse ``-inf``.
* Head dims are padded to the next power of two (at least 16) with masked loads; ``Dv`` may
  differ from ``D``. Sequence lengths and the scale are runtime values, never constexpr.
* Tiles: ``fwd_tiles`` per (arch, dtype, head dim, mask/dropout or not), chosen from
  ``fastattn compile-check``'s register/spill report (no GPU was available to time them);
  ``triton.autotune`` picks warps/stages keyed on head dim and a sequence-length bucket. Under
  ``TRITON_INTERPRET=1`` one fixed 32×32 tile.
* Work counter: ``forward(..., count_visited=True)`` (or ``attn_fwd(visited=...)``) has each
  program write how many key tiles it loaded, to compare with the summary's minimum.
* Not done: packing a GQA group's query heads into one program (K/V are re-read per query head,
  from L2 in practice); Hopper TMA/warp specialisation.

Cost: ``4·B·Hq·Lq·Lk·D``-ish FLOPs (``2·D`` for ``QKᵀ`` plus ``2·Dv`` for ``PV`` per attended pair;
halved by causal tile skipping). Minimum bytes: read Q, K, V once, write O and lse:
``elt·(B·Hq·Lq·(D+Dv) + B·Hkv·Lk·(D+Dv)) + 4·B·Hq·Lq``, plus the mask tensor's own size when
given (its PARTIAL tiles only). Arithmetic intensity is about ``BLOCK_M`` FLOPs per K/V byte, so
for L ≥ a few hundred the kernel is bound by tensor-core throughput (H100 bf16: ~990 TFLOP/s
peak), not by HBM.

fp32 inputs use TF32 tensor cores when ``torch.backends.cuda.matmul.allow_tf32`` is set (as
``torch.set_float32_matmul_precision("high")`` does), IEEE fp32 otherwise.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...params import AttnParams, VariantScalars
from .._varlen import num_programs, tile_schedule
from ..registry import fake_forward, op_layout, op_scalars, packed_empty
from ._common import (
    SCORE_ALIBI,
    allowed,
    apply_tensor_mask,
    key_tile_range,
    load_tensor_mask,
    packed_entry,
    score_args,
    score_mod,
    summary_tile,
)
from .dropout import dropout_keep
from .tuning import family, lookup

__all__ = ["attn_fwd", "triton_attn_fwd", "forward", "fwd_blocks", "fwd_tiles", "fwd_configs", "INTERPRET_TILE"]

LN2 = 0.6931471805599453
# Under TRITON_INTERPRET=1 one fixed tile: the interpreter's cost is per numpy op, so few large-ish tiles.
INTERPRET_TILE = (32, 32)


def _pow2_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def has_variants(chunk: int, score: tuple = ()) -> bool:
    """Whether a launch runs a variant that adds live state where scores are formed (a chunk, any score rule:
    ``SCORE`` of ``_common.score_args``; the sinks do not): it then takes the heavy tiles, with
    ``_FWD_VARIANT_*`` / ``bwd._BWD_VARIANT_CONFIGS`` where those spill."""
    return chunk > 0 or any(score)


def is_heavy(has_mask: bool, dropout_p: float, chunk: int = 0, score: tuple = ()) -> bool:
    """Whether a launch takes the "heavy" tiles: a mask tensor, dropout, or a variant that adds live state
    where scores are formed (``has_variants``; the sinks touch only the epilogue). ``fastattn compile-check``
    compiles the heaviest of them all (every variant with a float mask, a window and dropout) on the heavy
    tiles: the plain tiles spilled with the variants in several backward configs."""
    return has_mask or dropout_p > 0.0 or has_variants(chunk, score)


def call_families(params: AttnParams) -> tuple[bool, bool]:
    """``(is_heavy, has_variants)`` of a call's launches, forward and backward alike."""
    _, _, score_flags = score_args(params.scale, params.variant_scalars, params.alibi is not None)
    return (
        is_heavy(params.mask is not None, params.dropout_p, params.chunk, score_flags),
        has_variants(params.chunk, score_flags),
    )


def _arch_key(arch: int) -> int:
    """The variant tables' arch: 90, 86 (stands for sm_86/sm_89), 80 or 75."""
    return 90 if arch >= 90 else (86 if arch > 80 else (80 if arch >= 80 else 75))


def fwd_tiles(
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    arch: Optional[int],
    heavy: bool = False,
    variants: bool = False,
    packed: bool = False,
) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a head dim, dtype and compute capability (``arch`` = 90, 80, 75; None = interpreter).

    ``heavy``: a mask tensor or dropout (a mask tile and Philox draws per score need registers:
    narrower key tiles keep them from spilling, as ``fastattn compile-check`` shows). Fixed per
    variant rather than autotuned, so that the mask's tile summary can be built for the kernel's
    block before launch; autotuning picks warps and pipeline stages (``fwd_configs``). ``packed``: a
    ``varlen_attention`` launch (``PACKED``), which takes ``_FWD_PACKED_TILES`` where the dense tile spills.
    """
    if arch is None:
        return INTERPRET_TILE
    d = max(_pow2_dim(head_dim), _pow2_dim(head_dim_v))
    wide = dtype == torch.float32  # fp32 tiles take twice the registers and shared memory
    key = (_arch_key(arch), wide, d, heavy or variants)
    if packed and key in _FWD_PACKED_TILES:
        return _FWD_PACKED_TILES[key]
    if variants and (_arch_key(arch), wide, d) in _FWD_VARIANT_TILES:
        return _FWD_VARIANT_TILES[(_arch_key(arch), wide, d)]
    if arch >= 90:
        if d <= 128 and not wide:
            return (128, 32) if heavy else (128, 128)
        if d <= 128:
            return (64, 32) if heavy else (128, 64)
        # Head dim 256: the light tiles also serve causal and windowed launches, whose band costs registers.
        # 32x32 (fp32) spilled 8 bytes with a window, and 128x64 8-40 bytes with either (Triton 3.8 and 3.6).
        if wide:
            return (16, 32)
        return (64, 32) if heavy else (128, 32)
    if arch >= 80:
        if d <= 64:
            return (64, 64) if wide or heavy else (128, 64)
        if d <= 128:
            if wide or heavy:
                return (64, 32)
            # sm_86/89: 128x64 spilled 8-16 bytes with causal at head dims 80-128 (Triton 3.8 and 3.6)
            return (128, 32) if arch > 80 else (128, 64)
        if wide:
            return (16, 32) if heavy else (32, 32)
        return (64, 32) if heavy else (64, 64)
    # sm_75: Triton emits FMA code (operands and products in registers): small tiles, 64 KB of shared memory.
    if d <= 32:
        return (32, 32) if heavy else (64, 32)
    return (32, 32) if d <= 128 else (16, 32)


def fwd_blocks(
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    arch: Optional[int],
    heavy: bool,
    left: int,
    right: int,
    variants: bool = False,
    packed: bool = False,
) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a launch: the tuned table's (``tuning.lookup``) where it has one, else ``fwd_tiles``.

    Launches with a variant have no tuned entries yet (nothing was timed with them): the static tiles. So do
    packed launches: the tuned tiles were timed and compile-checked on the dense kernel only.
    """
    padded = max(_pow2_dim(head_dim), _pow2_dim(head_dim_v))
    tuned = _tuned_fwd(arch, dtype, padded, heavy, left, right, variants, packed)
    if tuned is not None:
        return tuned[0], tuned[1]
    return fwd_tiles(head_dim, head_dim_v, dtype, arch, heavy, variants, packed)


def _tuned_fwd(arch, dtype, padded: int, heavy: bool, left: int, right: int, variants: bool, packed: bool):
    """The tuned forward config of a launch, or None: never for a variant or packed launch (see ``fwd_blocks``)."""
    if variants or packed:
        return None
    return lookup("fwd", arch, dtype, padded, family(heavy, left, right))


def fwd_configs(
    block_m: int,
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    arch: int,
    heavy: bool = False,
    variants: bool = False,
    packed: bool = False,
) -> list[tuple[int, int]]:
    """(num_warps, num_stages) pairs autotuned for one variant (``packed``: a ``varlen_attention`` launch).

    From ``fastattn compile-check`` (Triton 3.8, ptxas from its wheel): 128-row tiles spill at 4 warps
    (255 registers), so they take 8; so do 64-row tiles at head dim 256 and with a mask/dropout;
    three fp32 stages exceed sm_90's 227 KB of shared memory at head dim 128.
    """
    d = max(_pow2_dim(head_dim), _pow2_dim(head_dim_v))
    if arch < 80:
        return [(8 if d >= 128 else 4, 1)]  # FMA tiles at head dim >= 128 spill at 4 warps
    warps = 8 if block_m >= 128 or (block_m >= 64 and (d >= 256 or heavy)) else 4
    stages = 2 if d >= 256 or (dtype == torch.float32 and d >= 128) else 3
    key = (_arch_key(arch), dtype == torch.float32, d, heavy or variants)
    if packed and key in _FWD_PACKED_STAGES:
        return [(warps, _FWD_PACKED_STAGES[key])]
    if variants and (_arch_key(arch), dtype == torch.float32, d) in _FWD_VARIANT_STAGES:
        return [(warps, _FWD_VARIANT_STAGES[(_arch_key(arch), dtype == torch.float32, d)])]
    if arch >= 90 and block_m >= 128 and dtype != torch.float32 and not heavy:
        # Measured: 2 stages crash ptxas (-11) at head dim 16; 3 stages spill 8 bytes at 80..128 (fp16); at 256
        # the 128x32 tile takes 2 at 234-247 registers with causal or a window (128x64 needed 1 and still spilled).
        return {16: [(warps, 3)], 32: [(warps, 3)], 64: [(warps, 3), (warps, 2)]}.get(d, [(warps, 2)])
    if 80 < arch < 90:
        stages = _STAGES_SM86.get((d, dtype == torch.float32, heavy), stages)
    return [(warps, stages)]


# Launches with a variant (``has_variants``) take the heavy tiles and stages, except where those spilled with
# every variant on (``fastattn compile-check``'s "+variants" builds, Triton 3.8; sm_86's d64 entry: 64x64 spilled
# 8 bytes under Triton 3.6 at 2 and 3 stages): (arch, fp32, padded head dim).
_FWD_VARIANT_TILES = {(90, False, 256): (64, 16), (86, False, 64): (64, 32)}
_FWD_VARIANT_STAGES = {(80, True, 16): 2, (86, False, 32): 2}

# Packed launches (``PACKED``: the sequence's bounds read from the offsets and the schedule, live through the
# whole tile loop) where the dense launch's tile or stages spill (``fastattn compile-check --packed``, Triton 3.8
# and 3.6): (arch, fp32, padded head dim, heavy or with a variant).
_FWD_PACKED_TILES = {
    (80, True, 16, True): (64, 32),  # 64x64: 192 bytes under Triton 3.6
    (80, False, 256, True): (32, 32),  # 64x32: 120 bytes under Triton 3.6 (1 stage, or 64x16: 40-104)
    (86, False, 256, True): (32, 32),  # 64x32: 32 bytes under Triton 3.6
    (86, True, 32, True): (64, 32),  # 64x64: 152 bytes under Triton 3.6
    (86, True, 64, True): (64, 32),  # 64x64: 424 bytes under Triton 3.6
    (86, True, 128, True): (32, 32),  # 64x32: 8 bytes under Triton 3.6 (1 stage: 72)
    (86, False, 128, False): (128, 64),  # the dense 128x32 at 2 stages: 8 bytes at head dims 80-128
    (90, False, 256, False): (128, 32),  # 128x64: 80-120 bytes
    (90, True, 256, False): (32, 32),  # the dense 16x32: 8 bytes with a window under Triton 3.6
}
_FWD_PACKED_STAGES = {
    (80, True, 16, False): 2,  # 3 stages: 8 bytes
    (80, False, 128, False): 2,  # 3 stages: 8 bytes under Triton 3.6
    (86, False, 128, False): 2,  # 3 stages: 8 bytes at head dims 80-128
    (80, True, 256, True): 1,  # 2 stages: 16 bytes under Triton 3.6
    (86, True, 256, True): 1,  # the same ptxas allocation as sm_80's
    (90, True, 256, True): 1,  # 2 stages: 8 bytes
}

# sm_86/sm_89 (99 KB of shared memory per block, sm_80: 163; fastattn compile-check --arch sm_86):
# (head dim, fp32, heavy) variants whose sm_80 stages need 104-116 KB, or spill 8 bytes there.
_STAGES_SM86 = {
    (256, False, False): 1,
    (64, True, True): 1,
    (256, True, False): 1,
    (16, True, True): 1,
    (32, True, True): 2,
}


def _seq_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """Autotune key: a power-of-two bucket of the longer length (raw lengths would retune every call)."""
    return min(16384, triton.next_power_of_2(max(seqlen_q, seqlen_k, 1)))


@triton.jit
def _attn_fwd_tile(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    mask_base,
    stride_mm,
    stride_mn,
    philox_ptr,
    drop_bh,
    start_n,
    offs_m,
    offs_d,
    offs_dv,
    seqlen_q,
    seqlen_k,
    drop_lq,
    drop_lk,
    qk_scale,
    left,
    right,
    q_offset,
    chunk,
    score,
    slope2,
    dropout_p,
    need_mask,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    SCORE: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key tile: scores (``score_mod``: the scale and the score rules), masks (when ``MASKED``), online-softmax
    update, ``acc += P V``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # K loaded transposed: (BLOCK_D, BLOCK_N).
    k_ptrs = k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :]
    if MASKED:
        if BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=(offs_n[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        else:
            k = tl.load(k_ptrs, mask=offs_n[None, :] < seqlen_k, other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_ptrs)
    qk, _ = score_mod(
        tl.dot(q, k, input_precision=DOT_PRECISION), offs_m, offs_n, q_offset, qk_scale, score, slope2, SCORE,
        False,
    )  # fmt: skip
    if MASKED:
        ok = allowed(offs_m, offs_n, seqlen_k, left, right, q_offset, chunk, HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
        if MASK_KIND != 0:
            mask_tile = load_tensor_mask(
                mask_base, stride_mm, stride_mn, offs_m, offs_n, seqlen_q, seqlen_k, need_mask, MASK_KIND
            )
            qk = apply_tensor_mask(qk, ok, mask_tile, 1.4426950408889634, MASK_KIND)
        else:
            qk = tl.where(ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row with nothing visible yet keeps m = -inf; subtracting 0 instead gives exp2(-inf) = 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = dropout_keep(philox_ptr, drop_bh, offs_m, offs_n, drop_lq, drop_lk, dropout_p)
        p = tl.where(keep, p, 0.0)  # the 1/(1-p) factor is applied once to the output
    if MASKED:
        if BLOCK_DV != HEAD_DIM_V:
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        else:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seqlen_k, other=0.0)
    else:
        if BLOCK_DV != HEAD_DIM_V:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
        else:
            v = tl.load(v_ptrs)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    Mask,
    TileState,
    KvCount,
    KvIndex,
    Philox,
    Alibi,
    Sinks,
    Visited,
    CuQ,
    CuK,
    Schedule,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_sb,
    stride_sh,
    stride_sm,
    stride_cb,
    stride_ch,
    heads_q,
    group,
    seqlen_q,
    seqlen_k,
    qk_scale,
    left,
    right,
    q_offset,
    chunk,
    score,
    stride_ab,
    dropout_p,
    seq_bucket,
    num_seqs,
    total_q,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_CHUNK: tl.constexpr,
    SCORE: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    DROPOUT: tl.constexpr,
    COUNT_VISITED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PACKED: tl.constexpr,
):
    """Program (query tile ``program_id(0)``, batch·head ``program_id(1)``); see the module docstring.

    ``PACKED``: program ``(schedule entry, head)``; the entry names the sequence and its query tile, whose start
    and lengths come from ``CuQ``/``CuK``; ``seqlen_q``/``seqlen_k`` arrive as the maxima (the dropout contract's
    index) and become the sequence's own; its alignment is bottom-right.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    drop_lq = seqlen_q  # the dropout contract's lengths: the call's (packed: the maxima)
    drop_lk = seqlen_k
    if PACKED:
        # b: the sequence (ALiBi's row and the dropout contract's batch index)
        b, pid_m, row_q, row_k, seqlen_q, seqlen_k = packed_entry(Schedule, CuQ, CuK, pid, num_seqs)
        q_offset = seqlen_k - seqlen_q
        b_mem = 0  # the tensors' batch dim (one row of packed tokens)
        h = bh
        drop_bh = b * heads_q + h
        lse_base = Lse + h.to(tl.int64) * total_q + row_q
    else:
        pid_m = pid
        b = (bh // heads_q).to(tl.int64)
        b_mem = b
        h = bh % heads_q
        row_q = 0
        row_k = 0
        drop_bh = bh
        lse_base = Lse + bh.to(tl.int64) * seqlen_q
    h_kv = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_base = Q + b_mem * stride_qb + h * stride_qh + row_q * stride_qm
    q_ptrs = q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b_mem * stride_kb + h_kv * stride_kh + row_k * stride_kn
    v_base = V + b_mem * stride_vb + h_kv * stride_vh + row_k * stride_vn
    mask_base = Mask + b_mem * stride_mb + h * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    slope2 = 0.0
    if SCORE[SCORE_ALIBI]:  # this head's slope, in the exp2 domain
        slope2 = tl.load(Alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634

    if MASK_KIND == 0:
        lo, full_lo, full_hi, hi = key_tile_range(
            start_m, seqlen_q, seqlen_k, left, right, q_offset, chunk, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
            HAS_CHUNK,
        )  # fmt: skip
        for tile_n in range(lo, full_lo):  # left edge of a window: band-masked
            acc, l_i, m_i = _attn_fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mm, stride_mn,
                Philox, drop_bh, tile_n * BLOCK_N, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, drop_lq, drop_lk,
                qk_scale, left, right, q_offset, chunk, score, slope2, dropout_p, True,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, MASK_KIND, HAS_LEFT, HAS_RIGHT,
                HAS_CHUNK, SCORE, DROPOUT, DOT_PRECISION,
            )  # fmt: skip
        for tile_n in range(full_lo, full_hi):  # inside the band for every row: no mask arithmetic
            acc, l_i, m_i = _attn_fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mm, stride_mn,
                Philox, drop_bh, tile_n * BLOCK_N, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, drop_lq, drop_lk,
                qk_scale, left, right, q_offset, chunk, score, slope2, dropout_p, True,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, False, MASK_KIND, HAS_LEFT, HAS_RIGHT,
                HAS_CHUNK, SCORE, DROPOUT, DOT_PRECISION,
            )  # fmt: skip
        for tile_n in range(full_hi, hi):  # diagonal / right edge / the last partial tile
            acc, l_i, m_i = _attn_fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mm, stride_mn,
                Philox, drop_bh, tile_n * BLOCK_N, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, drop_lq, drop_lk,
                qk_scale, left, right, q_offset, chunk, score, slope2, dropout_p, True,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, MASK_KIND, HAS_LEFT, HAS_RIGHT,
                HAS_CHUNK, SCORE, DROPOUT, DOT_PRECISION,
            )  # fmt: skip
        n_visited = hi - lo
    else:
        # Walk the summary's non-empty key tiles; its (batch, head) dims broadcast with stride 0.
        summary_off = b_mem * stride_sb + h * stride_sh
        state_base = TileState + summary_off
        index_base = KvIndex + summary_off
        n_visited = tl.load(KvCount + b_mem * stride_cb + h * stride_ch + pid_m)
        for it in range(0, n_visited):
            tile_n, state = summary_tile(state_base, index_base, it, stride_sm, pid_m)
            acc, l_i, m_i = _attn_fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mm, stride_mn,
                Philox, drop_bh, tile_n * BLOCK_N, offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, drop_lq, drop_lk,
                qk_scale, left, right, q_offset, chunk, score, slope2, dropout_p, state != 2,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, MASK_KIND, HAS_LEFT, HAS_RIGHT,
                HAS_CHUNK, SCORE, DROPOUT, DOT_PRECISION,
            )  # fmt: skip

    if HAS_SINKS:  # the sink's logit joins every row's denominator once, with no value
        sink2 = tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink2)
        alpha = tl.math.exp2(m_i - m_new)  # m_i = -inf (nothing attended): 0
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.math.exp2(sink2 - m_new)
        m_i = m_new
    # Epilogue: rows that saw nothing (l = 0) give out 0 and lse -inf (with a sink: out 0, lse the sink).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = Out + b_mem * stride_ob + h * stride_oh + row_q * stride_om
    o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen_q)
    if COUNT_VISITED:
        tl.store(Visited + bh.to(tl.int64) * tl.num_programs(0) + pid, n_visited.to(tl.int32))


def _autotuned(
    arch: int,
    block_m: int,
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    heavy: bool,
    variants: bool = False,
    packed: bool = False,
):
    """``_attn_fwd_kernel`` wrapped in ``triton.autotune`` over the configs of this variant."""
    key = (arch, block_m, _pow2_dim(head_dim), _pow2_dim(head_dim_v), dtype, heavy, variants, packed)
    if key not in _TUNED:
        configs = [
            triton.Config({}, num_warps=w, num_stages=s)
            for w, s in fwd_configs(block_m, head_dim, head_dim_v, dtype, arch, heavy, variants, packed)
        ]
        _TUNED[key] = triton.autotune(
            configs,
            key=[
                "HEAD_DIM",
                "HEAD_DIM_V",
                "seq_bucket",
                "MASK_KIND",
                "HAS_LEFT",
                "HAS_RIGHT",
                "HAS_CHUNK",
                "SCORE",
                "HAS_SINKS",
                "DROPOUT",
                "PACKED",
            ],  # fmt: skip
        )(_attn_fwd_kernel)
    return _TUNED[key]


_TUNED: dict = {}


def _arch(device: torch.device) -> Optional[int]:
    """Compute capability as 90/80/75, or None when interpreting on CPU tensors."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and (device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    tile_state: Optional[Tensor],
    kv_count: Optional[Tensor],
    kv_index: Optional[Tensor],
    philox: Optional[Tensor],
    scale: float,
    variant: VariantScalars,
    dropout_p: float,
    block_m: int,
    block_n: int,
    visited: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None,
    *,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[Tensor, Tensor]:
    """Launch ``_attn_fwd_kernel``: ``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq) fp32)``.

    ``q`` ``(B, Hq, Lq, D)``, ``k`` ``(B, Hkv, Lk, D)``, ``v`` ``(B, Hkv, Lk, Dv)``, any strides;
    ``mask`` is ``AttnParams.mask`` (the ``(B, Hq, Lq, Lk)`` broadcast view) or None; with a mask,
    ``tile_state``/``kv_count``/``kv_index`` are its ``TileSummary`` for ``(block_m, block_n)``.
    ``variant``: the call's band (``AttnParams.bounds``: causal folded in, -1 unbounded), q_offset, chunk and
    score rules' scalars.
    ``philox`` is the call's dropout seed when ``dropout_p > 0``. ``visited``
    (int32 ``(B, Hq, n_q_tiles)``, optional) receives the number of key tiles each program loaded.
    ``out``/``lse`` (optional, e.g. NaN-poisoned by tests) are written in place: ``out`` with any
    strides, ``lse`` contiguous fp32. The tensor variants (``fastattn.variants``): ``alibi_slopes`` float32
    ``(1|B, Hq)``, ``sinks`` ``(Hq,)``.

    Packed sequences (``cu_seqlens_q``/``cu_seqlens_k`` given, ``(B + 1,)``): ``q``, ``k``, ``v`` are the
    ``(1, H, total, D)`` views of the packed tensors, ``out``/``lse`` are ``(1, Hq, total_q, Dv)`` (token-major,
    ``registry.packed_empty``) and ``(1, Hq, total_q)``; ``max_seqlen_*`` index the dropout contract; no mask
    tensor. One program per (real query tile of a sequence, head), from ``_varlen.tile_schedule`` on the device;
    ``visited`` is then ``(1, Hq, num_programs)``.
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    packed = cu_seqlens_q is not None
    total_q = seqlen_q
    poison = os.environ.get("FASTATTN_POISON") == "1"  # test hook: unwritten elements stay NaN
    if out is None:
        if packed:
            out = packed_empty(q, heads_q, total_q, head_dim_v)
        else:
            out = torch.empty(batch, heads_q, seqlen_q, head_dim_v, dtype=q.dtype, device=q.device)
        if poison:
            out.fill_(float("nan"))
    if lse is None:
        lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
        if poison:
            lse.fill_(float("nan"))
    if out.shape != (batch, heads_q, seqlen_q, head_dim_v) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out: expected {(batch, heads_q, seqlen_q, head_dim_v)} {q.dtype} with unit last stride, "
            f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}"
        )
    if lse.shape != (batch, heads_q, seqlen_q) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(
            f"lse: expected contiguous {(batch, heads_q, seqlen_q)} float32, got {tuple(lse.shape)} {lse.dtype}"
        )
    dummy = torch.empty(2, dtype=torch.int64, device=q.device)
    cu_q_arg, cu_k_arg, schedule, num_seqs = dummy, dummy, dummy, 0
    if packed:
        if mask is not None or cu_seqlens_k is None:
            raise ValueError("mask, cu_seqlens_k: packed sequences take cu_seqlens_k and no mask tensor")
        num_seqs = cu_seqlens_q.shape[0] - 1
        cu_q_arg, cu_k_arg = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        schedule = tile_schedule(cu_q_arg, block_m, total_q)
        n_q_tiles = num_programs(total_q, num_seqs, block_m)
        seqlen_q, seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    else:
        n_q_tiles = triton.cdiv(seqlen_q, block_m)
    if mask is None:
        mask_kind, mask_arg, mstrides = 0, q, (0, 0, 0, 0)
        state_arg, count_arg, index_arg = dummy, dummy, dummy
        sstrides, cstrides = (0, 0, 0), (0, 0)
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        # Bool is read as bytes; a same-size view keeps the broadcast (stride-0) strides.
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mstrides = tuple(mask_arg.stride())
        if tile_state is None or kv_count is None or kv_index is None:
            raise ValueError("tile_state, kv_count, kv_index: expected the mask's TileSummary, got None")
        bm, hm, nq, nk = tile_state.shape
        if nq != n_q_tiles or nk != triton.cdiv(seqlen_k, block_n):
            raise ValueError(
                f"tile_state: expected a summary for block ({block_m}, {block_n}) with "
                f"({n_q_tiles}, {triton.cdiv(seqlen_k, block_n)}) tiles, got {nq} x {nk}"
            )
        tile_state, kv_count, kv_index = tile_state.contiguous(), kv_count.contiguous(), kv_index.contiguous()
        state_arg, count_arg, index_arg = tile_state, kv_count, kv_index
        # Broadcast summary dims (size 1) are read with stride 0.
        sstrides = (nq * nk if bm > 1 else 0, nq * nk if hm > 1 else 0, nk)
        cstrides = (hm * nq if bm > 1 else 0, nq if hm > 1 else 0)
    dropout = dropout_p > 0.0
    if dropout and philox is None:
        raise ValueError("philox: expected the [seed, offset] int64 tensor when dropout_p > 0, got None")
    philox_arg = philox if dropout else dummy
    visited_arg = visited if visited is not None else dummy
    if visited is not None and tuple(visited.shape) != (batch, heads_q, n_q_tiles):
        raise ValueError(f"visited: expected shape {(batch, heads_q, n_q_tiles)}, got {tuple(visited.shape)}")
    left, right, q_offset, chunk = variant.window_left, variant.window_right, variant.q_offset, variant.chunk
    qk_scale, score, score_flags = score_args(scale, variant, alibi_slopes is not None)
    alibi_arg = dummy if alibi_slopes is None else alibi_slopes.float().contiguous()
    stride_ab = 0 if alibi_slopes is None or alibi_slopes.shape[0] == 1 else heads_q
    sinks_arg = dummy if sinks is None else sinks.float().contiguous()
    args = (
        q, k, v, out, lse, mask_arg, state_arg, count_arg, index_arg, philox_arg, alibi_arg, sinks_arg, visited_arg,
        cu_q_arg, cu_k_arg, schedule, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *mstrides, *sstrides, *cstrides,
        heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, qk_scale,
        left, right, q_offset, max(chunk, 1), score, stride_ab, float(dropout_p),
        _seq_bucket(seqlen_q, seqlen_k), num_seqs, total_q,
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=_pow2_dim(head_dim),
        BLOCK_DV=_pow2_dim(head_dim_v),
        MASK_KIND=mask_kind,
        HAS_LEFT=left >= 0,
        HAS_RIGHT=right >= 0,
        HAS_CHUNK=chunk > 0,
        SCORE=score_flags,
        HAS_SINKS=sinks is not None,
        DROPOUT=dropout,
        COUNT_VISITED=visited is not None,
        DOT_PRECISION=_dot_precision(q.dtype, q.device),
        PACKED=packed,
    )
    grid = (n_q_tiles, batch * heads_q)
    arch = _arch(q.device)
    if arch is None:
        _attn_fwd_kernel[grid](*args, **meta, num_warps=4, num_stages=1)
        return out, lse
    heavy = is_heavy(mask is not None, dropout_p, chunk, score_flags)
    variants = has_variants(chunk, score_flags)
    padded = max(meta["BLOCK_D"], meta["BLOCK_DV"])
    tuned = _tuned_fwd(arch, q.dtype, padded, heavy, left, right, variants, packed)
    with torch.cuda.device(q.device):
        if tuned is not None and tuple(tuned[:2]) == (block_m, block_n):
            _attn_fwd_kernel[grid](*args, **meta, num_warps=tuned[2], num_stages=tuned[3])
        else:
            _autotuned(arch, block_m, head_dim, head_dim_v, q.dtype, heavy, variants, packed)[grid](*args, **meta)
    return out, lse


@torch.library.custom_op("fastattn::triton_attn_fwd", mutates_args=())
def triton_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    sinks: Optional[Tensor],
    summary: list[Tensor],
    philox: Optional[Tensor],
    scale: float,
    dropout_p: float,
    variant: list[float],
    blocks: list[int],
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[Tensor, Tensor]:
    """The registry's forward op (``OP_FWD_ARGS``): ``summary`` is the mask's ``[state, kv_count, kv_index]``
    for ``blocks = [BLOCK_M, BLOCK_N]`` (empty without a mask tensor, and for packed sequences)."""
    state, count, index = summary if summary else (None, None, None)
    return attn_fwd(
        q, k, v, mask, state, count, index, philox, scale, VariantScalars.unpack(variant), dropout_p, blocks[0],
        blocks[1], alibi_slopes=alibi_slopes, sinks=sinks,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip


triton_attn_fwd.register_fake(fake_forward)


def forward(
    q: Tensor, k: Tensor, v: Tensor, params: AttnParams, philox: Optional[Tensor], *, count_visited: bool = False
):
    """The backend's forward: ``(out, lse)`` (plus the visited-tile counts when ``count_visited``).

    Picks the block for this device, builds (or reuses, cached on ``params``) the tile summary for it, and
    calls the op; ``philox`` is the call's dropout seed (None without dropout).
    """
    heavy, variants = call_families(params)
    left, right = params.bounds
    block_m, block_n = fwd_blocks(
        q.shape[-1], v.shape[-1], q.dtype, _arch(q.device), heavy, left, right, variants, params.is_packed
    )
    summary = []
    if params.mask is not None:
        s = params.tile_summary(block_m, block_n)
        summary = [s.state, s.kv_count, s.kv_index]
    layout = op_layout(params)
    call = (
        q, k, v, params.mask, params.alibi, params.sinks, summary, philox, *op_scalars(params), [block_m, block_n],
        *layout,
    )  # fmt: skip
    if count_visited:
        if params.is_packed:  # (1, Hq, num_programs): the schedule's entries, surplus ones visiting nothing
            n_tiles = num_programs(params.total_q, params.batch, block_m)
        else:
            n_tiles = math.ceil(q.shape[2] / block_m)
        visited = torch.full((q.shape[0], q.shape[1], n_tiles), -1, dtype=torch.int32, device=q.device)
        state, count, index = summary if summary else (None, None, None)
        cu_q, cu_k, max_q, max_k = layout
        out, lse = attn_fwd(
            q, k, v, params.mask, state, count, index, philox, params.scale, params.variant_scalars,
            params.dropout_p, block_m, block_n, visited=visited, alibi_slopes=params.alibi, sinks=params.sinks,
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        )  # fmt: skip
        return out, lse, visited
    return triton_attn_fwd(*call)

"""Triton backward of ``backend="triton"``: delta preprocess, a dK/dV pass and a dQ pass.

Design note
-----------
Math (per query head ``h``, kv head ``g = h // group``; ``P`` recomputed from the saved lse, never stored)::

    S  = scale * Q K^T + bias,   P = exp(S - lse)        (masked / out-of-range -> 0; lse = -inf -> 0)
    delta = rowsum(dO * O)                                (preprocess; includes dropout, as O does)
    dV = (P * Z)^T dO,           dP = (dO V^T) * Z        (Z = keep / (1 - p), 1 without dropout)
    dS = P * (dP - delta),       dQ = scale * dS K,  dK = scale * dS^T Q,  dbias = dS

Three kernels, one name each through every layer:

* ``_attn_bwd_preprocess_kernel``: ``delta`` (fp32, ``(B, Hq, Lq)``), one program per query tile.
* ``_attn_bwd_dkdv_kernel``: one program per (key tile, batch, kv head). The K/V tile and the dK/dV
  accumulators stay in registers while the query tiles that see this key tile stream past, for each
  query head of the GQA group in a fixed order. The group's reduction therefore happens in registers,
  in the same order every run: deterministic, no atomics, no repeated K/V.
* ``_attn_bwd_dq_kernel``: one program per (query tile, batch, query head); Q, dO, lse and delta stay
  resident while the non-empty key tiles stream past. A second pass instead of FlashAttention-2's atomic
  dQ accumulation: it recomputes ``QK^T`` and ``dO V^T`` (2 extra matmuls) but is deterministic. It also
  writes ``dS`` to the bias gradient when (and only when) a float mask requires grad: that ``(B, Hq, Lq,
  Lk)`` tensor is the one Lq x Lk allocation of the backend, and every element of it is written (the
  empty tiles with zeros).

Tile skipping is the forward's: the dQ pass walks ``TileSummary.kv_index`` (non-empty key tiles of its
query tile); the dK/dV pass walks the transposed lists (non-empty query tiles of its key tile), built by
``_transposed_lists`` from the summary's tile states, never from a dense mask. Band-only specs use the
same (analytic, tiny) summary. FULL tiles skip the boolean mask load; the band and sequence-end bounds
are still applied (a few integer compares per element).

FLOPs (FlashAttention's convention, what benchmarks report): backward = 2.5 x forward =
``10 * B * Hq * Lq * Lk * D`` (halved by causal), the 5 matmuls of a one-pass backward. The two-pass
schedule executes 7 (``QK^T`` and ``dO V^T`` in both passes), 1.4 x the reported count: the price of
determinism without atomics.
Minimum bytes (``e`` = element size): read Q, O, dO, K, V, lse and write dQ, dK, dV once:
``e * (B*Hq*Lq*(2D + 2Dv) + B*Hkv*Lk*(2D + 2Dv)) + 12 * B*Hq*Lq`` (lse, delta written and read), plus a
mask tensor's own size (broadcast dims stored once) and, only when asked, the ``e * B*Hq*Lq*Lk`` bias
gradient. Each pass re-reads its streamed operand once per resident tile (Q/dO ``Lk / BLOCK_N`` times,
K/V ``Lq / BLOCK_M`` times), mostly from L2; per streamed byte a tile does ~``BLOCK`` FLOPs.
Bound: for L >= ~1k the FLOP/byte ratio at minimum traffic is ~``L`` (hundreds to thousands), far above
an H100's ~300 FLOP/byte ridge: **compute bound** (tensor cores; target: at least FA2's ~322 TFLOP/s at
D = 128). Short sequences are bound by launch overhead and the lse/delta/summary reads. With a bias
gradient, the ``Lq x Lk`` write makes it memory bound (2 bytes per 10 D FLOPs in 16-bit).

Under ``TRITON_INTERPRET=1`` fixed blocks are used (32, or 64 above 512 keys: the interpreter's cost is
per tile); on a GPU the blocks follow arch, dtype and head dim (the tile summary depends on them, so
they are not autotuned; not yet measured on a GPU) and ``num_warps``/``num_stages`` are autotuned keyed
on head dims, a power-of-two bucket of the sequence lengths and the mask/dropout variant. Sequence
lengths and the scale are runtime arguments, never ``tl.constexpr``. fp32 uses TF32 only where torch
allows it; float64 (for gradcheck) accumulates in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...masks import MaskSpec, TileSummary
from ._common import TILE_FULL, apply_tensor_mask, band_allowed, load_tensor_mask
from .dropout import dropout_keep

__all__ = ["attn_bwd", "attn_bwd_debug", "triton_attn_bwd", "block_sizes", "INTERPRET_BLOCKS"]

_LOG2E = 1.4426950408889634
# Under TRITON_INTERPRET=1 one fixed block: the interpreter's cost is per numpy op (the forward's too).
INTERPRET_BLOCKS = (32, 32, 32, 32)
INTERPRET_BLOCKS_LONG = (64, 64, 64, 64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def block_sizes(
    head_dim: int, dtype: torch.dtype, device: torch.device, max_seqlen: int = 0
) -> tuple[int, int, int, int]:
    """``(dK/dV BLOCK_M, dK/dV BLOCK_N, dQ BLOCK_M, dQ BLOCK_N)`` for this head dim, dtype and device.

    Under the interpreter: 32, or 64 for sequences above 512 (its cost is per tile, not per element).

    The dK/dV pass keeps a wide key tile resident and streams narrow query tiles, the dQ pass the
    reverse (the Triton fused-attention tutorial's shapes). Fixed per (arch, dtype, head dim) rather
    than autotuned, because the tile summary depends on them. Not yet tuned on a GPU.
    """
    device = torch.device(device)
    if _interpreting() or device.type != "cuda":
        return INTERPRET_BLOCKS if max_seqlen <= 512 else INTERPRET_BLOCKS_LONG
    major, _ = torch.cuda.get_device_capability(device)
    d = _pow2_dim(head_dim)
    if dtype == torch.float64 or major < 8:
        return (16, 32, 32, 16)
    wide = dtype == torch.float32  # twice the registers and shared memory per tile
    if d <= 64 or (d <= 128 and not wide):
        return (32, 128, 128, 32)
    if d <= 128 or not wide:
        return (32, 64, 64, 32)
    return (16, 32, 32, 16)


def _transposed_lists(state: Tensor) -> tuple[Tensor, Tensor]:
    """For each key tile, its non-empty query tiles: ``(q_count (Bm, Hm, nK), q_index (Bm, Hm, nK, nQ))``.

    ``state`` is a summary's ``(Bm, Hm, nQ, nK)`` tile states; the lists are the summary of the
    transposed states (block sizes do not matter to ``from_state``).
    """
    t = TileSummary.from_state(1, 1, state.transpose(-1, -2))
    return t.kv_count, t.kv_index


def _bstrides(t: Tensor) -> list[int]:
    """Strides of a summary tensor with 0 on its broadcast (size-1) batch/head dims."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(2)] + list(t.stride())[2:]


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    heads_q, seqlen_q, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32 (contiguous (B, Hq, Lq) output)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < head_dim_v)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=ok, other=0.0)  # fmt: skip
    do = tl.load(
        do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
        mask=ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _probs_tile(
    s, lse2, offs_m, offs_n, mask_ptrs, need_mask, seqlen_q, seqlen_k, left, right, q_offset,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):  # fmt: skip
    """``P = exp2(s - lse2)`` of one ``(BLOCK_M, BLOCK_N)`` tile of scaled scores ``s`` (exp2 domain).

    ``lse2`` is ``lse * log2(e)`` with +inf for an empty row (lse = -inf) and rows past ``seqlen_q``,
    so those rows give ``P = 0``, never NaN. ``need_mask`` false (a FULL tile) skips the bool mask load.
    """
    if HAS_LEFT or HAS_RIGHT:
        allowed = band_allowed(offs_m, offs_n, seqlen_k, left, right, q_offset, HAS_LEFT, HAS_RIGHT)
    else:
        allowed = offs_n[None, :] < seqlen_k
    if MASK_KIND == 0:
        s = tl.where(allowed, s, float("-inf"))
    else:
        # mask_ptrs already address this tile: unit strides here.
        tile = load_tensor_mask(mask_ptrs, 0, 0, offs_m, offs_n, seqlen_q, seqlen_k, need_mask, MASK_KIND)
        s = apply_tensor_mask(s, allowed, tile, 1.4426950408889634, MASK_KIND)
    return tl.exp2(s - lse2[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, State, QCount, QIndex, Philox,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh, stride_sm, stride_sn,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in, stride_im,
    heads_q, heads_kv, group, seqlen_q, seqlen_k, head_dim, head_dim_v,
    scale, qk_scale2, left, right, q_offset, dropout_p, dropout_scale, seq_bucket,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key tile of kv head ``g``: K/V resident, the group's query tiles stream past."""
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1).to(tl.int64)
    b = pid_bg // heads_kv
    g = pid_bg % heads_kv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d[None, :] < head_dim
    dv_ok = offs_dv[None, :] < head_dim_v
    n_ok = offs_n[:, None] < seqlen_k
    k_ptrs = K + b * stride_kb + g * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + g * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd
    k = tl.load(k_ptrs, mask=n_ok & d_ok, other=0.0)
    v = tl.load(v_ptrs, mask=n_ok & dv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    # The group's query heads in a fixed order: the GQA reduction is deterministic, with no atomics.
    for r in range(0, group):
        h = g * group + r
        bh = b * heads_q + h
        # Pointer blocks of this head's first query tile; each step below adds a scalar row offset.
        q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_ptrs = DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod
        lse_ptrs = Lse + b * stride_lb + h * stride_lh + rows * stride_lm
        delta_ptrs = Delta + bh * seqlen_q + rows
        mask_ptrs = Mask + b * stride_mb + h * stride_mh + rows[:, None] * stride_mm + offs_n[None, :] * stride_mn
        state_base = State + b * stride_sb + h * stride_sh + pid_n * stride_sn
        index_base = QIndex + b * stride_ib + h * stride_ih + pid_n * stride_in
        count = tl.load(QCount + b * stride_cb + h * stride_ch + pid_n * stride_cn)
        for it in range(0, count):
            m_tile = tl.load(index_base + it * stride_im)
            tile_state = tl.load(state_base + m_tile * stride_sm)
            start_m = m_tile.to(tl.int64) * BLOCK_M
            offs_m = start_m + rows
            m_ok = offs_m[:, None] < seqlen_q
            q = tl.load(q_ptrs + start_m * stride_qm, mask=m_ok & d_ok, other=0.0)
            do = tl.load(do_ptrs + start_m * stride_dom, mask=m_ok & dv_ok, other=0.0)
            lse = tl.load(lse_ptrs + start_m * stride_lm, mask=offs_m < seqlen_q, other=float("-inf")).to(ACC)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(delta_ptrs + start_m, mask=offs_m < seqlen_q, other=0.0).to(ACC)
            s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=DOT_PRECISION) * qk_scale2
            p = _probs_tile(
                s, lse2, offs_m, offs_n, mask_ptrs + start_m * stride_mm, tile_state != TILE_FULL,
                seqlen_q, seqlen_k, left, right, q_offset, MASK_KIND, HAS_LEFT, HAS_RIGHT,
            )  # fmt: skip
            dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=DOT_PRECISION)
            if DROPOUT:
                keep = dropout_keep(Philox, bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
                pz = tl.where(keep, p * dropout_scale, 0.0)
                dp = tl.where(keep, dp * dropout_scale, 0.0)
            else:
                pz = p
            dv += tl.dot(tl.trans(pz.to(do.dtype)), do, out_dtype=ACC, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, out_dtype=ACC, input_precision=DOT_PRECISION)
    dk = dk * scale
    dk_ptrs = DK + b * stride_dkb + g * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn
    tl.store(dk_ptrs + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=n_ok & d_ok)
    dv_ptrs = DV + b * stride_dvb + g * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn
    tl.store(dv_ptrs + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=n_ok & dv_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DS, KeepOut, Mask, State, KVCount, KVIndex, Philox,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh, stride_sm, stride_sn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_in,
    heads_q, group, seqlen_q, seqlen_k, head_dim, head_dim_v, n_k_tiles,
    scale, qk_scale2, left, right, q_offset, dropout_p, dropout_scale, seq_bucket,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
    WRITE_DS: tl.constexpr, WRITE_KEEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile of head ``h`` (and dS for a bias gradient): Q/dO resident, key tiles stream past.

    ``DS`` / ``KeepOut`` are contiguous ``(B, Hq, Lq, Lk)``; with ``WRITE_DS`` / ``WRITE_KEEP`` (the
    debug keep-mask) every element is written, the empty tiles' too (zero / the regenerated mask).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    g = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d[None, :] < head_dim
    dv_ok = offs_dv[None, :] < head_dim_v
    m_ok = offs_m[:, None] < seqlen_q
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = (
        DO + b * stride_dob + h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod
    )
    q = tl.load(q_ptrs, mask=m_ok & d_ok, other=0.0)
    do = tl.load(do_ptrs, mask=m_ok & dv_ok, other=0.0)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=offs_m < seqlen_q, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse.to(ACC) * 1.4426950408889634)
    delta = tl.load(Delta + pid_bh * seqlen_q + offs_m, mask=offs_m < seqlen_q, other=0.0).to(ACC)
    # Pointer blocks of the first key tile; each step below adds a scalar key offset.
    k_ptrs = K + b * stride_kb + g * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + g * stride_vh + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_ptrs = (
        Mask + b * stride_mb + h * stride_mh + offs_m[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mn
    )
    # (B, Hq, Lq, Lk) contiguous gradient / debug outputs: this tile's first key.
    dense_ptrs = pid_bh * seqlen_q * seqlen_k + offs_m[:, None].to(tl.int64) * seqlen_k + cols[None, :]
    state_base = State + b * stride_sb + h * stride_sh + pid_m * stride_sm
    index_base = KVIndex + b * stride_ib + h * stride_ih + pid_m * stride_im
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    count = tl.load(KVCount + b * stride_cb + h * stride_ch + pid_m * stride_cm)
    for it in range(0, count):
        n_tile = tl.load(index_base + it * stride_in)
        tile_state = tl.load(state_base + n_tile * stride_sn)
        start_n = n_tile.to(tl.int64) * BLOCK_N
        offs_n = start_n + cols
        n_ok = offs_n[:, None] < seqlen_k
        k = tl.load(k_ptrs + start_n * stride_kn, mask=n_ok & d_ok, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=n_ok & dv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=DOT_PRECISION) * qk_scale2
        p = _probs_tile(
            s, lse2, offs_m, offs_n, mask_ptrs + start_n * stride_mn, tile_state != TILE_FULL,
            seqlen_q, seqlen_k, left, right, q_offset, MASK_KIND, HAS_LEFT, HAS_RIGHT,
        )  # fmt: skip
        dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(Philox, pid_bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
            if WRITE_KEEP:
                tl.store(KeepOut + dense_ptrs + start_n, keep.to(tl.int8), mask=m_ok & (offs_n[None, :] < seqlen_k))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, out_dtype=ACC, input_precision=DOT_PRECISION)
        if WRITE_DS:
            tl.store(DS + dense_ptrs + start_n, ds.to(DS.dtype.element_ty), mask=m_ok & (offs_n[None, :] < seqlen_k))
    if WRITE_DS or WRITE_KEEP:
        # The rest of the list holds the empty key tiles: zero gradient (and the mask as drawn).
        for it in range(count, n_k_tiles):
            start_n = tl.load(index_base + it * stride_in).to(tl.int64) * BLOCK_N
            offs_n = start_n + cols
            ok = m_ok & (offs_n[None, :] < seqlen_k)
            if WRITE_DS:
                tl.store(DS + dense_ptrs + start_n, tl.zeros([BLOCK_M, BLOCK_N], DS.dtype.element_ty), mask=ok)
            if WRITE_KEEP:
                keep = dropout_keep(Philox, pid_bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
                tl.store(KeepOut + dense_ptrs + start_n, keep.to(tl.int8), mask=ok)
    dq = dq * scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm
    tl.store(dq_ptrs + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=m_ok & d_ok)


@functools.cache
def _tuned_kernels(interpreting: bool):
    """The dK/dV and dQ kernels, autotuned on a GPU over num_warps/num_stages (blocks: ``block_sizes``)."""
    if interpreting:
        return _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (4, 3), (8, 2), (8, 3))]
    key = ["head_dim", "head_dim_v", "seq_bucket", "MASK_KIND", "HAS_LEFT", "HAS_RIGHT", "DROPOUT"]
    return (
        triton.autotune(configs=configs, key=key)(_attn_bwd_dkdv_kernel),
        triton.autotune(configs=configs, key=key)(_attn_bwd_dq_kernel),
    )


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """TF32 for fp32 on a GPU only where torch allows it (as the forward does); IEEE otherwise."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    state_kv: Tensor,
    state_q: Tensor,
    philox: Optional[Tensor],
    scale: float,
    left: int,
    right: int,
    q_offset: int,
    dropout_p: float,
    need_mask_grad: bool,
    blocks: list[int],
    write_keep: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Allocates the gradients and runs the three kernels: ``(dq, dk, dv, dmask or empty, keep or None)``."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    bm1, bn1, bm2, bn2 = blocks
    dropout = dropout_p > 0.0
    if dropout and (philox is None or philox.dtype != torch.int64 or philox.numel() != 2):
        raise ValueError(
            f"saved: expected (philox,) with an int64 [seed, offset] tensor when dropout_p > 0, got {philox}"
        )
    for name, state, bq, bk in (("state_kv", state_kv, bm1, bn1), ("state_q", state_q, bm2, bn2)):
        expected = (triton.cdiv(seqlen_q, bq), triton.cdiv(seqlen_k, bk))
        if tuple(state.shape[-2:]) != expected:
            raise ValueError(
                f"{name}: expected tile states for block ({bq}, {bk}) {expected}, got {tuple(state.shape)}"
            )

    poison = os.environ.get("FASTATTN_TRITON_POISON") == "1"  # test hook: unwritten elements stay NaN
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if need_mask_grad:
        dmask = torch.empty(batch, heads_q, seqlen_q, seqlen_k, dtype=mask.dtype, device=q.device)
    else:
        dmask = q.new_empty(0)
    if poison:
        for t in (dq, dk, dv, dmask):
            t.fill_(float("nan"))
    keep_out = None
    if write_keep:
        keep_out = torch.full((batch, heads_q, seqlen_q, seqlen_k), -1, dtype=torch.int8, device=q.device)

    delta = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, 64), batch * heads_q)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads_q, seqlen_q, head_dim_v,
        BLOCK_M=64, BLOCK_DV=_pow2_dim(head_dim_v),
    )  # fmt: skip

    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    # A bool mask is read as bytes: a same-size view keeps the broadcast (stride-0) strides.
    mask_arg = q if mask is None else (mask.view(torch.uint8) if kind == 1 else mask)
    mask_strides = [0, 0, 0, 0] if mask is None else list(mask.stride())
    dummy = torch.zeros(2, dtype=torch.int64, device=q.device)
    philox_arg = philox if dropout else dummy
    scalars = (
        float(scale), float(scale) * _LOG2E, int(left), int(right), int(q_offset), float(dropout_p),
        1.0 / (1.0 - dropout_p), min(16384, triton.next_power_of_2(max(seqlen_q, seqlen_k, 1))),
    )  # fmt: skip
    meta = dict(
        MASK_KIND=kind,
        HAS_LEFT=left >= 0,
        HAS_RIGHT=right >= 0,
        DROPOUT=dropout,
        BLOCK_D=_pow2_dim(head_dim),
        BLOCK_DV=_pow2_dim(head_dim_v),
        DOT_PRECISION=_dot_precision(q.dtype, q.device),
        ACC=_acc_dtype(q.dtype),
    )
    launch = dict(num_warps=4, num_stages=1) if _interpreting() else {}
    dkdv_kernel, dq_kernel = _tuned_kernels(_interpreting())

    state_kv = state_kv.to(device=q.device, dtype=torch.int8)
    q_count, q_index = _transposed_lists(state_kv)
    dkdv_kernel[(triton.cdiv(seqlen_k, bn1), batch * heads_kv)](
        q, k, v, grad_out, lse, delta, dk, dv, mask_arg, state_kv, q_count, q_index, philox_arg,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(),
        *dk.stride(), *dv.stride(), *mask_strides,
        *_bstrides(state_kv), *_bstrides(q_count), *_bstrides(q_index),
        heads_q, heads_kv, heads_q // heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v, *scalars,
        BLOCK_M=bm1, BLOCK_N=bn1, **meta, **launch,
    )  # fmt: skip

    summary_q = TileSummary.from_state(bm2, bn2, state_q.to(device=q.device, dtype=torch.int8))
    dq_kernel[(triton.cdiv(seqlen_q, bm2), batch * heads_q)](
        q, k, v, grad_out, lse, delta, dq, dmask, keep_out if write_keep else dummy,
        mask_arg, summary_q.state, summary_q.kv_count, summary_q.kv_index, philox_arg,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(),
        *dq.stride(), *mask_strides,
        *_bstrides(summary_q.state), *_bstrides(summary_q.kv_count), *_bstrides(summary_q.kv_index),
        heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v, summary_q.state.shape[-1], *scalars,
        WRITE_DS=need_mask_grad, WRITE_KEEP=write_keep, BLOCK_M=bm2, BLOCK_N=bn2, **meta, **launch,
    )  # fmt: skip
    return dq, dk, dv, dmask, (None if keep_out is None else keep_out.bool())


@torch.library.custom_op("fastattn::triton_attn_bwd", mutates_args=())
def triton_attn_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    state_kv: Tensor,
    state_q: Tensor,
    philox: Optional[Tensor],
    scale: float,
    window_left: int,
    window_right: int,
    q_offset: int,
    dropout_p: float,
    need_mask_grad: bool,
    blocks: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dmask)``; ``dmask`` is ``(B, Hq, Lq, Lk)`` in the mask's dtype, or empty unless asked for.

    ``state_kv`` / ``state_q``: the mask's tile states for the dK/dV and dQ blocks (``blocks`` =
    ``block_sizes(...)``); ``philox``: the forward's dropout ``[seed, offset]`` or None.
    """
    dq, dk, dv, dmask, _ = _launch(
        grad_out, q, k, v, out, lse, mask, state_kv, state_q, philox,
        scale, window_left, window_right, q_offset, dropout_p, need_mask_grad, blocks,
    )  # fmt: skip
    return dq, dk, dv, dmask


@triton_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, mask, state_kv, state_q, philox, scale, window_left, window_right, q_offset,
      dropout_p, need_mask_grad, blocks):  # fmt: skip
    if need_mask_grad:
        dmask = q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=mask.dtype)
    else:
        dmask = q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _tile_states(spec: MaskSpec, blocks: list[int]) -> tuple[Tensor, Tensor]:
    """The mask's tile states for the dK/dV and dQ blocks.

    Eagerly they are cached on the spec. While compiling, backward runs inside a traced subgraph where
    writing a new tensor into the spec's cache is a side effect Dynamo refuses, so a private copy of
    the spec (with an empty cache) computes them instead.
    """
    if torch.compiler.is_compiling():
        spec = dataclasses.replace(spec, _cache={})
    return spec.tile_summary(blocks[0], blocks[1]).state, spec.tile_summary(blocks[2], blocks[3]).state


def _prepare(q: Tensor, spec: MaskSpec, dropout_p: float, saved: tuple[Tensor, ...], need_mask_grad: bool):
    if need_mask_grad and (spec.tensor is None or not spec.tensor.dtype.is_floating_point):
        got = "no mask" if spec.tensor is None else f"a {spec.tensor.dtype} mask"
        raise ValueError(f"need_mask_grad: expected a floating attn_mask to differentiate, got {got}")
    philox = None
    if dropout_p > 0.0:
        if len(saved) != 1:
            raise ValueError(
                f"saved: expected (philox,) from the Triton forward when dropout_p > 0, got {len(saved)} tensors"
            )
        philox = saved[0]
    blocks = list(block_sizes(q.shape[-1], q.dtype, q.device, max(q.shape[2], spec.seqlen_k)))
    state_kv, state_q = _tile_states(spec, blocks)
    return philox, blocks, state_kv, state_q


def attn_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    spec: MaskSpec,
    scale: float,
    dropout_p: float,
    saved: tuple[Tensor, ...],
    need_mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward of the Triton backend: ``(dq, dk, dv, dmask or None)`` from the forward's ``(out, lse)``.

    Only the lse format matters (natural log, fp32, ``(B, Hq, Lq)``, -inf for an empty row), not the
    kernel that produced it. ``saved`` is the forward's ``(philox,)`` with dropout (see ``dropout.py``).
    ``dmask`` (``(B, Hq, Lq, Lk)``, the mask's dtype) only when ``need_mask_grad``, for a float mask.
    """
    philox, blocks, state_kv, state_q = _prepare(q, spec, dropout_p, saved, need_mask_grad)
    left, right = spec.bounds
    dq, dk, dv, dmask = triton_attn_bwd(
        grad_out, q, k, v, out, lse, spec.tensor, state_kv, state_q, philox,
        float(scale), left, right, spec.q_offset, float(dropout_p), bool(need_mask_grad), blocks,
    )  # fmt: skip
    return dq, dk, dv, (dmask if need_mask_grad else None)


def attn_bwd_debug(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    spec: MaskSpec,
    scale: float,
    dropout_p: float,
    saved: tuple[Tensor, ...],
    need_mask_grad: bool = False,
    blocks: Optional[tuple[int, int, int, int]] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """``attn_bwd`` plus the dropout keep-mask the dQ kernel used (``(B, Hq, Lq, Lk)`` bool), for tests.

    ``blocks`` overrides ``block_sizes`` (tests use it to check that results do not depend on tiling).
    Allocates ``Lq x Lk`` for the keep-mask: debugging only, never on the training path.
    """
    philox, default_blocks, _, _ = _prepare(q, spec, dropout_p, saved, need_mask_grad)
    blocks = list(blocks or default_blocks)
    state_kv, state_q = _tile_states(spec, blocks)
    left, right = spec.bounds
    dq, dk, dv, dmask, keep = _launch(
        grad_out, q, k, v, out, lse, spec.tensor, state_kv, state_q, philox,
        float(scale), left, right, spec.q_offset, float(dropout_p), bool(need_mask_grad), blocks,
        write_keep=dropout_p > 0.0,
    )  # fmt: skip
    return dq, dk, dv, (dmask if need_mask_grad else None), keep

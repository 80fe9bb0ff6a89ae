"""Triton kernels of the graph ops: one program per node, every head of it at once.

Design note
-----------
Forward (``_graph_fwd_kernel``, grid = targets): a program owns target ``i`` and walks its CSR row in
blocks of ``BLOCK_E`` edges. It gathers the block's source rows as a ``(BLOCK_E, BLOCK_H, BLOCK_C)``
tile (all heads of an edge are one contiguous row of H·C elements), scores them into
``(BLOCK_E, BLOCK_H)``, raises the running max once per block and adds ``p · v`` into an fp32
``(BLOCK_H, BLOCK_CV)`` accumulator: FlashAttention's online softmax with a block of edges for a
key tile. Edge features are projected per block in registers (``Σ_d e[:, d] ⊗ W_e[d]``, fp32).
Nothing per edge is written but the optional probabilities (``WRITE_PROBS``, E × H).

Backward: ``_graph_bwd_dst_kernel`` (grid = targets) recomputes each edge's probability from the
saved lse, writes the kept probability and the score gradient per edge (E × H fp32 each: the only
per-edge storage), and accumulates the target-side gradient in registers, edge-feature gradients
per edge, and the parameter gradients (``att``, ``W_e``) with fp32 atomics (one per program for
``att``; one per block and edge feature for ``W_e``, whose contention grows with E·De: fine for small
edge dims). ``_graph_bwd_src_kernel`` (grid = sources) walks the CSC and sums the source-side
gradients from the stored scalars, so no node gradient needs an atomic.

FLOPs per edge and head: dot 4C, GAT 2C + 2, GATv2 6C (plus 2·De·C for edge projections); the
backward about 2.5× that. Minimum bytes: one gathered H·C row per edge and pass (the forward reads
E·H·C·s bytes, s the element size), the node tensors once, 16 bytes of graph per edge, and E·H·8
bytes of per-edge scalars in the backward. At 4–6 FLOPs per gathered element this is a gather-bound
kernel: the bound to reach on a GPU is the random-row read bandwidth of HBM/L2 (rows of 256–512
bytes, i.e. several full sectors, so close to the copy bandwidth when the node table fits L2).
Dropout: ``_dropout.py``'s contract (``tl.rand(seed, offset + e·H + h)``).
"""

from __future__ import annotations

import triton
import triton.language as tl

KIND_DOT: tl.constexpr = tl.constexpr(0)
KIND_GAT: tl.constexpr = tl.constexpr(1)
KIND_GATV2: tl.constexpr = tl.constexpr(2)


@triton.jit
def _lrelu(z, slope):
    return tl.where(z > 0, z, z * slope)


@triton.jit
def _edge_rows(eid, e_mask, num_edges):
    """Row of each edge id in edge_attr (real edges) or loop_attr (added self loops), and which one."""
    is_real = eid < num_edges
    return tl.where(is_real, eid, 0), tl.where(is_real, 0, eid - num_edges), is_real


@triton.jit
def _edge_feature(EdgeAttr, LoopAttr, real_row, loop_row, is_real, e_mask, d, width):
    """Column ``d`` of each edge's feature row, fp32 ``(BLOCK_E,)``."""
    f_real = tl.load(EdgeAttr + real_row * width + d, mask=e_mask & is_real, other=0.0).to(tl.float32)
    f_loop = tl.load(LoopAttr + loop_row * width + d, mask=e_mask & (~is_real), other=0.0).to(tl.float32)
    return f_real + f_loop


@triton.jit
def _edge_projection(
    EdgeAttr, LoopAttr, ProjT, eid, e_mask, num_edges, edge_dim, hc_stride, hc_off, hc_mask, proj,
):  # fmt: skip
    """``proj`` + ``W_e e`` for the block's edges, ``(BLOCK_E, BLOCK_H, BLOCK_C)`` fp32; ``ProjT`` is
    ``W_eᵀ`` ``(De, H·C)`` in fp32 and ``hc_stride`` = H·C."""
    real_row, loop_row, is_real = _edge_rows(eid, e_mask, num_edges)
    for d in range(0, edge_dim):
        f = _edge_feature(EdgeAttr, LoopAttr, real_row, loop_row, is_real, e_mask, d, edge_dim)
        w = tl.load(ProjT + d * hc_stride + hc_off, mask=hc_mask, other=0.0)
        proj += f[:, None, None] * w[None, :, :]
    return proj


@triton.jit
def _scores(
    KIND: tl.constexpr, HAS_EDGE: tl.constexpr,
    Src, Val, EdgeAttr, LoopAttr, ProjT, j, eid, e_mask, d_row, att, num_edges, edge_dim, heads, channels,
    channels_v, offs_h, h_mask, hc_off, hc_mask, hcv_off, hcv_mask, slope, BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Block scores ``(BLOCK_E, BLOCK_H)`` and what the callers reuse: values, the per-edge feature
    (k + e for dot, z for GATv2, the pre-activation for GAT) and the edge projection."""
    j64 = j.to(tl.int64)
    m3 = e_mask[:, None, None] & hc_mask[None, :, :]
    mv3 = e_mask[:, None, None] & hcv_mask[None, :, :]
    proj = tl.zeros((BLOCK_E, BLOCK_H, BLOCK_C), dtype=tl.float32)
    if HAS_EDGE and KIND != KIND_GAT:
        proj = _edge_projection(
            EdgeAttr, LoopAttr, ProjT, eid, e_mask, num_edges, edge_dim, heads * channels, hc_off, hc_mask, proj
        )
    if KIND == KIND_GAT:
        eh = e_mask[:, None] & h_mask[None, :]
        feat = tl.load(Src + j64[:, None] * heads + offs_h[None, :], mask=eh, other=0.0).to(tl.float32)
        feat = feat + d_row[None, :]
        if HAS_EDGE:
            real_row, loop_row, is_real = _edge_rows(eid, e_mask, num_edges)
            c_real = tl.load(
                EdgeAttr + real_row[:, None] * heads + offs_h[None, :], mask=eh & is_real[:, None], other=0.0
            )
            c_loop = tl.load(
                LoopAttr + loop_row[:, None] * heads + offs_h[None, :], mask=eh & (~is_real[:, None]), other=0.0
            )
            feat = feat + c_real.to(tl.float32) + c_loop.to(tl.float32)
        s = _lrelu(feat, slope)
        v = tl.load(Val + j64[:, None, None] * heads * channels_v + hcv_off[None, :, :], mask=mv3, other=0.0)
        v = v.to(tl.float32)
    elif KIND == KIND_DOT:
        feat = tl.load(Src + j64[:, None, None] * heads * channels + hc_off[None, :, :], mask=m3, other=0.0)
        v = tl.load(Val + j64[:, None, None] * heads * channels_v + hcv_off[None, :, :], mask=mv3, other=0.0)
        feat = feat.to(tl.float32) + proj
        v = v.to(tl.float32) + proj
        s = tl.sum(feat * d_row[None, :, :], axis=2)
    else:
        v = tl.load(Src + j64[:, None, None] * heads * channels + hc_off[None, :, :], mask=m3, other=0.0)
        v = v.to(tl.float32)
        feat = v + d_row[None, :, :] + proj
        s = tl.sum(_lrelu(feat, slope) * att[None, :, :], axis=2)
    s = tl.where(e_mask[:, None], s, float("-inf"))
    return s, v, feat, proj


@triton.jit
def _graph_fwd_kernel(
    Rowptr, Col, Eid, Dst, Src, Val, Att, EdgeAttr, LoopAttr, ProjT, Philox, Out, Lse, Probs,
    num_edges, heads, channels, channels_v, edge_dim, scale, slope, dropout_p,
    KIND: tl.constexpr, HAS_EDGE: tl.constexpr, DROPOUT: tl.constexpr, WRITE_PROBS: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CV: tl.constexpr,
):  # fmt: skip
    """Program = target ``program_id(0)``; see the module docstring."""
    i = tl.program_id(0).to(tl.int64)
    start = tl.load(Rowptr + i)
    end = tl.load(Rowptr + i + 1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_cv = tl.arange(0, BLOCK_CV)
    h_mask = offs_h < heads
    hc_mask = h_mask[:, None] & (offs_c[None, :] < channels)
    hcv_mask = h_mask[:, None] & (offs_cv[None, :] < channels_v)
    hc_off = offs_h[:, None] * channels + offs_c[None, :]
    hcv_off = offs_h[:, None] * channels_v + offs_cv[None, :]
    if KIND == KIND_GAT:
        d_row = tl.load(Dst + i * heads + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    else:
        d_row = tl.load(Dst + i * heads * channels + hc_off, mask=hc_mask, other=0.0).to(tl.float32)
        if KIND == KIND_DOT:
            d_row = d_row * scale
    att = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    if KIND == KIND_GATV2:
        att = tl.load(Att + hc_off, mask=hc_mask, other=0.0).to(tl.float32)
    if DROPOUT:
        seed = tl.load(Philox)
        rng_offset = tl.load(Philox + 1)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_CV), dtype=tl.float32)
    for b0 in range(start, end, BLOCK_E):
        offs_e = b0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < end
        j = tl.load(Col + offs_e, mask=e_mask, other=0)
        eid = tl.load(Eid + offs_e, mask=e_mask, other=0)
        s, v, _feat, _proj = _scores(
            KIND, HAS_EDGE, Src, Val, EdgeAttr, LoopAttr, ProjT, j, eid, e_mask, d_row, att, num_edges, edge_dim,
            heads, channels, channels_v, offs_h, h_mask, hc_off, hc_mask, hcv_off, hcv_mask, slope,
            BLOCK_E, BLOCK_H, BLOCK_C,
        )  # fmt: skip
        if WRITE_PROBS:
            tl.store(Probs + offs_e[:, None] * heads + offs_h[None, :], s, mask=e_mask[:, None] & h_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.exp(s - m_new[None, :])  # padded edges: exp(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, axis=0)
        if DROPOUT:
            r = tl.rand(seed, rng_offset + eid.to(tl.int64)[:, None] * heads + offs_h[None, :])
            p = tl.where(r >= dropout_p, p, 0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=0)
        m_i = m_new

    empty = l_i == 0.0  # no incoming edge: zeros and lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    tl.store(Out + i * heads * channels_v + hcv_off, out.to(Out.dtype.element_ty), mask=hcv_mask)
    tl.store(Lse + i * heads + offs_h, lse, mask=h_mask)
    if WRITE_PROBS:
        for b0 in range(start, end, BLOCK_E):
            offs_e = b0 + tl.arange(0, BLOCK_E)
            ptrs = Probs + offs_e[:, None] * heads + offs_h[None, :]
            eh = (offs_e[:, None] < end) & h_mask[None, :]
            tl.store(ptrs, tl.exp(tl.load(ptrs, mask=eh, other=0.0) - lse[None, :]), mask=eh)


@triton.jit
def _graph_bwd_dst_kernel(
    Rowptr, Col, Eid, Dst, Src, Val, Att, EdgeAttr, LoopAttr, ProjT, Philox, DOut, Out, Lse, DLse, P, DS,
    DDst, DEdgeAttr, DLoopAttr, DAtt, DProjT,
    num_edges, heads, channels, channels_v, edge_dim, scale, slope, dropout_p,
    KIND: tl.constexpr, HAS_EDGE: tl.constexpr, DROPOUT: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CV: tl.constexpr,
):  # fmt: skip
    """Backward pass 1, program = target ``program_id(0)``: per-edge P and dS, target-side gradients."""
    i = tl.program_id(0).to(tl.int64)
    start = tl.load(Rowptr + i)
    end = tl.load(Rowptr + i + 1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_cv = tl.arange(0, BLOCK_CV)
    h_mask = offs_h < heads
    hc_mask = h_mask[:, None] & (offs_c[None, :] < channels)
    hcv_mask = h_mask[:, None] & (offs_cv[None, :] < channels_v)
    hc_off = offs_h[:, None] * channels + offs_c[None, :]
    hcv_off = offs_h[:, None] * channels_v + offs_cv[None, :]
    if KIND == KIND_GAT:
        d_row = tl.load(Dst + i * heads + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        g_dst = tl.zeros((BLOCK_H,), dtype=tl.float32)
    else:
        d_row = tl.load(Dst + i * heads * channels + hc_off, mask=hc_mask, other=0.0).to(tl.float32)
        g_dst = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    att = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    if KIND == KIND_GATV2:
        att = tl.load(Att + hc_off, mask=hc_mask, other=0.0).to(tl.float32)
    d_att = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    go = tl.load(DOut + i * heads * channels_v + hcv_off, mask=hcv_mask, other=0.0).to(tl.float32)
    o = tl.load(Out + i * heads * channels_v + hcv_off, mask=hcv_mask, other=0.0).to(tl.float32)
    delta = tl.sum(go * o, axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLse + i * heads + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    lse = tl.load(Lse + i * heads + offs_h, mask=h_mask, other=0.0)
    inv_keep = 1.0
    if DROPOUT:
        seed = tl.load(Philox)
        rng_offset = tl.load(Philox + 1)
        inv_keep = 1.0 / (1.0 - dropout_p)
    score_row = d_row
    if KIND == KIND_DOT:
        score_row = d_row * scale

    for b0 in range(start, end, BLOCK_E):
        offs_e = b0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < end
        eh = e_mask[:, None] & h_mask[None, :]
        j = tl.load(Col + offs_e, mask=e_mask, other=0)
        eid = tl.load(Eid + offs_e, mask=e_mask, other=0)
        s, v, feat, _proj = _scores(
            KIND, HAS_EDGE, Src, Val, EdgeAttr, LoopAttr, ProjT, j, eid, e_mask, score_row, att, num_edges,
            edge_dim, heads, channels, channels_v, offs_h, h_mask, hc_off, hc_mask, hcv_off, hcv_mask, slope,
            BLOCK_E, BLOCK_H, BLOCK_C,
        )  # fmt: skip
        p = tl.exp(s - lse[None, :])
        ks = tl.full((BLOCK_E, BLOCK_H), 1.0, dtype=tl.float32)
        if DROPOUT:
            r = tl.rand(seed, rng_offset + eid.to(tl.int64)[:, None] * heads + offs_h[None, :])
            ks = tl.where(r >= dropout_p, inv_keep, 0.0)
        dp = ks * tl.sum(go[None, :, :] * v, axis=2)
        ds = p * (dp - delta[None, :])
        pk = p * ks
        tl.store(P + offs_e[:, None] * heads + offs_h[None, :], pk, mask=eh)
        d_edge = tl.zeros((BLOCK_E, BLOCK_H, BLOCK_C), dtype=tl.float32)
        if KIND == KIND_DOT:
            dss = ds * scale
            tl.store(DS + offs_e[:, None] * heads + offs_h[None, :], dss, mask=eh)
            g_dst += tl.sum(dss[:, :, None] * feat, axis=0)
            if HAS_EDGE:  # d(e_ij) = ds·scale·q_i (key side) + p·dO_i (value side; Cv == C)
                d_edge = dss[:, :, None] * d_row[None, :, :] + pk[:, :, None] * go[None, :, :]
        elif KIND == KIND_GAT:
            dpre = tl.where(feat > 0, ds, ds * slope)
            tl.store(DS + offs_e[:, None] * heads + offs_h[None, :], dpre, mask=eh)
            g_dst += tl.sum(tl.where(eh, dpre, 0.0), axis=0)
            if HAS_EDGE:
                real_row, loop_row, is_real = _edge_rows(eid, e_mask, num_edges)
                val = dpre.to(DEdgeAttr.dtype.element_ty)
                tl.store(DEdgeAttr + real_row[:, None] * heads + offs_h[None, :], val, mask=eh & is_real[:, None])
                tl.store(DLoopAttr + loop_row[:, None] * heads + offs_h[None, :], val, mask=eh & (~is_real[:, None]))
        else:
            tl.store(DS + offs_e[:, None] * heads + offs_h[None, :], ds, mask=eh)
            d_edge = ds[:, :, None] * att[None, :, :] * tl.where(feat > 0, 1.0, slope)
            d_edge = tl.where(e_mask[:, None, None], d_edge, 0.0)
            g_dst += tl.sum(d_edge, axis=0)
            d_att += tl.sum(tl.where(e_mask[:, None, None], ds[:, :, None] * _lrelu(feat, slope), 0.0), axis=0)
        if HAS_EDGE and KIND != KIND_GAT:
            # d e_raw[:, d] = Σ_hc d_edge · W_e[hc, d];  dW_e[hc, d] += Σ_e d_edge · e_raw[:, d]
            d_edge = tl.where(e_mask[:, None, None], d_edge, 0.0)
            real_row, loop_row, is_real = _edge_rows(eid, e_mask, num_edges)
            for d in range(0, edge_dim):
                w = tl.load(ProjT + d * heads * channels + hc_off, mask=hc_mask, other=0.0)
                g = tl.sum(tl.sum(d_edge * w[None, :, :], axis=2), axis=1)
                dt = DEdgeAttr.dtype.element_ty
                tl.store(DEdgeAttr + real_row * edge_dim + d, g.to(dt), mask=e_mask & is_real)
                tl.store(DLoopAttr + loop_row * edge_dim + d, g.to(dt), mask=e_mask & (~is_real))
                f = _edge_feature(EdgeAttr, LoopAttr, real_row, loop_row, is_real, e_mask, d, edge_dim)
                dw = tl.sum(d_edge * f[:, None, None], axis=0)
                tl.atomic_add(DProjT + d * heads * channels + hc_off, dw, mask=hc_mask)
    if KIND == KIND_GAT:
        tl.store(DDst + i * heads + offs_h, g_dst.to(DDst.dtype.element_ty), mask=h_mask)
    else:
        tl.store(DDst + i * heads * channels + hc_off, g_dst.to(DDst.dtype.element_ty), mask=hc_mask)
    if KIND == KIND_GATV2:
        tl.atomic_add(DAtt + hc_off, d_att, mask=hc_mask & (end > start))


@triton.jit
def _graph_bwd_src_kernel(
    Colptr, Row, Slot, Eid, Dst, Src, Att, EdgeAttr, LoopAttr, ProjT, DOut, P, DS, DSrc, DVal,
    num_edges, heads, channels, channels_v, edge_dim, slope,
    KIND: tl.constexpr, HAS_EDGE: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CV: tl.constexpr,
):  # fmt: skip
    """Backward pass 2, program = source ``program_id(0)``: sums over its outgoing edges (the CSC)."""
    jn = tl.program_id(0).to(tl.int64)
    start = tl.load(Colptr + jn)
    end = tl.load(Colptr + jn + 1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_cv = tl.arange(0, BLOCK_CV)
    h_mask = offs_h < heads
    hc_mask = h_mask[:, None] & (offs_c[None, :] < channels)
    hcv_mask = h_mask[:, None] & (offs_cv[None, :] < channels_v)
    hc_off = offs_h[:, None] * channels + offs_c[None, :]
    hcv_off = offs_h[:, None] * channels_v + offs_cv[None, :]
    att = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    x_l = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    if KIND == KIND_GATV2:
        att = tl.load(Att + hc_off, mask=hc_mask, other=0.0).to(tl.float32)
        x_l = tl.load(Src + jn * heads * channels + hc_off, mask=hc_mask, other=0.0).to(tl.float32)
    if KIND == KIND_GAT:
        g_src = tl.zeros((BLOCK_H,), dtype=tl.float32)
    else:
        g_src = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    g_val = tl.zeros((BLOCK_H, BLOCK_CV), dtype=tl.float32)
    for b0 in range(start, end, BLOCK_E):
        offs_t = b0 + tl.arange(0, BLOCK_E)
        e_mask = offs_t < end
        eh = e_mask[:, None] & h_mask[None, :]
        i = tl.load(Row + offs_t, mask=e_mask, other=0).to(tl.int64)
        q = tl.load(Slot + offs_t, mask=e_mask, other=0).to(tl.int64)
        pk = tl.load(P + q[:, None] * heads + offs_h[None, :], mask=eh, other=0.0)
        ds = tl.load(DS + q[:, None] * heads + offs_h[None, :], mask=eh, other=0.0)
        mv3 = e_mask[:, None, None] & hcv_mask[None, :, :]
        m3 = e_mask[:, None, None] & hc_mask[None, :, :]
        go = tl.load(DOut + i[:, None, None] * heads * channels_v + hcv_off[None, :, :], mask=mv3, other=0.0)
        go = go.to(tl.float32)
        if KIND == KIND_DOT:
            qi = tl.load(Dst + i[:, None, None] * heads * channels + hc_off[None, :, :], mask=m3, other=0.0)
            g_src += tl.sum(ds[:, :, None] * qi.to(tl.float32), axis=0)
            g_val += tl.sum(pk[:, :, None] * go, axis=0)
        elif KIND == KIND_GAT:
            g_src += tl.sum(ds, axis=0)
            g_val += tl.sum(pk[:, :, None] * go, axis=0)
        else:
            xr = tl.load(Dst + i[:, None, None] * heads * channels + hc_off[None, :, :], mask=m3, other=0.0)
            z = x_l[None, :, :] + xr.to(tl.float32)
            if HAS_EDGE:
                eid = tl.load(Eid + q, mask=e_mask, other=0)
                z = _edge_projection(
                    EdgeAttr, LoopAttr, ProjT, eid, e_mask, num_edges, edge_dim, heads * channels, hc_off, hc_mask, z
                )
            dz = ds[:, :, None] * att[None, :, :] * tl.where(z > 0, 1.0, slope)
            g_src += tl.sum(dz + pk[:, :, None] * go, axis=0)
    if KIND == KIND_GAT:
        tl.store(DSrc + jn * heads + offs_h, g_src.to(DSrc.dtype.element_ty), mask=h_mask)
    else:
        tl.store(DSrc + jn * heads * channels + hc_off, g_src.to(DSrc.dtype.element_ty), mask=hc_mask)
    if KIND != KIND_GATV2:
        tl.store(DVal + jn * heads * channels_v + hcv_off, g_val.to(DVal.dtype.element_ty), mask=hcv_mask)


@triton.jit
def _graph_dropout_keep_kernel(Philox, Keep, n, dropout_p, BLOCK: tl.constexpr):
    """The keep-mask of ``_dropout.py`` for flat indices ``e · H + h`` (tests and attention weights)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(Philox)
    rng_offset = tl.load(Philox + 1)
    keep = tl.rand(seed, rng_offset + offs) >= dropout_p
    tl.store(Keep + offs, keep.to(tl.int8), mask=offs < n)


__all__ = [
    "_graph_bwd_dst_kernel",
    "_graph_bwd_src_kernel",
    "_graph_dropout_keep_kernel",
    "_graph_fwd_kernel",
    "triton",
]

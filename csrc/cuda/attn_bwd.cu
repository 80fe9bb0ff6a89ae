// CUDA backward attention: kernels attn_bwd_preprocess_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel,
// launcher attn_bwd::launch, op fastattn::cuda_attn_bwd (csrc/attn_bwd_ops.cpp). FlashAttention-2's
// backward, deterministic (no atomics), on the primitives of primitives.cuh only, so the same source
// runs on a GPU (nvcc) and on the CPU emulator (FASTATTN_EMULATE).
//
// Design note
// -----------
// Math (per query head h, kv head h / (Hq / Hkv); P recomputed from the saved lse, never stored):
//         S = scale·QKᵀ (+ mask), P = exp(S − lse) (0 where masked or lse = −inf), delta = rowsum(dO∘O),
//         dV = (P∘Z)ᵀ dO, dP = (dO Vᵀ)∘Z, dS = P∘(dP − delta), dQ = scale·dS K, dK = scale·dSᵀ Q, with
//         Z = keep / (1 − p) under dropout (1 without), as the Triton backward.
// Work:   FLOPs reported as 2.5× forward = 10·B·Hq·Lq·Lk·D (the 5 matmuls of a one-pass backward),
//         halved by causal tile skipping. This schedule executes 7 (QKᵀ and dO Vᵀ in both passes):
//         1.4× the reported count, the price of a deterministic dQ without atomics. D = 256 adds no matmul
//         FLOPs (the head-dim split below splits the reductions, it does not repeat them); what it repeats
//         is the elementwise part: both warps of a pair form the same P and dS (exp2, band and mask
//         tests) for their 16 x kSub sub-tile, 2x the SFU work and the PARTIAL tiles' mask reads (L1).
// Bytes:  minimum: read Q, K, V, O, dO, lse once, write dQ, dK, dV, delta:
//         2·(4·B·Hq·Lq·D + 4·B·Hkv·Lk·D) + 12·B·Hq·Lq (+ the mask's PARTIAL tiles, read in both passes).
//         The dK/dV pass re-reads Q/dO Lk/64 times and the dQ pass K/V Lq/64 times, from L2 mostly
//         (Lk/32 and Lq/32 times at D = 256, whose blocks hold 32 keys / 32 query rows).
// Bound:  per streamed tile byte each block does ~96 (dQ) or ~128 (dK/dV) FLOPs from L2 (D = 256: ~48 /
//         ~64, half, from the smaller blocks); against HBM the intensity is ~L FLOPs/byte, far above the
//         A100/H100 ridge (~150/~300): tensor-core bound for L >= a few hundred, with exp2 on the SFU
//         second; at D = 256 L2 bandwidth may come close to bounding it too (not measured). The preprocess
//         is memory bound (reads O and dO once, 2·D bytes per 2·D FLOPs). Target: >= 0.9× torch SDPA's
//         flash backward at L >= 2048; not measured (no GPU here), and this first version has no cp.async
//         double buffer: each streamed tile's load is exposed (the next step: prefetch tile i+1 while
//         computing i).
// Grids:  preprocess (Lq/64, Hq, B); dK/dV (Lk/64, Hkv, B): 128 threads, warp w owns keys 16w..16w+15
//         of the resident key tile and accumulates their dK, dV rows in registers while the query tiles
//         (32 rows) of every query head of the GQA group stream past, heads in increasing order: the
//         group's reduction happens in registers in a fixed order, deterministic, K/V loaded once.
//         dQ (Lq/64, Hq, B), heaviest (causal) query tiles first: warp w owns query rows 16w..16w+15
//         and accumulates their dQ while the key tiles (64 keys) stream past.
// Packed: (params.layout) each grid covers the longest sequence's tiles x B sequences; every block reads its
//         sequence's rows, lengths and bottom-right q_offset from seq_info (attn_common.cuh) and leaves past its
//         own query (preprocess, dQ) or key (dK/dV) rows; a sequence without queries still writes dK = dV = 0.
// D = 256: one warp's dK + dV rows over all of D would be 2·(256/8)·4 = 256 fp32 registers (and dQ's
//         128 left no room: 255 and spills in a first try), so both passes split the head dim between
//         warp pairs (Tile::kSplit = 2): warp w owns 16 keys (dK/dV) or query rows (dQ) 16·(w % 2) and
//         columns 128·(w / 2); blocks hold 32 keys, grid (Lk/32, Hkv, B), or 32 query rows, grid
//         (Lq/32, Hq, B). Per sub-tile each warp computes its half of the S (Sᵀ) and dP (dPᵀ) reductions
//         (columns 128·(w / 2)..+127), the pair exchanges them through shared memory (sum_halves: write,
//         __syncthreads, add the partner's, __syncthreads; a + b = b + a exactly, so both hold bit-identical
//         S and dP), both form P and dS, and each accumulates dK, dV (or dQ) for its 128 columns: 128 (or
//         64) accumulator registers, the D = 128 (D = 64) footprint. The dQ pass streams each 64-key tile
//         in two halves of 32 (shared memory); the TileSummaries stay (64, 64) and (32, 64): a 32-key or
//         32-row block walks its 64-wide tile's list (a superset: FULL stays FULL, a half that is EMPTY
//         inside a non-empty tile is computed with P = 0; the analytic band is exact per block).
// Registers per thread (fp32 accumulators): dK/dV pass dK + dV 2·(D/kSplit/8)·4, Sᵀ and dPᵀ (16 keys ×
//         kSub queries) 2·kSub/2; dQ pass dQ (D/kSplit/8)·4, S and dP (16 rows × kSub keys) 2·kSub/2. kSub
//         is the whole tile (32 queries / 64 keys) for D <= 64; for D >= 96 16 queries (dK/dV), and 32
//         keys at D = 96, 16 at D >= 128 (dQ). The dK/dV pass runs its sub-tiles one at a time (not unrolled: two in
//         flight spilled at D = 128, 255 registers and 28 / 8 spill-store bytes on sm_80 / sm_90), and so
//         does the dQ pass at D = 256. All A/B operands come from shared memory by ldmatrix (keeping K/V
//         or Q/dO fragments in registers would spill at D = 128). The dQ kernel takes a minimum of 1 block
//         (ptxas's default capped it at 168 registers and spilled at D = 32 / 96 / 128 once the dropout path
//         and the per-sub-tile K/V loads were in), and its key sub-tile is 16 at D >= 128 (32 spilled
//         16 bytes on sm_90 at D = 128).
//         ptxas (CUDA 13.0, -O3), registers per thread (fp16 = bf16) with the dropout path (a runtime
//         branch: every launch pays its registers) and packed sequences (a runtime branch too), plain / kMod
//         (dQ+dS: the dS-writing instantiation, below); no spills but dK/dV at D = 256 on sm_90 (48 / 40 B,
//         mk/known-spills.json, issue 19):
//             D                  32         64         96        128        256
//             dK/dV  sm_80    166/168    244/216    226/236    254/254    246/246
//             dK/dV  sm_90    162/172    238/226    226/238    254/254    255/255
//             dQ     sm_80    211/218    242/246    255/250    234/240    218/222
//             dQ     sm_90    212/218    244/248    255/244    242/252    225/229
//             dQ+dS  sm_80    220/232    227/224    249/250    244/244    224/225
//             dQ+dS  sm_90    217/232    233/226    249/246    252/255    232/231
//         preprocess: 32-64. Every dK/dV and dQ variant has HMMA, LDSM and LDGSTS in its SASS. dK/dV at
//         D = 256 draws its keep bits after the pair's exchange (Dropout, below): drawn before the matmuls,
//         as at D <= 128, it took 255 registers and spilled 8 + 8 bytes on sm_80 (255, none, on sm_90);
//         drawn once per query tile for both sub-tiles, 255 and 16 + 16 (sm_90 251); before the dropout
//         path, 247. Before dropout and D = 256: dK/dV sm_80 99 / 222 /
//         242 / 255 (28), sm_90 126 / 218 / 248 / 255 (8); dQ sm_80 134 / 178 / 168 / 254, sm_90 140 / 186
//         / 179 / 180. No headroom is left in dK/dV at D >= 128 and dQ at D = 96: whatever adds live state
//         where P is formed must be re-checked here (ci_check).
// dmask:  with a float mask that needs its gradient (need_mask_grad, a learned bias), dmask = dS, the
//         gradient of the scores after scaling, (B, Hq, Lq, Lk) contiguous in the mask's dtype. The dQ pass
//         already holds dS per (row, key) in fp32: the attn_bwd_dq_kernel<T, D, true> instantiation stores
//         it element by element (0 where a pair is masked: P = 0; at D = 256 only the pair's column-0 warp
//         stores), then writes zeros over the key tiles it skips (the summary's EMPTY tiles, listed after
//         the non-empty ones, or the tiles outside the band), so every element is written exactly once.
//         Extra cost: B·Hq·Lq·Lk·sizeof(mask) bytes written, no extra FLOPs; the dtype-templated store is
//         uncoalesced (2 adjacent keys per lane), acceptable for a path that materialises Lq×Lk anyway.
//         The <T, D, false> kernel is separate (dQ in the table). The dS-writing variant: min 1 block; key
//         sub-tiles 64 / 32 / 32 / 16 / 16 (same accumulation order, so dQ is bit-identical).
// Shared: rows padded by 8 elements (conflict-free ldmatrix, as the forward). dK/dV pass: K, V
//         [kKeys][D+8], Q, dO [32][D+8], 16-bit, plus lse·log2e and delta [32] fp32 and, at D = 256, the
//         exchange (4 warps x 2 x 16 x 16 fp32 = 8192): (2·64 + 2·32)·(D+8)·2 + 256 = 15616 / 27904 /
//         40192 / 52480 bytes for D = 32 / 64 / 96 / 128, (2·32 + 2·32)·264·2 + 256 + 8192 = 76032 for
//         D = 256. dQ pass: Q, dO [kRows][D+8], K, V [64 or 32][D+8]: 20480 / 36864 / 53248 / 69632 bytes,
//         and 4·32·264·2 + 8192 = 75776 at D = 256 (above 48 KiB the launcher opts in; every variant is
//         under sm_80's 163 KiB, static_assert). At D = 256 two blocks fit an A100 SM (164 KiB) in shared
//         memory and registers (2 x 128 x 255 < 64 K): 8 warps per SM, as at D = 128.
// Operands (mma.m16n8k16, fragments as in the forward): Sᵀ = K Qᵀ and dPᵀ = V dOᵀ take K/V rows as the
//         A operand (ldmatrix.x4) and Q/dO rows as the "col" B operand (ldmatrix.x4, not transposed);
//         dV += Pᵀ dO and dK += dSᵀ Q take Pᵀ/dSᵀ packed to the input dtype from the accumulators (their
//         layout is already the A fragment's) and dO/Q through ldmatrix.x4.trans. The dQ pass is the
//         forward's S = Q Kᵀ (and dP = dO Vᵀ), then dQ += dS K with K through ldmatrix.x4.trans.
// Masks:  as the forward: the band (causal, window, q_offset) analytically, tiles outside never
//         visited and tiles fully inside skip the band arithmetic; with a mask tensor, the TileSummary's
//         non-empty tiles (the dK/dV pass walks the transposed lists) and the mask read only in PARTIAL
//         tiles. Key rows past Lk are masked; query rows past Lq have lse·log2e = +inf (P = 0) and
//         delta 0. A row that attends nothing has lse = −inf, also mapped to +inf: P = 0, zero gradients.
// Dropout: both passes regenerate the forward's keep-mask from its philox tensor (cuda/dropout.cuh, the
//         Triton contract; nothing stored): each lane draws the keep bits of its elements into one 32-bit
//         word before the matmuls that produce S and dP (few registers live then), in a rolled loop, one
//         Philox per score, per query sub-tile in the dK/dV pass and per key tile in the dQ pass (the
//         placements that spilled least), and applies Z where P is formed (a select, like tl.where). At
//         D = 256 the dK/dV pass draws them after the pair's exchange of S and dP instead (kLateBits: of the
//         placements tried the only one without a spill on sm_80; same bits, same arithmetic: bit-identical).
//         The dmask path (dS) includes it. delta = rowsum(dO∘O) needs nothing: O already holds dropout.
//         A runtime branch, uniform per launch; its registers are in the tables above.
#include "attn_common.cuh"
#include "attn_bwd_params.h"
#include "attn_params.h"
#include "dropout.cuh"
#include "params.h"
#include "primitives.cuh"

namespace fastattn {
namespace attn_bwd {

using attn_common::apply_mask_value;
using attn_common::load_rows;

constexpr int kThreads = attn_common::kThreads;
using attn_common::kLog2e;
constexpr int kFull = 2;  // TileSummary state FULL (fastattn.masks); EMPTY tiles are never listed

template <int D>
struct Tile {
    static constexpr int kLd = attn_common::padded_ld<D>();  // padded shared row, elements
    // dK/dV pass: the head dim is split between kSplit warps (2 at D = 256, where one warp's dK + dV rows
    // over all of D would take 256 fp32 registers): warp w owns keys 16·(w % (4 / kSplit)) and columns
    // kDw·(w / (4 / kSplit)) of the block's kKeysKv resident keys (64, or 32 at D = 256).
    static constexpr int kSplit = D > 128 ? 2 : 1;
    static constexpr int kDw = D / kSplit;
    static constexpr int kKeysKv = kBlockN / kSplit;
    // dQ pass, split likewise: warp w owns query rows 16·(w % (4 / kSplit)) and the same columns of the
    // block's kRowsDq rows (64, or 32 at D = 256); K/V rows resident at a time: the 64-key tile, in halves
    // at D = 256 (shared memory).
    static constexpr int kRowsDq = kBlockMdq / kSplit;
    static constexpr int kKeysDq = D > 128 ? kBlockN / 2 : kBlockN;
    static constexpr int kKVElems = kKeysKv * kLd;
    static constexpr int kKVdqElems = kKeysDq * kLd;
    static constexpr int kQkvElems = kBlockMkv * kLd;
    static constexpr int kQdqElems = kRowsDq * kLd;
    // Sub-tiles over which S and dP are live (16 x kSub fp32 per warp): halved at D >= 96, where the
    // dK + dV (or dQ) accumulators already take most registers, and again for dQ at D = 256.
    static constexpr int kSubKv = D >= 96 ? 16 : kBlockMkv;
    static constexpr int kSubDq = D >= 128 ? 16 : D >= 96 ? 32 : kBlockN;
    // The dS-writing dQ instantiation's sub-tile: narrower (its row addresses take registers).
    static constexpr int kSubDqDs = D < 64 ? kSubDq : (D >= 128 ? 16 : 32);
    // With kSplit = 2 the two warps of a key (or row) group exchange their partial S and dP: 2 x 16 x sub
    // fp32 per warp, in lane order.
    static constexpr int kXchgKv = kSplit > 1 ? 4 * 32 * 2 * (kSubKv / 8 * 4) : 0;
    static constexpr int kXchgDq = kSplit > 1 ? 4 * 32 * 2 * ((kSubDq > kSubDqDs ? kSubDq : kSubDqDs) / 8 * 4) : 0;
    static constexpr int kDkdvSmem = (2 * kKVElems + 2 * kQkvElems) * 2 + 2 * kBlockMkv * 4 + kXchgKv * 4;
    static constexpr int kDqSmem = (2 * kQdqElems + 2 * kKVdqElems) * 2 + kXchgDq * 4;
    static_assert(kDkdvSmem <= 163 * 1024 && kDqSmem <= 163 * 1024, "sm_80's opt-in shared memory limit");
    // ptxas's default (no minimum) caps the dK/dV kernel at 168 registers for D = 64 and spills there, and at
    // 128 for D = 32 (spilling since the variants); a minimum of 1 block lets it take what it needs (0 = no
    // minimum: D = 128 and 256 fit).
    static constexpr int kDkdvMinBlocks = D <= 96 ? 1 : 0;
    static_assert(D % 32 == 0, "QKᵀ consumes D in steps of 32 (two m16n8k16 per ldmatrix.x4)");
};

// lse (natural log) -> the exp2 domain; -inf (a row that attends nothing) -> +inf, so P = exp2(x - it) = 0.
FA_DEVICE float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// x∘Z with Z = keep / (1 - p): the forward's scaled keep-mask (a select, as the Triton backward's tl.where).
FA_DEVICE float dropped(float x, bool kept, float scale) { return kept ? x * scale : 0.f; }

// dmask[off] = x in the float mask's dtype (rounded to nearest even).
FA_DEVICE void store_mask_grad(MaskElem elem, void* dmask, int64_t off, float x) {
    switch (elem) {
        case MaskElem::f32: static_cast<float*>(dmask)[off] = x; break;
        case MaskElem::f16: static_cast<uint16_t*>(dmask)[off] = uint16_t(fa::pack2<fa::half_t>(x, 0.f)); break;
        case MaskElem::bf16: static_cast<uint16_t*>(dmask)[off] = uint16_t(fa::pack2<fa::bf16_t>(x, 0.f)); break;
        case MaskElem::f64: static_cast<double*>(dmask)[off] = double(x); break;
        default: break;
    }
}

// Zeros over the in-bounds part of the dmask tile (rows q0.., keys k0..) that the dQ pass skips: the
// block's 128 threads sweep it row by row.
template <int kBM>
FA_DEVICE void zero_mask_grad_tile(const AttnBwdParams& p, int64_t dmask_bh, int q0, int k0, int tid) {
    for (int e = tid; e < kBM * kBlockN; e += kThreads) {
        const int i = q0 + e / kBlockN, j = k0 + e % kBlockN;
        if (i < p.seqlen_q && j < p.seqlen_k)
            store_mask_grad(p.mask_elem, p.dmask, dmask_bh + int64_t(i) * p.seqlen_k + j, 0.f);
    }
}

// acc[N/8][4] (+)= A Bᵀ for 16 rows of A (shared, row stride kLd, at a_rows) and N rows of B (shared, at
// b_rows), over K columns (all of D, or the warp's kDw from the pointers on): the forward's S = Q Kᵀ,
// with both operands read by ldmatrix.x4 in steps of 32 columns.
template <class T, int D, int N, int K = D>
FA_DEVICE void mma_abt(float (&acc)[N / 8][4], const T* a_rows, const T* b_rows, int lane) {
    constexpr int kLd = Tile<D>::kLd;
#pragma unroll
    for (int ni = 0; ni < N / 8; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[ni][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk += 2) {
        uint32_t a0[4], a1[4];
        const T* arow = a_rows + (lane % 16) * kLd + (lane / 16) * 8;
        fa::ldmatrix_x4(a0, arow + kk * 16);
        fa::ldmatrix_x4(a1, arow + kk * 16 + 16);
#pragma unroll
        for (int ni = 0; ni < N / 8; ++ni) {
            // Matrices: B rows 8ni..8ni+7 at columns 16kk, +8, +16, +24: a B row is a "col" column.
            uint32_t bb[4];
            fa::ldmatrix_x4(bb, b_rows + (ni * 8 + lane % 8) * kLd + kk * 16 + (lane / 8) * 8);
            const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
            fa::mma_m16n8k16<T>(acc[ni], a0, b0, acc[ni]);
            fa::mma_m16n8k16<T>(acc[ni], a1, b1, acc[ni]);
        }
    }
}

// acc[W/8][4] += X B for X (16 x M, fp32 accumulators x[M/8][4], packed to T: their layout is the A
// fragment's) and B (M rows x W columns from b_rows on, shared, row stride kLd) through ldmatrix.x4.trans:
// the forward's P V (W = D, or the warp's kDw columns).
template <class T, int D, int M, int W = D>
FA_DEVICE void mma_xb(float (&acc)[W / 8][4], const float (&x)[M / 8][4], const T* b_rows, int lane) {
    constexpr int kLd = Tile<D>::kLd;
#pragma unroll
    for (int kk = 0; kk < M / 16; ++kk) {
        const uint32_t pa[4] = {fa::pack2<T>(x[2 * kk][0], x[2 * kk][1]), fa::pack2<T>(x[2 * kk][2], x[2 * kk][3]),
                                fa::pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                                fa::pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
        for (int dn = 0; dn < W / 8; dn += 2) {
            // Matrices: rows 16kk+0..7 and +8..15 at columns 8dn, then the same at 8dn + 8.
            uint32_t vb[4];
            fa::ldmatrix_x4<true>(vb, b_rows + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + dn * 8 +
                                          (lane / 16) * 8);
            const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
            fa::mma_m16n8k16<T>(acc[dn], pa, b0, acc[dn]);
            fa::mma_m16n8k16<T>(acc[dn + 1], pa, b1, acc[dn + 1]);
        }
    }
}

// Scale a warp's 16 x W accumulator (W = D, or the warp's kDw columns: stage and dst point at its first),
// pack it to T in its own 16 rows of shared memory (`stage`, which no other warp reads), then store the
// rows below `valid` with 16-byte coalesced writes.
template <class T, int D, int W = D>
FA_DEVICE void store_rows(float (&acc)[W / 8][4], float scale, T* stage, T* dst, int64_t ld_g, int row0, int valid,
                          int lane) {
    constexpr int kLd = Tile<D>::kLd, kChunks = W / 8;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int dn = 0; dn < W / 8; ++dn)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            *reinterpret_cast<uint32_t*>(stage + (g + 8 * r) * kLd + dn * 8 + 2 * t) =
                fa::pack2<T>(acc[dn][2 * r] * scale, acc[dn][2 * r + 1] * scale);
    __syncwarp();
#pragma unroll
    for (int c = lane; c < 16 * kChunks; c += 32) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        if (row0 + r < valid)
            *reinterpret_cast<uint4*>(dst + int64_t(row0 + r) * ld_g + col) =
                *reinterpret_cast<const uint4*>(stage + r * kLd + col);
    }
}

// kSplit = 2: this warp holds Sᵀ and dPᵀ over its half of D, warp ^ 2 (same keys, other half) the rest.
// Both write theirs to sX in lane order (conflict-free), then add the other's: a + b = b + a exactly, so
// the two warps hold bit-identical Sᵀ and dPᵀ over all of D. The second barrier keeps the next sub-tile
// from overwriting sX before the partner has read it.
template <int N>
FA_DEVICE void sum_halves(float (&s)[N / 8][4], float (&dp)[N / 8][4], float* sX, int warp, int lane) {
    constexpr int kPer = N / 8 * 4;  // floats per lane per matrix
    float* mine = sX + warp * 2 * kPer * 32;
    const float* theirs = sX + (warp ^ 2) * 2 * kPer * 32;
#pragma unroll
    for (int ni = 0; ni < N / 8; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            mine[(ni * 4 + e) * 32 + lane] = s[ni][e];
            mine[(kPer + ni * 4 + e) * 32 + lane] = dp[ni][e];
        }
    __syncthreads();
#pragma unroll
    for (int ni = 0; ni < N / 8; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[ni][e] += theirs[(ni * 4 + e) * 32 + lane];
            dp[ni][e] += theirs[(kPer + ni * 4 + e) * 32 + lane];
        }
    __syncthreads();
}

// delta[b, h, i] = sum_d dO[i, d] · O[i, d] in fp32: warp w reduces rows 16w..16w+15 of the 64-row tile,
// lanes over D, then a fixed shuffle tree (deterministic).
template <class T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_preprocess_kernel(const AttnBwdParams p) {
    const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
    const int h = int(blockIdx.y), b = int(blockIdx.z);
    const attn_common::SeqInfo seq = attn_common::seq_info(p.layout, b, p.seqlen_q, p.seqlen_k, 0);
    const T* og = static_cast<const T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + seq.q_start * p.out_stride[2];
    const T* dg =
        static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + seq.q_start * p.dout_stride[2];
    float* delta = p.delta + b * p.lse_stride[0] + h * p.lse_stride[1] + seq.q_start;
    for (int r = 0; r < 16; ++r) {
        const int i = int(blockIdx.x) * 64 + warp * 16 + r;
        if (i >= seq.len_q) break;  // warp-uniform
        float acc = 0.f;
#pragma unroll
        for (int c = lane; c < D; c += 32)
            acc += fa::to_float(og[int64_t(i) * p.out_stride[2] + c]) * fa::to_float(dg[int64_t(i) * p.dout_stride[2] + c]);
#pragma unroll
        for (int off = 16; off > 0; off /= 2) acc += fa::shfl_xor(acc, off);
        if (lane == 0) delta[i] = acc;
    }
}

// kMod: a softcap, ALiBi or chunk (a separate instantiation: the plain kernel's registers are untouched); the
// band is runtime.
template <class T, int D, bool kMod>
__global__ void __launch_bounds__(kThreads, Tile<D>::kDkdvMinBlocks) attn_bwd_dkdv_kernel(const AttnBwdParams p) {
    using Cfg = Tile<D>;
    constexpr int kLd = Cfg::kLd, kBM = kBlockMkv, kSub = Cfg::kSubKv;
    constexpr int kKeys = Cfg::kKeysKv, kDw = Cfg::kDw, kKeyWarps = 4 / Cfg::kSplit;
    constexpr bool kLateBits = Cfg::kSplit > 1;  // dropout's keep bits drawn after S and dP (D = 256), else before
    FA_DYNAMIC_SMEM(T, smem);
    T* sK = smem;                        // [kKeys][kLd]
    T* sV = sK + Cfg::kKVElems;          // [kKeys][kLd]
    T* sQ = sV + Cfg::kKVElems;          // [32][kLd]
    T* sdO = sQ + Cfg::kQkvElems;        // [32][kLd]
    float* sL = reinterpret_cast<float*>(sdO + Cfg::kQkvElems);  // [32] lse·log2e
    float* sD = sL + kBM;                                        // [32] delta
    float* sX = sD + kBM;                                        // [kXchgKv] (kSplit = 2)

    const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
    const int g = lane / 4, t = lane % 4;
    // This warp's 16 keys (kw) and its columns c0..c0+kDw-1 of dK, dV (all of D unless kSplit = 2).
    const int kw = Cfg::kSplit > 1 ? warp % kKeyWarps : warp, c0 = Cfg::kSplit > 1 ? (warp / kKeyWarps) * kDw : 0;
    const int hk = int(blockIdx.y), b = int(blockIdx.z);
    const int group = p.heads_q / p.heads_kv;
    const int k0 = int(blockIdx.x) * kKeys;
    // This block's sequence (attn_common.cuh); the grid covers the longest sequence's key tiles, a block past this
    // one's keys has nothing to write (packed sequences only, block-uniform).
    const attn_common::SeqInfo seq = attn_common::seq_info(p.layout, b, p.seqlen_q, p.seqlen_k, p.variant.q_offset);
    if (k0 >= seq.len_k) return;
    const int len_q = seq.len_q, len_k = seq.len_k;
    const int n_tile = k0 / kBlockN;  // the summary's key tile (64 keys: a superset of this block's)
    const int k_last = min(k0 + kKeys, len_k) - 1;
    const int n_q_tiles = (p.seqlen_q + kBM - 1) / kBM;      // the summaries' (dense batches only)
    const int n_k_tiles = (p.seqlen_k + kBlockN - 1) / kBlockN;
    // kMod also covers a chunk here: the plain instantiation folds the chunk's code away (at D = 256 its registers
    // spilled).
    rules::Variant var = kMod ? p.variant : rules::band_only(p.variant);
    var.q_offset = seq.q_offset;
    const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + seq.k_start * p.k_stride[2];
    const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + seq.k_start * p.v_stride[2];
    load_rows<T, D, kKeys>(sK, kg, p.k_stride[2], k0, len_k, tid);
    load_rows<T, D, kKeys>(sV, vg, p.v_stride[2], k0, len_k, tid);
    fa::cp_async_commit();

    float dk[kDw / 8][4], dv[kDw / 8][4];
#pragma unroll
    for (int dn = 0; dn < kDw / 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[dn][e] = 0.f, dv[dn][e] = 0.f;
    const float scale_log2 = p.scale * kLog2e;
    const bool tail = k0 + kKeys > len_k;
    const bool dropout = p.dropout.philox != nullptr;

    for (int hh = 0; hh < group; ++hh) {
        const int h = hk * group + hh;
        // Which query tiles see this key tile: the transposed summary's list, or the band's range.
        int n_iter = 0, tile_lo = 0;
        const int32_t* index = nullptr;
        const int8_t* state = nullptr;
        if (p.q_count != nullptr) {
            const int bs = p.summary_batch > 1 ? b : 0, hs = p.summary_heads > 1 ? h : 0;
            const int64_t row = (int64_t(bs) * p.summary_heads + hs) * n_k_tiles + n_tile;
            n_iter = p.q_count[row];
            index = p.q_index + row * n_q_tiles;
            state = p.q_state + row * n_q_tiles;
        } else {
            // The rows that see some key of this tile (band and chunk).
            const rules::TileBounds32 tb = rules::narrow(rules::key_tile(var, k0, k_last, len_q), len_q);
            if (tb.lo <= tb.hi && len_q > 0) {  // a sequence without queries: dK = dV = 0
                tile_lo = tb.lo / kBM;
                n_iter = tb.hi / kBM - tile_lo + 1;
            }
        }
        const T* qg =
            static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + seq.q_start * p.q_stride[2];
        const T* dog =
            static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + seq.q_start * p.dout_stride[2];
        const int64_t bh = int64_t(b) * p.heads_q + h;  // the dropout contract's (batch, head) row
        const int64_t lse_row = b * p.lse_stride[0] + h * p.lse_stride[1] + seq.q_start;
        const int64_t mask_bh = b * p.mask_stride[0] + h * p.mask_stride[1];
        const rules::ScoreScale sc = rules::score_scale(p.scale, var, kLog2e);
        const float slope2 = kMod ? rules::alibi_slope(var, b, h, kLog2e) : 0.f;

        for (int it = 0; it < n_iter; ++it) {
            const int mt = index ? index[it] : tile_lo + it;
            const int q0 = mt * kBM;
            __syncthreads();  // everyone is done with the previous query tile
            load_rows<T, D, kBM>(sQ, qg, p.q_stride[2], q0, len_q, tid);
            load_rows<T, D, kBM>(sdO, dog, p.dout_stride[2], q0, len_q, tid);
            fa::cp_async_commit();
            if (tid < kBM) {
                const int i = q0 + tid;
                sL[tid] = i < len_q ? lse_log2(p.lse[lse_row + i]) : INFINITY;
                sD[tid] = i < len_q ? p.delta[lse_row + i] : 0.f;
            }
            fa::cp_async_wait<0>();
            __syncthreads();

            bool partial;
            if (state != nullptr) {
                partial = state[mt] != kFull;
            } else {
                // Per query tile, from the rules (held across the loop, the bounds spilled at D = 256).
                partial = !rules::tile_full(var, q0, min(q0 + kBM, len_q) - 1, k0, k_last, len_k);
            }
            // In sub-tiles of kSub queries (fewer live fp32 registers at large D). Sᵀ = K Qᵀ and dPᵀ = V dOᵀ:
            // 16 keys x kSub queries per warp; lane (g, t) holds [ni][e] at key k0 + 16kw + g + 8(e/2),
            // query q0 + sub + 8ni + 2t + e%2. Not unrolled: two sub-tiles in flight spilled at D = 128 (design note).
#pragma unroll 1
            for (int sub = 0; sub < kBM; sub += kSub) {
                // Dropout: the keep bits of these Sᵀ elements (rows keys, columns queries), per sub-tile (per query
                // tile, ptxas spills more at D = 128 on sm_90), drawn before S is live; at D = 256 after the pair's
                // exchange instead (drawn before, the word stays live across the matmuls and sm_80 spilled).
                uint32_t bits = 0u;
                if (dropout && !kLateBits)
                    bits = dropout::keep_bits<kSub, true>(p.dropout, p.seqlen_q, p.seqlen_k, bh, k0 + kw * 16, q0 + sub,
                                                          lane);
                float s[kSub / 8][4], dp[kSub / 8][4];
                mma_abt<T, D, kSub, kDw>(s, sK + kw * 16 * kLd + c0, sQ + sub * kLd + c0, lane);
                mma_abt<T, D, kSub, kDw>(dp, sV + kw * 16 * kLd + c0, sdO + sub * kLd + c0, lane);
                if (Cfg::kSplit > 1) sum_halves<kSub>(s, dp, sX, warp, lane);
                if (dropout && kLateBits)
                    bits = dropout::keep_bits<kSub, true>(p.dropout, p.seqlen_q, p.seqlen_k, bh, k0 + kw * 16, q0 + sub,
                                                          lane);
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int j = k0 + kw * 16 + g + 8 * r;
#pragma unroll
                    for (int ni = 0; ni < kSub / 8; ++ni)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int iq = sub + ni * 8 + 2 * t + c, i = q0 + iq;
                            float x, th = 0.f;
                            if constexpr (kMod) {
                                x = rules::scaled_score(s[ni][2 * r + c], sc, th) +
                                    rules::alibi_bias(slope2, int64_t(i) + var.q_offset, j);
                            } else {
                                x = s[ni][2 * r + c] * scale_log2;
                            }
                            bool keep = true;
                            if (partial || tail) {
                                keep = j < len_k;
                                if (partial) {
                                    // Band and chunk, per element (held per key, the bounds spilled at D = 256).
                                    keep = keep && rules::allowed(var, int64_t(i) + var.q_offset, j);
                                    if (keep && p.mask != nullptr && i < len_q)
                                        keep = apply_mask_value(p.mask_elem, p.mask,
                                                                mask_bh + int64_t(i) * p.mask_stride[2] +
                                                                    int64_t(j) * p.mask_stride[3],
                                                                x);
                                }
                            }
                            const float prob = keep ? exp2f(x - sL[iq]) : 0.f;
                            float dpz = dp[ni][2 * r + c], pz = prob;
                            if (dropout) {  // dV takes P∘Z, dS = P∘(dP∘Z − delta)
                                const bool kept = dropout::kept(bits, ni, 2 * r + c);
                                pz = dropped(prob, kept, p.dropout.scale);
                                dpz = dropped(dpz, kept, p.dropout.scale);
                            }
                            s[ni][2 * r + c] = pz;
                            const float ds = prob * (dpz - sD[iq]);
                            // The gradient before scaled_score (attn_rules.h; the softcap's 1 - tanh²).
                            dp[ni][2 * r + c] = kMod ? rules::score_grad(ds, th, sc) : ds;
                        }
                }
                // dV += Pᵀ dO, dK += dSᵀ Q (scaled at the end), over this warp's columns.
                mma_xb<T, D, kSub, kDw>(dv, s, sdO + sub * kLd + c0, lane);
                mma_xb<T, D, kSub, kDw>(dk, dp, sQ + sub * kLd + c0, lane);
            }
        }
    }

    // Stage each warp's own 16 key rows x kDw columns in sK / sV (the warp's A-operand block, which no
    // other warp stages), after every pending copy (none if no query tile was visited but K/V's) has
    // landed everywhere and every warp is done reading K/V.
    fa::cp_async_wait<0>();
    __syncthreads();
    const int row0 = k0 + kw * 16;
    store_rows<T, D, kDw>(
        dk, p.scale, sK + kw * 16 * kLd + c0,
        static_cast<T*>(p.dk) + b * p.dk_stride[0] + hk * p.dk_stride[1] + seq.k_start * p.dk_stride[2] + c0,
        p.dk_stride[2], row0, len_k, lane);
    store_rows<T, D, kDw>(
        dv, 1.f, sV + kw * 16 * kLd + c0,
        static_cast<T*>(p.dv) + b * p.dv_stride[0] + hk * p.dv_stride[1] + seq.k_start * p.dv_stride[2] + c0,
        p.dv_stride[2], row0, len_k, lane);
}

// kDs: also write dS (the float mask's gradient) for every (row, key) of this query tile, zeros where the
// tile is skipped; a separate instantiation, so the plain kernel's registers are untouched. Writing dS
// costs registers (its row addresses): a minimum of 1 block lifts ptxas's default cap (168 at D = 64 and
// 96, where it spilled), and narrower sub-tiles (32 keys at D = 64, 16 at D >= 128) keep it under 255
// without spills (same accumulation order, so dQ is bit-identical to the plain kernel's). At D = 256 the
// plain kernel takes the minimum of 1 block too (the default capped it at 168 on sm_90, spilling).
template <class T, int D, bool kDs, bool kMod>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dq_kernel(const AttnBwdParams p) {
    using Cfg = Tile<D>;
    constexpr int kLd = Cfg::kLd, kBM = Cfg::kRowsDq, kKeys = Cfg::kKeysDq, kSub = kDs ? Cfg::kSubDqDs : Cfg::kSubDq;
    constexpr int kDw = Cfg::kDw, kRowWarps = 4 / Cfg::kSplit, kSubUnroll = Cfg::kSplit > 1 ? 1 : kBlockN / kSub;
    FA_DYNAMIC_SMEM(T, smem);
    T* sQ = smem;                   // [kBM][kLd]
    T* sdO = sQ + Cfg::kQdqElems;   // [kBM][kLd]
    T* sK = sdO + Cfg::kQdqElems;   // [kKeys][kLd]
    T* sV = sK + Cfg::kKVdqElems;   // [kKeys][kLd]
    float* sX = reinterpret_cast<float*>(sV + Cfg::kKVdqElems);  // [kXchgDq] (kSplit = 2)

    const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
    const int g = lane / 4, t = lane % 4;
    // This warp's 16 query rows (rw) and its columns c0..c0+kDw-1 of dQ (all of D unless kSplit = 2).
    const int rw = Cfg::kSplit > 1 ? warp % kRowWarps : warp, c0 = Cfg::kSplit > 1 ? (warp / kRowWarps) * kDw : 0;
    const int m_tile = int(gridDim.x) - 1 - int(blockIdx.x);  // heaviest (causal) tiles first
    const int h = int(blockIdx.y), b = int(blockIdx.z);
    const int hk = h / (p.heads_q / p.heads_kv);
    const int q0 = m_tile * kBM;
    // This block's sequence (attn_common.cuh); a block past its query rows exits (packed only, block-uniform). The
    // prologue's values die with it: the loop and the epilogue read what they need again (seq_info<true>; the
    // dS-writing instantiation spilled at D = 128 holding them).
    const attn_common::SeqInfo seq = attn_common::seq_info(p.layout, b, p.seqlen_q, p.seqlen_k, p.variant.q_offset);
    if (q0 >= seq.len_q) return;
    const int len_q = seq.len_q, len_k = seq.len_k;
    rules::Variant var_seq = p.variant;
    var_seq.q_offset = seq.q_offset;
    const rules::Variant& var = p.variant;  // q_offset: the sequence's (seq), never var's
    const int n_k_tiles = (p.seqlen_k + kBlockN - 1) / kBlockN;  // the summary's (dense batches only)
    const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + seq.q_start * p.q_stride[2];
    const T* dog =
        static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + seq.q_start * p.dout_stride[2];
    const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + seq.k_start * p.k_stride[2];
    const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + seq.k_start * p.v_stride[2];
    const int64_t bh = int64_t(b) * p.heads_q + h;  // the dropout contract's (batch, head) row
    const int64_t lse_row = b * p.lse_stride[0] + h * p.lse_stride[1] + seq.q_start;
    const int64_t mask_bh = b * p.mask_stride[0] + h * p.mask_stride[1];
    const int64_t dmask_bh = bh * p.seqlen_q * p.seqlen_k;  // dmask: contiguous (B, Hq, Lq, Lk)
    // This query tile's keys and the keys all its rows attend (band and chunk), and each of this thread's two rows'
    // keys, computed once: the loop over key tiles then does no division.
    const rules::TileBounds32 tb =
        rules::narrow(rules::row_tile(var_seq, q0, min(q0 + kBM, len_q) - 1, len_k), len_k);
    int row_lo[2], row_hi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int64_t lo, hi;
        rules::row_bounds(var, int64_t(q0 + rw * 16 + g + 8 * r) + seq.q_offset, len_k, lo, hi);
        row_lo[r] = rules::clamp_index(lo, len_k);
        row_hi[r] = rules::clamp_index(hi, len_k);
    }

    int n_iter = 0, tile_lo = 0;
    const int32_t* index = nullptr;
    const int8_t* state = nullptr;
    if (p.kv_count != nullptr) {
        // The summary's query tile (64 rows: a superset of this block's kBM rows).
        const int n_q_tiles = (p.seqlen_q + kBlockMdq - 1) / kBlockMdq;
        const int bs = p.summary_batch > 1 ? b : 0, hs = p.summary_heads > 1 ? h : 0;
        const int64_t row = (int64_t(bs) * p.summary_heads + hs) * n_q_tiles + q0 / kBlockMdq;
        n_iter = p.kv_count[row];
        index = p.kv_index + row * n_k_tiles;
        state = p.kv_state + row * n_k_tiles;
    } else {
        if (tb.lo <= tb.hi && len_k > 0) {  // a sequence without keys: dQ = 0
            tile_lo = tb.lo / kBlockN;
            n_iter = tb.hi / kBlockN - tile_lo + 1;
        }
    }

    load_rows<T, D, kBM>(sQ, qg, p.q_stride[2], q0, len_q, tid);
    load_rows<T, D, kBM>(sdO, dog, p.dout_stride[2], q0, len_q, tid);
    fa::cp_async_commit();
    // This lane's rows 16rw + g + 8r: lse·log2e (+inf past Lq or for an empty row) and delta.
    float l2[2], dl[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = q0 + rw * 16 + g + 8 * r;
        l2[r] = i < len_q ? lse_log2(p.lse[lse_row + i]) : INFINITY;
        dl[r] = i < len_q ? p.delta[lse_row + i] : 0.f;
    }
    float dq[kDw / 8][4];
#pragma unroll
    for (int dn = 0; dn < kDw / 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[dn][e] = 0.f;
    const float scale_log2 = p.scale * kLog2e;
    const bool dropout = p.dropout.philox != nullptr;
    const rules::ScoreScale sc = rules::score_scale(p.scale, var, kLog2e);
    const float slope2 = kMod ? rules::alibi_slope(var, b, h, kLog2e) : 0.f;

    for (int it = 0; it < n_iter; ++it) {
        const int kt = index ? index[it] : tile_lo + it;
        const int k0 = kt * kBlockN;
        bool partial;
        if (state != nullptr) {
            partial = state[kt] != kFull;
        } else {
            partial = !rules::encloses(tb, k0, min(k0 + kBlockN, attn_common::seq_len_k(p.layout, b, p.seqlen_k)) - 1);
        }
        const bool tail = k0 + kBlockN > attn_common::seq_len_k(p.layout, b, p.seqlen_k);
        // Dropout: the keep bits of this S tile (rows queries, columns keys), drawn before S is live (per key
        // tile: per sub-tile, ptxas exceeds its default cap at D = 96 and spills).
        const uint32_t bits = dropout ? dropout::keep_bits<kBlockN, false>(p.dropout, p.seqlen_q, p.seqlen_k, bh,
                                                                           q0 + rw * 16, k0, lane)
                                      : 0u;
        // In sub-tiles of kSub keys; K/V rows kKeys at a time (all 64, or two halves of 32 at D = 256, a half
        // wholly past Lk skipped). S = Q Kᵀ, dP = dO Vᵀ: 16 rows x kSub keys per warp; lane (g, t) holds
        // [ni][e] at row 16rw + g + 8(e/2), key k0 + sub + 8ni + 2t + e%2. Not unrolled at D = 256 (fewer
        // registers: 212 / 213 against 236 / 243, dS-writing 209 / 214 against 248 / 253 on sm_80 / sm_90).
#pragma unroll kSubUnroll
        for (int sub = 0; sub < kBlockN; sub += kSub) {
            if (sub % kKeys == 0) {
                const int len_k_now = attn_common::seq_len_k(p.layout, b, p.seqlen_k);
                if (k0 + sub >= len_k_now) break;  // block-uniform
                __syncthreads();  // everyone is done with the previous K/V rows
                load_rows<T, D, kKeys>(sK, kg, p.k_stride[2], k0 + sub, len_k_now, tid);
                load_rows<T, D, kKeys>(sV, vg, p.v_stride[2], k0 + sub, len_k_now, tid);
                fa::cp_async_commit();
                fa::cp_async_wait<0>();  // K/V (and Q/dO on the first tile) landed
                __syncthreads();
            }
            const int kr = sub % kKeys;  // the sub-tile's first row in sK / sV
            float s[kSub / 8][4], dp[kSub / 8][4];
            mma_abt<T, D, kSub, kDw>(s, sQ + rw * 16 * kLd + c0, sK + kr * kLd + c0, lane);
            mma_abt<T, D, kSub, kDw>(dp, sdO + rw * 16 * kLd + c0, sV + kr * kLd + c0, lane);
            if (Cfg::kSplit > 1) sum_halves<kSub>(s, dp, sX, warp, lane);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = q0 + rw * 16 + g + 8 * r;
                // The sequence's key count and q_offset, read where used (S and dP are live here).
                const attn_common::SeqInfo now =
                    attn_common::seq_info<true>(p.layout, b, p.seqlen_q, p.seqlen_k, var.q_offset);
                const int len_k = now.len_k;
                const int64_t pos = int64_t(i) + now.q_offset;
                const bool read_mask = partial && p.mask != nullptr && i < p.seqlen_q;  // a mask: dense only
                const int64_t mask_row = mask_bh + int64_t(i) * p.mask_stride[2];
                const bool write_ds = kDs && i < p.seqlen_q && c0 == 0;  // one warp of a pair; dS: dense only
                const int64_t dmask_row = dmask_bh + int64_t(i) * p.seqlen_k;
#pragma unroll
                for (int ni = 0; ni < kSub / 8; ++ni)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int j = k0 + sub + ni * 8 + 2 * t + c;
                        float x, th = 0.f;
                        if constexpr (kMod) {
                            x = rules::scaled_score(s[ni][2 * r + c], sc, th) + rules::alibi_bias(slope2, pos, j);
                        } else {
                            x = s[ni][2 * r + c] * scale_log2;
                        }
                        bool keep = true;
                        if (partial || tail) {
                            keep = j < len_k;
                            if (partial) {
                                keep = keep && j >= row_lo[r] && j <= row_hi[r];  // band and chunk
                                if (keep && read_mask)
                                    keep = apply_mask_value(p.mask_elem, p.mask, mask_row + int64_t(j) * p.mask_stride[3], x);
                            }
                        }
                        const float prob = keep ? exp2f(x - l2[r]) : 0.f;
                        float dpz = dp[ni][2 * r + c];
                        if (dropout) dpz = dropped(dpz, dropout::kept(bits, sub / 8 + ni, 2 * r + c), p.dropout.scale);
                        const float ds = prob * (dpz - dl[r]);
                        if (write_ds && j < len_k) store_mask_grad(p.mask_elem, p.dmask, dmask_row + j, ds);
                        // The gradient before scaled_score (attn_rules.h; the softcap's 1 - tanh²).
                        dp[ni][2 * r + c] = kMod ? rules::score_grad(ds, th, sc) : ds;
                    }
            }
            // dQ += dS K (scaled at the end), over this warp's columns.
            mma_xb<T, D, kSub, kDw>(dq, dp, sK + kr * kLd + c0, lane);
        }
    }

    if (kDs) {  // the skipped key tiles: the summary lists them after its non-empty ones; else outside the band
        if (index != nullptr) {
            for (int it = n_iter; it < n_k_tiles; ++it)
                zero_mask_grad_tile<kBM>(p, dmask_bh, q0, index[it] * kBlockN, tid);
        } else {
            for (int kt = 0; kt < n_k_tiles; ++kt)
                if (kt < tile_lo || kt >= tile_lo + n_iter)
                    zero_mask_grad_tile<kBM>(p, dmask_bh, q0, kt * kBlockN, tid);
        }
    }
    fa::cp_async_wait<0>();  // Q/dO's copies, if no key tile was visited
    __syncthreads();
    const attn_common::SeqInfo seq_out =
        attn_common::seq_info<true>(p.layout, b, p.seqlen_q, p.seqlen_k, var.q_offset);
    store_rows<T, D, kDw>(
        dq, p.scale, sQ + rw * 16 * kLd + c0,
        static_cast<T*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[1] + seq_out.q_start * p.dq_stride[2] + c0,
        p.dq_stride[2], q0 + rw * 16, seq_out.len_q, lane);
}

#ifndef FASTATTN_EMULATE
template <class Kernel>
const char* allow_smem(Kernel* kernel, int bytes) {
    if (bytes <= 48 * 1024) return nullptr;
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
#endif

template <class T, int D>
const char* launch_typed(const AttnBwdParams& p, void* stream) {
    using Cfg = Tile<D>;
    auto* pre = &attn_bwd_preprocess_kernel<T, D>;
    const bool mod = rules::modifies_scores(p.variant);
    auto* dkdv = mod || p.variant.chunk > 0 ? &attn_bwd_dkdv_kernel<T, D, true> : &attn_bwd_dkdv_kernel<T, D, false>;
    auto* dqk = p.dmask != nullptr
                    ? (mod ? &attn_bwd_dq_kernel<T, D, true, true> : &attn_bwd_dq_kernel<T, D, true, false>)
                    : (mod ? &attn_bwd_dq_kernel<T, D, false, true> : &attn_bwd_dq_kernel<T, D, false, false>);
#ifndef FASTATTN_EMULATE
    if (const char* e = allow_smem(dkdv, Cfg::kDkdvSmem)) return e;
    if (const char* e = allow_smem(dqk, Cfg::kDqSmem)) return e;
#endif
    const unsigned n_q64 = unsigned((p.seqlen_q + 63) / 64);
    const unsigned n_qdq = unsigned((p.seqlen_q + Cfg::kRowsDq - 1) / Cfg::kRowsDq);
    const unsigned n_k = unsigned((p.seqlen_k + Cfg::kKeysKv - 1) / Cfg::kKeysKv);
    if (p.seqlen_q > 0) FA_LAUNCH_KERNEL(pre, dim3(n_q64, unsigned(p.heads_q), unsigned(p.batch)), dim3(kThreads), 0,
                                         stream, p);
    FA_LAUNCH_KERNEL(dkdv, dim3(n_k, unsigned(p.heads_kv), unsigned(p.batch)), dim3(kThreads), Cfg::kDkdvSmem,
                     stream, p);
    if (p.seqlen_q > 0) FA_LAUNCH_KERNEL(dqk, dim3(n_qdq, unsigned(p.heads_q), unsigned(p.batch)), dim3(kThreads),
                                         Cfg::kDqSmem, stream, p);
    return fa_launch_status();
}

template <class T>
const char* launch_dtype(const AttnBwdParams& p, void* stream) {
    switch (p.head_dim) {
        case 32: return launch_typed<T, 32>(p, stream);
        case 64: return launch_typed<T, 64>(p, stream);
        case 96: return launch_typed<T, 96>(p, stream);
        case 128: return launch_typed<T, 128>(p, stream);
        case 256: return launch_typed<T, 256>(p, stream);
        default: return "attn_bwd: head_dim must be 32, 64, 96, 128 or 256";
    }
}

// The caller handles Lk == 0 (dq = 0, nothing else to compute); Lq == 0 still writes dK = dV = 0.
const char* launch(const AttnBwdParams& p, void* stream) {
    if (p.seqlen_k <= 0 || p.heads_kv <= 0 || p.batch <= 0) return nullptr;
    if (p.dtype == DType::f16) return launch_dtype<fa::half_t>(p, stream);
    return launch_dtype<fa::bf16_t>(p, stream);
}

}  // namespace attn_bwd
}  // namespace fastattn

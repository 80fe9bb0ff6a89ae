// CUDA forward attention: kernel attn_fwd_kernel, launcher attn_fwd::launch, op fastattn::cuda_attn_fwd
// (csrc/attn_ops.cpp). FlashAttention-2's schedule, written on the primitives of primitives.cuh only,
// so the same source runs on a GPU (nvcc) and on the CPU emulator (FASTATTN_EMULATE).
//
// Design note
// -----------
// Work:   FLOPs 4·B·Hq·Lq·Lk·D (2·D for QKᵀ and 2·D for PV per attended pair), halved by causal tile
//         skipping. Minimum bytes: read Q, K, V once, write O and lse:
//         2·(B·Hq·Lq·D + 2·B·Hkv·Lk·D + B·Hq·Lq·D) + 4·B·Hq·Lq (+ the mask's PARTIAL tiles).
// Bound:  each K/V tile loaded by a block serves 64 query rows, i.e. 64 FLOPs per byte from L2, and
//         K/V are re-read from L2 (not HBM) by the Lq/64 blocks of one head; against HBM the intensity
//         is ~Lq FLOPs/byte (2000 at L = 4096, D = 128), far above the H100/A100 ridge (~300/~150).
//         So for L >= a few hundred it is tensor-core bound (A100: 312 TFLOP/s dense fp16/bf16; H100:
//         mma.sync reaches only part of the 989 that wgmma does), with the softmax's exp2 on the SFU
//         second (one per pair against 4·D tensor FLOPs). Target: >= 0.9x FlashAttention-2 (torch
//         SDPA flash: ~230 TFLOP/s on A100, 324-370 on H100). Not measured yet: no GPU here.
// Grid:   (query tiles of kBlockM = 64 rows, Hq, B); heaviest query tiles first (causal).
//         128 threads: warp w owns query rows 16w..16w+15 of the tile for the whole kernel.
// Packed: (varlen_attention; params.layout) B sequences, the grid over the longest one's query tiles: each
//         block reads its sequence's rows, lengths and bottom-right q_offset (attn_common.cuh: seq_info) and
//         leaves at once past its rows, so padding costs one launch slot, no loads. Everything below then uses
//         the sequence's lengths; the dropout contract keeps the call's (the maxima), as the Triton backend.
//         A compile-time parameter (kPacked, chosen by the launcher when cu_seqlens are given): one source, but
//         the dense kernels compile without the lookups, the shared SeqShared and the early exit, to the same
//         registers as before packed sequences (the packed ones cost registers, and spill: the table below).
// Tiles:  BLOCK_N = 64 keys (32 for D = 256, to keep the 16x256 fp32 accumulator in registers).
// Registers per thread (D <= 128): Q fragments D/16 x 4 regs (A operand of every QKᵀ mma, loaded once
//         by ldmatrix.x4), O accumulator D/8 x 4 fp32, S/P BLOCK_N/8 x 4 fp32, row max and sum x 2.
//         D = 256: Q is re-read from shared memory per k-step (64 more registers would spill).
//         ptxas (CUDA 13.0, -O3), registers per thread (fp16 = bf16) with the dropout path, plain / kMod; the
//         dense kernels (kPacked = false, every launch without cu_seqlens) have no spills in any variant:
//             D                 32         64         96        128        256
//             dense  sm_80   118/163    206/191    228/232    242/254    250/252
//             dense  sm_90   128/162    206/198    228/236    248/248    255/255
//             packed sm_80   128/168    194/200    242/244    252/255    252/255
//             packed sm_90   126/159    198/201    236/253    255/255    255/255
//         The packed kernels spill (known debt, issue #20; mk/known-spills.json names each): sm_80 kMod 80 B at
//         D = 128 and 8 B at D = 256; sm_90 kMod 24 B at D = 128, 24 / 40 B (plain / kMod) at D = 256.
//         i.e. 4 blocks (16 warps) per SM at D = 32 (launch bound: 128 registers; kMod 3 blocks), 2 blocks
//         (8 warps) per SM otherwise, as FlashAttention-2's 255-register kernels.
// Shared: Q tile [64][D+8], one K tile [BLOCK_N][D+8] and one V tile [BLOCK_N][D+8], 16-bit elements.
//         Rows are padded by 8 elements (16 bytes): the 8 row addresses of an ldmatrix then fall in
//         8 different 4-bank groups, so ldmatrix and the 16-byte cp.async stores are conflict-free.
//         Bytes: (64 + 2·BLOCK_N)·(D+8)·2 = 15360 / 27648 / 39936 / 52224 / 67584 for D = 32 / 64 /
//         96 / 128 / 256 (above 48 KiB the launcher opts in); the packed kernels add 24 for the block's
//         sequence (SeqShared).
// Pipeline (FA2's): K and V of a key tile are two cp.async groups that alternate with the compute
//         that does not read them: V_j streams in while S_j = Q K_jᵀ and the softmax run, K_{j+1}
//         streams in while O += P_j V_j runs. That is the double buffer, at the shared memory of one
//         K+V stage instead of two (52 KiB instead of 87 KiB at D = 128: two register-limited blocks
//         then fit an A100 SM, 164 KiB, and the rest of the carve-out stays L1).
// Math:   S = Q Kᵀ by mma.m16n8k16 (K rows through ldmatrix.x4, non-transposed: K is already the
//         "col" B operand); scores scaled by scale·log2(e) in fp32 (never folded into Q, which would
//         round it to fp16/bf16); online softmax in the exp2 domain, row max and sum reduced across
//         the 4 lanes of a quad with shfl_xor 1 and 2 (the sum only once, at the end); P is packed to
//         the input dtype in registers, where the S accumulator layout is already the A operand
//         layout of the PV mma (no shared-memory round trip); V through ldmatrix.x4.trans.
// Masks:  causal, window and q_offset are one band; without a mask tensor the key-tile range is
//         computed from it and tiles outside are never loaded, tiles fully inside skip all mask
//         arithmetic. With a mask tensor the block walks the TileSummary's non-empty tiles
//         (kv_index[:kv_count], EMPTY tiles never loaded) and reads the mask (bool or additive,
//         through its strides, 0 on broadcast dims) only in PARTIAL tiles. The last key tile is
//         bounds-checked; rows past Lq are computed on zero-filled Q and never stored.
// Epilogue: O / rowsum staged through the warp's own rows of the Q tile, stored with 16-byte
//         coalesced writes; lse = (max·ln2 + ln(sum)). A row that attends nothing keeps max = -inf:
//         exponentials then use 0 as the max (no inf - inf), the sum stays 0, O is 0 and lse -inf.
// GQA:    query head h reads K/V head h / (Hq / Hkv) through strides; nothing is copied.
// Dropout (p.dropout.philox non-null; the Triton backend's contract, cuda/dropout.cuh): before each key
//         tile's S = Q Kᵀ (few registers live) every lane draws the keep bits of its 2 x BLOCK_N/4 scores into
//         one 32-bit word, one Philox-4x32-10 per score (the contract's element index, Triton's tl.rand bit
//         for bit), in a rolled loop; after the online softmax has summed P, the dropped entries of P are
//         zeroed before P V, and the epilogue multiplies by 1 / (1 - p). The row sums and lse never
//         include dropout. A runtime branch, uniform per launch: without dropout no Philox runs, but its
//         registers count in every variant (the table above). Cost with dropout: 10 rounds (2 mul.hi,
//         2 mul.lo, 4 xor, 2 add) per score against 4·D tensor-core FLOPs: noticeable at D <= 64; one
//         output word of the four per Philox call is used, as the contract (tl.rand) fixes. Not measured.
#include "attn_common.cuh"
#include "attn_params.h"
#include "dropout.cuh"
#include "params.h"
#include "primitives.cuh"

namespace fastattn {
namespace attn_fwd {

using attn_common::apply_mask_value;
using attn_common::load_rows;

constexpr int kThreads = attn_common::kThreads;
using attn_common::kLog2e;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kFull = 2;  // TileSummary state FULL (fastattn.masks); EMPTY tiles are never listed

template <int D>
struct Tile {
    static constexpr int kBN = block_n(D);
    static constexpr int kLd = attn_common::padded_ld<D>();  // padded shared row, elements
    static constexpr bool kQInRegs = D <= 128;
    // D = 32 fits 128 registers without spilling (4 blocks per SM); larger D need more than the
    // 168 of 3 blocks per SM (ptxas spills there), so they take what they need (2 blocks per SM).
    // A softcap or ALiBi (kMod) at D = 32 spills at 128 (136 bytes on sm_80): 3 blocks per SM.
    static constexpr int min_blocks_per_sm(bool mod) { return D <= 32 ? (mod ? 3 : 4) : 1; }
    static constexpr int kQElems = kBlockM * kLd, kKVElems = kBN * kLd;
    // Packed kernels keep the block's sequence (SeqShared, 24 bytes) after the tiles; dense ones have none.
    static constexpr int smem_bytes(bool packed) { return (kQElems + 2 * kKVElems) * 2 + (packed ? 24 : 0); }
    static_assert(D % 32 == 0, "S = QK^T consumes D in steps of 32 (two m16n8k16 per ldmatrix.x4)");
};

// The block's sequence values that the loop and the epilogue need, in shared memory: read there at each use (an
// LDS at a constant offset from the tile base, no address registers) instead of held in registers through the
// loop, where the kernel has none to spare (held, or re-read from global memory, they spilled 16-128 B per thread).
struct SeqShared {
    int64_t q_offset, q_start;  // the sequence's alignment and first query row (attn_common::SeqInfo)
    int len_k, len_q;
};

// The block's sequence where the loop or the epilogue uses it: packed, read from shared memory (SeqShared); dense,
// the call's values from the params (constant bank), as a dense-only kernel always read them.
template <bool kPacked>
FA_DEVICE SeqShared seq_now(const AttnFwdParams& p, const SeqShared* sSeq) {
    if constexpr (kPacked) return *sSeq;
    else return SeqShared{p.variant.q_offset, 0, p.seqlen_k, p.seqlen_q};
}

// kMod: a softcap or ALiBi modifies every score (a separate instantiation, so the plain kernel's registers are
// untouched); the band and the chunk (attn_rules.h's row bounds) and the sinks (the epilogue) are runtime.
// kPacked: packed sequences (p.layout's offsets, the launcher's choice), a separate instantiation too: the dense
// kernels have no sequence lookup, no SeqShared and no early exit, so their registers are the dense-only kernel's.
template <class T, int D, bool kMod, bool kPacked>
__global__ void __launch_bounds__(kThreads, Tile<D>::min_blocks_per_sm(kMod)) attn_fwd_kernel(const AttnFwdParams p) {
    using Cfg = Tile<D>;
    constexpr int kBN = Cfg::kBN, kLd = Cfg::kLd;
    FA_DYNAMIC_SMEM(T, smem);
    T* sQ = smem;                  // [64][kLd]
    T* sK = smem + Cfg::kQElems;   // [kBN][kLd]
    T* sV = sK + Cfg::kKVElems;    // [kBN][kLd]
    SeqShared* sSeq = reinterpret_cast<SeqShared*>(sV + Cfg::kKVElems);

    const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
    const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: row group, thread in quad
    const int m_tile = int(gridDim.x) - 1 - int(blockIdx.x);  // heaviest (causal) tiles first
    const int h = int(blockIdx.y), b = int(blockIdx.z);
    const int hk = h / (p.heads_q / p.heads_kv);
    const int q0 = m_tile * kBlockM;
    // This block's sequence: its rows, lengths and alignment (dense: the call's). The grid covers the longest
    // sequence's query tiles; a block past this sequence's rows has nothing to do (packed only, block-uniform).
    // The prologue's values die with it: the loop and the epilogue read what they need again (seq_now).
    attn_common::SeqInfo seq{0, 0, p.seqlen_q, p.seqlen_k, p.variant.q_offset};
    if constexpr (kPacked) {
        seq = attn_common::seq_info(p.layout, b, p.seqlen_q, p.seqlen_k, p.variant.q_offset);
        if (q0 >= seq.len_q) return;
        if (tid == 0) *sSeq = SeqShared{seq.q_offset, seq.q_start, seq.len_k, seq.len_q};
        __syncthreads();  // sSeq, read from here on
    }
    const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + seq.q_start * p.q_stride[2];
    const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + seq.k_start * p.k_stride[2];
    const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + seq.k_start * p.v_stride[2];
    const rules::Variant& var = p.variant;  // q_offset: the sequence's (seq), never var's
    const int n_k_tiles = (p.seqlen_k + kBN - 1) / kBN;  // the summary's (dense batches only)
    const int64_t mask_bh = b * p.mask_stride[0] + h * p.mask_stride[1];
    const bool dropout = p.dropout.philox != nullptr;
    // This query tile's keys and the keys all its rows attend (band and chunk), computed once.
    rules::Variant var_seq = p.variant;
    if constexpr (kPacked) var_seq.q_offset = seq.q_offset;
    const rules::TileBounds32 tb =
        rules::narrow(rules::row_tile(var_seq, q0, min(q0 + kBlockM, seq.len_q) - 1, seq.len_k), seq.len_k);

    // Which key tiles to visit: the summary's non-empty list, or the band's range.
    int n_iter = 0, tile_lo = 0;
    const int32_t* index = nullptr;
    const int8_t* state = nullptr;
    if (p.kv_count != nullptr) {
        const int bs = p.summary_batch > 1 ? b : 0, hs = p.summary_heads > 1 ? h : 0;
        const int64_t row = (int64_t(bs) * p.summary_heads + hs) * int64_t(gridDim.x) + m_tile;
        n_iter = p.kv_count[row];
        index = p.kv_index + row * n_k_tiles;
        state = p.tile_state + row * n_k_tiles;
    } else {
        if (tb.lo <= tb.hi && (!kPacked || seq.len_k > 0)) {  // a sequence without keys: no tile (out 0, lse -inf)
            tile_lo = tb.lo / kBN;
            n_iter = tb.hi / kBN - tile_lo + 1;
        }
    }

    float o[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[dn][e] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    uint32_t qf[Cfg::kQInRegs ? D / 16 : 1][4];

    if (n_iter > 0) {
        load_rows<T, D, kBlockM>(sQ, qg, p.q_stride[2], q0, seq.len_q, tid);
        const int kt0 = index ? index[0] : tile_lo;
        load_rows<T, D, kBN>(sK, kg, p.k_stride[2], kt0 * kBN, seq.len_k, tid);
        fa::cp_async_commit();
    }
    const float scale_log2 = p.scale * kLog2e;
    // kMod: scores in the exp2 domain through the rules (softcap, then ALiBi's -slope * |pos - j|).
    const rules::ScoreScale sc = rules::score_scale(p.scale, var, kLog2e);
    const float slope2 = kMod ? rules::alibi_slope(var, b, h, kLog2e) : 0.f;

    for (int it = 0; it < n_iter; ++it) {
        const int kt = index ? index[it] : tile_lo + it;
        const int k0 = kt * kBN;
        fa::cp_async_wait<0>();  // K_j (and Q on the first tile) landed
        __syncthreads();         // ... for every thread's copies; everyone is done with V_{j-1}
        load_rows<T, D, kBN>(sV, vg, p.v_stride[2], k0, seq_now<kPacked>(p, sSeq).len_k, tid);
        fa::cp_async_commit();
        if constexpr (Cfg::kQInRegs) {
            if (it == 0) {
                // lanes 0-15: rows 0-15 at column 16kk, lanes 16-31 at 16kk + 8 -> the m16k16 A fragment
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk)
                    fa::ldmatrix_x4(qf[kk], sQ + (warp * 16 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
            }
        }

        // Dropout's keep bits of this tile's P, drawn before S is live (the generator's registers are free). The
        // contract indexes the batch padded to the call's lengths (packed: the longest sequence's).
        const uint32_t keep_bits = dropout ? dropout::keep_bits<kBN, false>(p.dropout, p.seqlen_q, p.seqlen_k,
                                                                            int64_t(b) * p.heads_q + h,
                                                                            q0 + warp * 16, k0, lane)
                                           : 0u;

        // S = Q K^T: 16 x kBN per warp, fp32.
        float s[kBN / 8][4];
#pragma unroll
        for (int ni = 0; ni < kBN / 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[ni][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
            uint32_t a0[4], a1[4];
            if constexpr (Cfg::kQInRegs) {
#pragma unroll
                for (int r = 0; r < 4; ++r) a0[r] = qf[kk][r], a1[r] = qf[kk + 1][r];
            } else {
                const T* qrow = sQ + (warp * 16 + lane % 16) * kLd + (lane / 16) * 8;
                fa::ldmatrix_x4(a0, qrow + kk * 16);
                fa::ldmatrix_x4(a1, qrow + kk * 16 + 16);
            }
#pragma unroll
            for (int ni = 0; ni < kBN / 8; ++ni) {
                // Matrices: keys 8ni..8ni+7 at columns 16kk, +8, +16, +24: a K row is a B "col" column.
                uint32_t kb[4];
                fa::ldmatrix_x4(kb, sK + (ni * 8 + lane % 8) * kLd + kk * 16 + (lane / 8) * 8);
                const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
                fa::mma_m16n8k16<T>(s[ni], a0, b0, s[ni]);
                fa::mma_m16n8k16<T>(s[ni], a1, b1, s[ni]);
            }
        }

        // Scale to log2 units; mask where the tile is not known to be fully visible.
        // Lane (g, t) holds s[ni][e] at row 16w + g + 8(e/2), key k0 + 8ni + 2t + e%2.
        // The sequence's length and q_offset are read where used (seq_now): S is live here.
        bool partial;
        if (state != nullptr) {
            partial = state[kt] != kFull;
        } else {
            partial = !rules::encloses(tb, k0, min(k0 + kBN, seq_now<kPacked>(p, sSeq).len_k) - 1);
        }
        const bool tail = k0 + kBN > seq_now<kPacked>(p, sSeq).len_k;
        if (partial || tail || kMod) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                // Row i sees keys [j_lo, j_hi] of this tile (band, chunk and length), then the mask tensor.
                const SeqShared now = seq_now<kPacked>(p, sSeq);
                const int len_k = now.len_k;
                const int i = q0 + warp * 16 + g + 8 * r;
                const int64_t pos = int64_t(i) + now.q_offset;
                int j_lo = k0, j_hi = min(k0 + kBN, len_k) - 1;
                if (partial) {
                    int64_t lo, hi;
                    rules::row_bounds(var, pos, len_k, lo, hi);
                    j_lo = max(j_lo, rules::clamp_index(lo, len_k));
                    j_hi = min(j_hi, rules::clamp_index(hi, len_k));
                }
                const bool read_mask = partial && p.mask != nullptr && i < p.seqlen_q;  // a mask: dense only
                const int64_t mask_row = mask_bh + int64_t(i) * p.mask_stride[2];
#pragma unroll
                for (int ni = 0; ni < kBN / 8; ++ni)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int j = k0 + ni * 8 + 2 * t + c;
                        float x;
                        if constexpr (kMod) {
                            float th;
                            x = rules::scaled_score(s[ni][2 * r + c], sc, th) + rules::alibi_bias(slope2, pos, j);
                        } else {
                            x = s[ni][2 * r + c] * scale_log2;
                        }
                        bool keep = j >= j_lo && j <= j_hi;
                        if (keep && read_mask)
                            keep = apply_mask_value(p.mask_elem, p.mask, mask_row + int64_t(j) * p.mask_stride[3], x);
                        s[ni][2 * r + c] = keep ? x : -INFINITY;
                    }
            }
        } else {
#pragma unroll
            for (int ni = 0; ni < kBN / 8; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[ni][e] *= scale_log2;
        }

        // Online softmax per row (r = 0: row g, r = 1: row g + 8); the 4 lanes of a quad share a row.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = row_max[r];
#pragma unroll
            for (int ni = 0; ni < kBN / 8; ++ni) mx = fmaxf(mx, fmaxf(s[ni][2 * r], s[ni][2 * r + 1]));
            mx = fmaxf(mx, fa::shfl_xor(mx, 1));
            mx = fmaxf(mx, fa::shfl_xor(mx, 2));
            const float m_use = mx == -INFINITY ? 0.f : mx;  // nothing visible yet: exp2(-inf) = 0
            const float alpha = exp2f(row_max[r] - m_use);
            row_max[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int ni = 0; ni < kBN / 8; ++ni) {
                s[ni][2 * r] = exp2f(s[ni][2 * r] - m_use);
                s[ni][2 * r + 1] = exp2f(s[ni][2 * r + 1] - m_use);
                sum += s[ni][2 * r] + s[ni][2 * r + 1];
            }
            row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) o[dn][2 * r] *= alpha, o[dn][2 * r + 1] *= alpha;
        }
        // Dropout on P after the row sums (the normaliser and lse never include it); 1 / (1 - p) in the epilogue.
        if (dropout) {
#pragma unroll
            for (int ni = 0; ni < kBN / 8; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[ni][e] = dropout::kept(keep_bits, ni, e) ? s[ni][e] : 0.f;
        }

        fa::cp_async_wait<0>();  // V_j landed
        __syncthreads();         // ... for every thread's copies; everyone is done reading K_j
        if (it + 1 < n_iter) {
            const int kn = index ? index[it + 1] : tile_lo + it + 1;
            load_rows<T, D, kBN>(sK, kg, p.k_stride[2], kn * kBN, seq_now<kPacked>(p, sSeq).len_k, tid);
            fa::cp_async_commit();
        }

        // O += P V. The accumulators of key columns 16kk..16kk+7 and +8..+15 are, packed to T, the
        // A fragment (rows g, g+8; keys 2t, 2t+1, 2t+8, 2t+9) of an m16n8k16 over those 16 keys.
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
            const uint32_t pa[4] = {
                fa::pack2<T>(s[2 * kk][0], s[2 * kk][1]), fa::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                fa::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), fa::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                // Matrices: keys 16kk+0..7 and +8..15 at columns 8dn, then the same at 8dn + 8;
                // .trans gives V[key 2t, 2t+1][col g], the B "col" fragment.
                uint32_t vb[4];
                fa::ldmatrix_x4<true>(vb, sV + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + dn * 8 +
                                              (lane / 16) * 8);
                const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
                fa::mma_m16n8k16<T>(o[dn], pa, b0, o[dn]);
                fa::mma_m16n8k16<T>(o[dn + 1], pa, b1, o[dn + 1]);
            }
        }
    }

    // Epilogue: finish the row sums across the quad, normalise, stage in this warp's 16 rows of sQ
    // (only this warp ever reads them), then 16-byte coalesced stores of the in-range rows.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += fa::shfl_xor(row_sum[r], 1);
        row_sum[r] += fa::shfl_xor(row_sum[r], 2);
        float alpha = 1.f;  // the sink's logit joins the row's denominator once (attn_rules.h: add_sink)
        if (var.sinks != nullptr)
            alpha = rules::add_sink(rules::sink_logit(var, h, kLog2e), row_max[r], row_sum[r], true);
        inv[r] = row_sum[r] > 0.f ? alpha * (dropout ? p.dropout.scale : 1.f) / row_sum[r] : 0.f;
    }
    T* sO = sQ + warp * 16 * kLd;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            *reinterpret_cast<uint32_t*>(sO + (g + 8 * r) * kLd + dn * 8 + 2 * t) =
                fa::pack2<T>(o[dn][2 * r] * inv[r], o[dn][2 * r + 1] * inv[r]);
    __syncwarp();
    const SeqShared seq_out = seq_now<kPacked>(p, sSeq);
    const int len_q = seq_out.len_q;
    T* og = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + seq_out.q_start * p.out_stride[2];
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int c = lane; c < 16 * kChunks; c += 32) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        const int i = q0 + warp * 16 + r;
        if (i < len_q)
            *reinterpret_cast<uint4*>(og + int64_t(i) * p.out_stride[2] + col) =
                *reinterpret_cast<const uint4*>(sO + r * kLd + col);
    }
    if (t == 0) {
        float* lse = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1] + seq_out.q_start;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = q0 + warp * 16 + g + 8 * r;
            if (i < len_q) lse[i] = row_sum[r] > 0.f ? row_max[r] * kLn2 + logf(row_sum[r]) : -INFINITY;
        }
    }
}

template <class T, int D>
const char* launch_typed(const AttnFwdParams& p, void* stream) {
    const bool mod = rules::modifies_scores(p.variant);
    const bool packed = p.layout.cu_seqlens_q != nullptr;
    const int smem = Tile<D>::smem_bytes(packed);
    auto* kernel = packed ? (mod ? &attn_fwd_kernel<T, D, true, true> : &attn_fwd_kernel<T, D, false, true>)
                          : (mod ? &attn_fwd_kernel<T, D, true, false> : &attn_fwd_kernel<T, D, false, false>);
#ifndef FASTATTN_EMULATE
    if (smem > 48 * 1024) {
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (err != cudaSuccess) return cudaGetErrorString(err);
    }
#endif
    const dim3 grid(unsigned((p.seqlen_q + kBlockM - 1) / kBlockM), unsigned(p.heads_q), unsigned(p.batch));
    FA_LAUNCH_KERNEL(kernel, grid, dim3(kThreads), smem, stream, p);
    return fa_launch_status();
}

template <class T>
const char* launch_dtype(const AttnFwdParams& p, void* stream) {
    switch (p.head_dim) {
        case 32: return launch_typed<T, 32>(p, stream);
        case 64: return launch_typed<T, 64>(p, stream);
        case 96: return launch_typed<T, 96>(p, stream);
        case 128: return launch_typed<T, 128>(p, stream);
        case 256: return launch_typed<T, 256>(p, stream);
        default: return "attn_fwd: head_dim must be 32, 64, 96, 128 or 256";
    }
}

const char* launch(const AttnFwdParams& p, void* stream) {
    if (p.seqlen_q <= 0 || p.heads_q <= 0 || p.batch <= 0) return nullptr;  // nothing to compute
    if (p.dtype == DType::f16) return launch_dtype<fa::half_t>(p, stream);
    return launch_dtype<fa::bf16_t>(p, stream);
}

}  // namespace attn_fwd
}  // namespace fastattn

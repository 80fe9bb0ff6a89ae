// Device helpers shared by the attention kernels (attn_fwd.cu, attn_bwd.cu): one copy of the tile
// loader and of the mask-element rule, so forward and backward cannot drift apart.
#pragma once

#include "attn_params.h"
#include "primitives.cuh"

namespace fastattn {
namespace attn_common {

constexpr int kThreads = 128;  // every attention kernel runs 4 warps
constexpr float kLog2e = 1.4426950408889634f;

// Shared-memory row stride of a D-wide tile: padded by 8 elements (16 bytes), so the 8 row
// addresses of an ldmatrix fall in 8 different 4-bank groups (no bank conflicts).
template <int D>
constexpr int padded_ld() {
    return D + 8;
}

// Rows x D elements from global (row stride ld_g) into shared (row stride padded_ld<D>()) by 16-byte
// cp.async; rows at or past `valid` are zero-filled (never read from global).
template <class T, int D, int Rows>
FA_DEVICE void load_rows(T* dst, const T* src, int64_t ld_g, int row0, int valid, int tid) {
    constexpr int kChunks = D / 8, kTotal = Rows * kChunks;
    static_assert(kTotal % kThreads == 0, "tile copy must split evenly over the block");
#pragma unroll
    for (int i = 0; i < kTotal / kThreads; ++i) {
        const int c = tid + i * kThreads;
        const int r = c / kChunks, col = (c % kChunks) * 8;
        const bool ok = row0 + r < valid;
        const T* s = ok ? src + int64_t(row0 + r) * ld_g + col : src;
        fa::cp_async_16_zfill(dst + r * padded_ld<D>() + col, s, ok);
    }
}

// One program's sequence, after FlashAttention-3's seqlen.h: where its rows start in q/out/lse and in k/v, its
// lengths, and its alignment. A dense batch is the special case (every batch row starts at 0 with the call's
// lengths and q_offset); a packed sequence b (layout offsets) has its own lengths and is aligned bottom-right,
// query i at key i + Lk_b - Lq_b on top of the call's q_offset. Every kernel reads the lengths and q_offset from
// here, never from the params, so the band rules (attn_rules.h) see the sequence's own.
struct SeqInfo {
    int64_t q_start, k_start;  // first query / key row of the sequence (0 for a dense batch)
    int len_q, len_k;
    int64_t q_offset;
};

// kReread: the same values read again where a kernel's loop or epilogue needs them, through volatile loads, so
// that the compiler neither keeps the prologue's values in registers across the loop nor hoists the reads. The
// kernels have no registers to spare (their design notes' tables): held from the prologue, the lengths, the row
// offset and q_offset spilled up to 124 bytes per thread (sm_90); a few loads per key tile from L1 are noise next
// to the tile's mma. A dense batch reads the params (constant bank), as before.
template <bool kReread = false>
FA_DEVICE int read_offset(const int32_t* cu, int b) {
    if constexpr (kReread) return *reinterpret_cast<const volatile int32_t*>(cu + b);
    return cu[b];
}

template <bool kReread = false>
FA_DEVICE SeqInfo seq_info(const SeqLayout& layout, int b, int seqlen_q, int seqlen_k, int64_t q_offset) {
    if (layout.cu_seqlens_q == nullptr) return SeqInfo{0, 0, seqlen_q, seqlen_k, q_offset};
    const int q0 = read_offset<kReread>(layout.cu_seqlens_q, b), k0 = read_offset<kReread>(layout.cu_seqlens_k, b);
    const int len_q = read_offset<kReread>(layout.cu_seqlens_q, b + 1) - q0;
    const int len_k = read_offset<kReread>(layout.cu_seqlens_k, b + 1) - k0;
    return SeqInfo{q0, k0, len_q, len_k, q_offset + (len_k - len_q)};
}

// The sequence's key count again (kReread), for a kernel's loop over key tiles.
FA_DEVICE int seq_len_k(const SeqLayout& layout, int b, int seqlen_k) {
    if (layout.cu_seqlens_k == nullptr) return seqlen_k;
    return read_offset<true>(layout.cu_seqlens_k, b + 1) - read_offset<true>(layout.cu_seqlens_k, b);
}

// The mask tensor's value at element offset `off`: bool -> keep or drop; float -> added (log2 units).
FA_DEVICE bool apply_mask_value(MaskElem elem, const void* mask, int64_t off, float& x) {
    switch (elem) {
        case MaskElem::boolean: return static_cast<const uint8_t*>(mask)[off] != 0;
        case MaskElem::f32: x += static_cast<const float*>(mask)[off] * kLog2e; break;
        case MaskElem::f16: x += fa::to_float(static_cast<const fa::half_t*>(mask)[off]) * kLog2e; break;
        case MaskElem::bf16: x += fa::to_float(static_cast<const fa::bf16_t*>(mask)[off]) * kLog2e; break;
        case MaskElem::f64: x += float(static_cast<const double*>(mask)[off]) * kLog2e; break;
        default: break;
    }
    return true;
}

}  // namespace attn_common
}  // namespace fastattn

// Counter-based dropout for the CUDA kernels (attn_fwd.cu, attn_bwd.cu, dropout_mask.cu): Triton 3.8's
// tl.rand, bit for bit, so the CUDA and Triton backends draw the same keep-mask from the same philox
// tensor. The contract is fastattn/backends/triton/dropout.py's (do not change one side alone):
//
//   philox = int64 [seed, offset] on the inputs' device; the random number of score (bh = b·Hq + h,
//   query row i, key j) is tl.rand(seed, offset + (bh·Lq + i)·Lk + j) with the element index in int64;
//   the score is kept iff that number >= p; kept probabilities are scaled by 1 / (1 − p).
//
// tl.rand (triton/language/random.py): Philox-4x32 with 10 rounds on the counter (c0, c1, c2, c3) =
// (low 32 bits of the index, high 32 bits, 0, 0) and the key (k0, k1) = (low, high 32 bits of the seed);
// the first output word, reinterpreted as int32, mapped to [0, 1) by x < 0 ? ~x : x, then times
// 4.6566127342e-10 in fp32 (uint_to_uniform_float). Plain integer arithmetic only: the same source
// runs under nvcc and in the emulator (FASTATTN_EMULATE); the 32x32 -> 64-bit product's high word is
// __umulhi on the device and a 64-bit multiply on the host.
#pragma once

#include <stdint.h>

#include "attn_params.h"
#include "primitives.cuh"

namespace fastattn {
namespace dropout {

constexpr uint32_t kRoundA = 0xD2511F53u;  // PHILOX_ROUND_A
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // PHILOX_ROUND_B
constexpr uint32_t kKeyA = 0x9E3779B9u;    // PHILOX_KEY_A
constexpr uint32_t kKeyB = 0xBB67AE85u;    // PHILOX_KEY_B
constexpr float kUniformScale = 4.6566127342e-10f;

FA_DEVICE uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

// The first output word of Philox-4x32-10 for counter (lo(elem), hi(elem), 0, 0) and key (k0, k1).
FA_DEVICE uint32_t philox(uint32_t k0, uint32_t k1, uint64_t elem) {
    uint32_t c0 = uint32_t(elem), c1 = uint32_t(elem >> 32), c2 = 0u, c3 = 0u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const uint32_t a0 = c0, a2 = c2;
        c0 = mulhi(kRoundB, a2) ^ c1 ^ k0;
        c2 = mulhi(kRoundA, a0) ^ c3 ^ k1;
        c1 = kRoundB * a2;
        c3 = kRoundA * a0;
        k0 += kKeyA;
        k1 += kKeyB;
    }
    return c0;
}

// uint_to_uniform_float for a uint32: [0, 1) in fp32.
FA_DEVICE float uniform(uint32_t bits) {
    int32_t x = int32_t(bits);
    x = x < 0 ? ~x : x;
    return float(x) * kUniformScale;
}

// One call's generator: the key (the seed's halves) and the counter base, read from the philox tensor
// (int64 [seed, offset] on the device: no host sync); Lq and Lk of the element index; the drop rate.
struct Rng {
    uint32_t k0, k1;
    uint64_t offset;
    int seqlen_q, seqlen_k;
    float p;
};

FA_DEVICE Rng make_rng(const DropoutParams& d, int seqlen_q, int seqlen_k) {
    const uint64_t seed = uint64_t(d.philox[0]);
    return Rng{uint32_t(seed), uint32_t(seed >> 32), uint64_t(d.philox[1]), seqlen_q, seqlen_k, d.p};
}

// Is score (bh, i, j) kept? The contract's element index, wrapping like Triton's int64 arithmetic.
FA_DEVICE bool keep(const Rng& rng, int64_t bh, int i, int j) {
    const uint64_t elem = rng.offset + (uint64_t(bh) * uint64_t(rng.seqlen_q) + uint64_t(int64_t(i))) *
                                           uint64_t(rng.seqlen_k) + uint64_t(int64_t(j));
    return uniform(philox(rng.k0, rng.k1, elem)) >= rng.p;
}

// Keep bits of the 16 x N tile a lane holds in the mma accumulator layout acc[N / 8][4]: element [ni][e]
// at tile row row0 + g + 8(e / 2), column col0 + 8ni + 2t + e % 2 (g = lane / 4, t = lane % 4) is bit
// 4ni + e. Rows are queries and columns keys, or the transpose (kKeyRows: the dK/dV pass's Sᵀ tiles).
// A rolled loop, one Philox live at a time, that reads the generator itself (nothing held across the
// caller's loop): kernels call it where few registers are live (before a tile's matmuls) and keep only
// the word of bits.
template <int N, bool kKeyRows>
FA_DEVICE uint32_t keep_bits(const DropoutParams& d, int seqlen_q, int seqlen_k, int64_t bh, int row0, int col0,
                             int lane) {
    static_assert(N / 2 <= 32, "one 32-bit word of keep bits per lane");
    const Rng rng = make_rng(d, seqlen_q, seqlen_k);
    const int g = lane / 4, t = lane % 4;
    uint32_t bits = 0u;
#pragma unroll 1
    for (int b = 0; b < N / 2; ++b) {
        const int row = row0 + g + 8 * ((b % 4) / 2), col = col0 + 8 * (b / 4) + 2 * t + b % 2;
        const bool kept = kKeyRows ? keep(rng, bh, col, row) : keep(rng, bh, row, col);
        bits |= uint32_t(kept) << b;
    }
    return bits;
}

FA_DEVICE bool kept(uint32_t bits, int ni, int e) { return (bits >> (4 * ni + e)) & 1u; }

}  // namespace dropout
}  // namespace fastattn

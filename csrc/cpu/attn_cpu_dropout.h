// Counter-based dropout for the CPU kernels: Triton 3.8's tl.rand, bit for bit, as csrc/cuda/dropout.cuh
// implements it for the CUDA kernels, so that one philox tensor gives the same keep-mask on every backend
// (a torch seed reproduces a training run whichever backend runs it). The contract is
// fastattn/backends/triton/dropout.py's (do not change one side alone):
//
//   philox = int64 [seed, offset]; the random number of score (bh = b·Hq + h, query row i, key j) is
//   tl.rand(seed, offset + (bh·Lq + i)·Lk + j) with the element index in (wrapping) 64-bit arithmetic;
//   the score is kept iff that number >= p; kept probabilities are scaled by 1 / (1 − p).
//
// tl.rand: Philox-4x32-10 on the counter (lo, hi 32 bits of the index, 0, 0) with the key (lo, hi 32 bits
// of the seed); the first output word as int32, folded to x < 0 ? ~x : x, times 4.6566127342e-10f.
// Integer arithmetic plus one exact int -> float conversion and one rounded product: the same bits under
// any instruction set, so this header is compiled both in the per-ISA kernel files and in attn_cpu.cpp.
//
// Speed: the kernels ask for a row of counters at a time (keys of one query row in the forward, query rows
// of one key in the backward) through keep_scale(), a loop the compiler vectorises (omp simd; 32x32->64-bit
// multiplies are vpmuludq), so Philox costs a few cycles per score instead of tens.
#pragma once

#include <cstdint>

namespace fastattn_cpu {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u;  // PHILOX_ROUND_A
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // PHILOX_ROUND_B
constexpr uint32_t kKeyA = 0x9E3779B9u;    // PHILOX_KEY_A
constexpr uint32_t kKeyB = 0xBB67AE85u;    // PHILOX_KEY_B
constexpr float kUniformScale = 4.6566127342e-10f;

// One call's generator: the key (the seed's halves), the counter base, Lq and Lk of the element index.
struct Rng {
  uint32_t k0, k1;
  uint64_t offset;
  uint64_t seqlen_q, seqlen_k;
  float p;
};

inline Rng make_rng(int64_t seed, int64_t offset, int64_t seqlen_q, int64_t seqlen_k, float p) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return Rng{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), static_cast<uint64_t>(offset),
             static_cast<uint64_t>(seqlen_q), static_cast<uint64_t>(seqlen_k), p};
}

// The contract's element index of score (bh, i, j).
inline uint64_t element(const Rng& rng, int64_t bh, int64_t i, int64_t j) {
  return rng.offset + (static_cast<uint64_t>(bh) * rng.seqlen_q + static_cast<uint64_t>(i)) * rng.seqlen_k +
         static_cast<uint64_t>(j);
}

// [0, 1) uniform of counter `elem`: the first word of Philox-4x32-10, as tl.rand maps it.
inline float uniform(uint32_t k0, uint32_t k1, uint64_t elem) {
  uint32_t c0 = static_cast<uint32_t>(elem), c1 = static_cast<uint32_t>(elem >> 32), c2 = 0u, c3 = 0u;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2, pa = static_cast<uint64_t>(kRoundA) * c0;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    k0 += kKeyA;
    k1 += kKeyB;
  }
  int32_t x = static_cast<int32_t>(c0);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// out[c] = kept ? keep : 0 for the n scores whose element indices are first + c·stride.
inline void keep_scale(const Rng& rng, uint64_t first, uint64_t stride, int64_t n, float keep, float* out) {
  const uint32_t k0 = rng.k0, k1 = rng.k1;
  const float p = rng.p;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] = uniform(k0, k1, first + static_cast<uint64_t>(c) * stride) >= p ? keep : 0.f;
}

}  // namespace philox
}  // namespace fastattn_cpu

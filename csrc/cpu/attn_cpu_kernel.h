// Fused attention forward and backward on the CPU, compiled once per instruction set.
//
// Design note
// -----------
// FLOPs: forward 4·B·Hq·Lq·Lk·D over the attended tiles (QKᵀ and PV); backward 2.5× that
// (5 GEMMs: recompute Sᵀ, dV, dPᵀ, dK, dQ). Minimum bytes: q, k, v, out once (plus the mask's
// own size when one is given), so at D = 64 the work is compute bound by a wide margin (about
// 64 FLOPs per byte per key tile); the bound to reach is the GEMM rate of the core: about
// 110 GFLOP/s per core in fp32 and 210 in bf16 (avx512_bf16) on the dev machine's EPYC.
//
// Tiling (FlashAttention-2 style): a task is (batch, query head, query tile of BQ rows); it
// walks the non-empty key tiles of BK keys, keeping the running max m, the running sum l and
// an fp32 accumulator BQ × Dv in L1/L2; S = Q Kᵀ and P V go through oneDNN's brgemm
// micro-kernel (the one torch's own CPU flash attention uses) when the self-test at load passes,
// else through a portable at::vec loop. K and V are packed once per call into GEMM-ready tiles
// (Kᵀ per tile, VNNI pairs for bf16), which is also what makes any input stride work and what
// lets GQA share a kv head's packed tiles between its query heads without a copy per head.
// Softmax is fp32 and vectorised (at::vec, exp_u20); P is rounded to bf16 only as the PV GEMM's
// input. Scratch is O(BQ·BK + BQ·Dv) per thread plus the packed K/V (O(Lk·D)): no Lq × Lk buffer.
//
// Dropout (attn_cpu_dropout.h, the GPU backends' Philox contract bit for bit): the forward zeroes the
// dropped probabilities of each row of P before the PV GEMM (the row sum l and the lse stay undropped)
// and scales the output by 1 / (1 - p); the backward regenerates the same bits per key column of Pᵀ and
// applies dP ∘ Z and P ∘ Z (Z = keep / (1 - p)), as fastattn.reference.attention_backward states it.
//
// Tile skipping: a (query tile, key tile) pair is EMPTY (skipped), PARTIAL (mask read per
// element) or FULL (no mask read). Causal, window and q_offset are analytic; a mask tensor
// contributes a per-tile state, either passed in (fastattn.Mask's cached summary) or built here
// by one vectorised pass over the mask's own (non-broadcast) elements.
//
// Backward: a task is (batch, kv head, chunk of key tiles); it holds dK, dV for its keys in fp32,
// loops over the query heads of its GQA group and the query tiles, recomputes Pᵀ from the saved
// lse, and adds its dQ contribution to a per-chunk fp32 buffer. Chunks depend on the problem
// only (never on the thread count) and are summed in a fixed order, so results are bitwise
// independent of torch.get_num_threads().
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "attn_cpu_dropout.h"
#include "attn_cpu_params.h"

namespace fastattn_cpu {
namespace CPU_CAPABILITY {
namespace {

using c10::BFloat16;
using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T from_f(float x) {
  return static_cast<T>(x);
}

template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// ---------------------------------------------------------------- GEMM

// C (M × N, ldc) = (add ? C : 0) + A (M × K, lda) · B (K × N, ldb); all fp32, plain layouts.
inline void portable_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bm, int64_t ldb,
                          float* C, int64_t ldc, bool add) {
  const int64_t vs = Vec::size();
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (!add) std::fill(c, c + N, 0.f);
    for (int64_t kk = 0; kk < K; ++kk) {
      const float a = A[i * lda + kk];
      const float* brow = Bm + kk * ldb;
      const Vec va(a);
      int64_t j = 0;
      for (; j + vs <= N; j += vs) at::vec::fmadd(va, Vec::loadu(brow + j), Vec::loadu(c + j)).store(c + j);
      for (; j < N; ++j) c[j] += a * brow[j];
    }
  }
}

// B is in brgemm layout: plain K × N for fp32, VNNI pairs [K/2][N][2] for bf16 (K even).
inline void gemm(bool brg, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bm, int64_t ldb,
                 float* C, int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  if (brg)
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, Bm, C, false);
  else
    portable_gemm(M, N, K, A, lda, Bm, ldb, C, ldc, add);
}

inline void gemm(bool, int64_t M, int64_t N, int64_t K, const BFloat16* A, int64_t lda, const BFloat16* Bm,
                 int64_t ldb, float* C, int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, Bm, C, true);
}

// ---------------------------------------------------------------- packing

// dst (Kp × ld, brgemm B layout) from src where B[k][n] = src[k*sk + n*sn]; zero outside K × N.
template <typename src_t, typename pack_t>
void pack_b(const src_t* src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t Kp, int64_t ld, pack_t* dst) {
  constexpr bool vnni = std::is_same<pack_t, BFloat16>::value;
  const pack_t zero = from_f<pack_t>(0.f);
  for (int64_t kk = 0; kk < Kp; ++kk) {
    pack_t* row = vnni ? dst + (kk / 2) * ld * 2 + (kk & 1) : dst + kk * ld;
    const int64_t step = vnni ? 2 : 1;
    if (kk >= K) {
      for (int64_t n = 0; n < ld; ++n) row[n * step] = zero;
      continue;
    }
    const src_t* s = src + kk * sk;
    int64_t n = 0;
    for (; n < N; ++n) row[n * step] = from_f<pack_t>(to_f(s[n * sn]));
    for (; n < ld; ++n) row[n * step] = zero;
  }
}

// dst (M × ld, row-major A) from src where A[r][c] = src[r*sr + c*sc]; zero for K <= c < ld.
template <typename src_t, typename pack_t>
void pack_a(const src_t* src, int64_t sr, int64_t sc, int64_t M, int64_t K, int64_t ld, pack_t* dst) {
  const pack_t zero = from_f<pack_t>(0.f);
  for (int64_t r = 0; r < M; ++r) {
    const src_t* s = src + r * sr;
    pack_t* d = dst + r * ld;
    int64_t c = 0;
    if (sc == 1 && std::is_same<src_t, pack_t>::value) {
      std::memcpy(d, s, sizeof(pack_t) * K);
      c = K;
    }
    for (; c < K; ++c) d[c] = from_f<pack_t>(to_f(s[c * sc]));
    for (; c < ld; ++c) d[c] = zero;
  }
}

// ---------------------------------------------------------------- vector helpers

inline void scale_inplace(float* x, int64_t n, float a) {
  const int64_t vs = Vec::size();
  const Vec va(a);
  int64_t j = 0;
  for (; j + vs <= n; j += vs) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

inline float max_of(const float* x, int64_t n) {
  const int64_t vs = Vec::size();
  Vec vm(kNegInf);
  int64_t j = 0;
  for (; j + vs <= n; j += vs) vm = at::vec::maximum(vm, Vec::loadu(x + j));
  if (j < n) vm = at::vec::maximum(vm, Vec::set(Vec(kNegInf), Vec::loadu(x + j, n - j), n - j));
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
}

// out[j] = exp(x[j] * mul - sub) converted to out_t, two vectors at a time (one bf16 vector);
// returns the fp32 sum.
template <typename out_t>
inline float exp_store(const float* x, int64_t n, float mul, float sub, out_t* out) {
  const int64_t vs = Vec::size();
  const Vec vmul(mul), vsub(sub), zero(0.f);
  Vec sum0(0.f), sum1(0.f);
  int64_t j = 0;
  for (; j + 2 * vs <= n; j += 2 * vs) {
    const Vec e0 = at::vec::fmsub(Vec::loadu(x + j), vmul, vsub).exp_u20();
    const Vec e1 = at::vec::fmsub(Vec::loadu(x + j + vs), vmul, vsub).exp_u20();
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
    if constexpr (std::is_same<out_t, float>::value) {
      e0.store(out + j);
      e1.store(out + j + vs);
    } else {
      at::vec::convert_from_float<out_t>(e0, e1).store(out + j);
    }
  }
  if (j < n) {  // the tail, masked: lanes past n are zero in the sum and never stored
    const int64_t c0 = std::min(vs, n - j), c1 = n - j - c0;
    const Vec e0 = Vec::set(zero, at::vec::fmsub(Vec::loadu(x + j, c0), vmul, vsub).exp_u20(), c0);
    const Vec e1 = c1 > 0 ? Vec::set(zero, at::vec::fmsub(Vec::loadu(x + j + vs, c1), vmul, vsub).exp_u20(), c1) : zero;
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
    if constexpr (std::is_same<out_t, float>::value) {
      e0.store(out + j, c0);
      if (c1 > 0) e1.store(out + j + vs, c1);
    } else {
      at::vec::convert_from_float<out_t>(e0, e1).store(out + j, n - j);
    }
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum0 + sum1);
}

template <typename T>
inline void fill_zero(T* x, int64_t n) {
  if (n > 0) std::memset(static_cast<void*>(x), 0, sizeof(T) * n);
}

// x[c] *= keep[c] (keep is 0 or 1: dropped probabilities of a row of P become exact zeros).
inline void apply_keep(float* x, const float* keep, int64_t n) {
  const int64_t vs = Vec::size();
  int64_t c = 0;
  for (; c + vs <= n; c += vs) (Vec::loadu(x + c) * Vec::loadu(keep + c)).store(x + c);
  for (; c < n; ++c) x[c] *= keep[c];
}

inline void apply_keep(BFloat16* x, const float* keep, int64_t n) {
  for (int64_t c = 0; c < n; ++c)
    if (keep[c] == 0.f) x[c] = BFloat16(0.f);
}

// ---------------------------------------------------------------- masks and tile states

// Applies the mask tensor to scores s[c] (key k0 + c) for c in [c0, c1) of query row i.
inline void apply_mask_row(const AttnParams& p, int64_t b, int64_t h, int64_t i, int64_t k0, int64_t c0, int64_t c1,
                           float* s) {
  if (p.mask_kind == kMaskBool) {
    const bool* m = static_cast<const bool*>(p.mask) + b * p.m_s[0] + h * p.m_s[1] + i * p.m_s[2] + k0 * p.m_s[3];
    const int64_t st = p.m_s[3];
    for (int64_t c = c0; c < c1; ++c)
      if (!m[c * st]) s[c] = kNegInf;
  } else {
    const float* m = static_cast<const float*>(p.mask) + b * p.m_s[0] + h * p.m_s[1] + i * p.m_s[2] + k0 * p.m_s[3];
    const int64_t st = p.m_s[3];
    if (st == 1) {
      const int64_t vs = Vec::size();
      int64_t c = c0;
      for (; c + vs <= c1; c += vs) (Vec::loadu(s + c) + Vec::loadu(m + c)).store(s + c);
      for (; c < c1; ++c) s[c] += m[c];
    } else {
      for (int64_t c = c0; c < c1; ++c) s[c] += m[c * st];
    }
  }
}

// The band's visible keys of query row i, as [lo, hi] (inclusive) clipped to [0, Lk - 1].
inline void band_row(const AttnParams& p, int64_t i, int64_t& lo, int64_t& hi) {
  const int64_t pos = i + p.q_offset;
  lo = p.left >= 0 ? std::max<int64_t>(0, pos - p.left) : 0;
  hi = p.right >= 0 ? std::min<int64_t>(p.Lk - 1, pos + p.right) : p.Lk - 1;
}

// The band's state of a tile from its first and last rows (bounds grow with i).
inline int8_t band_state(const AttnParams& p, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  const int64_t off = p.q_offset;
  if (p.right >= 0 && q1 + off + p.right < k0) return kEmpty;
  if (p.left >= 0 && q0 + off - p.left > k1) return kEmpty;
  const bool full = (p.left < 0 || q1 + off - p.left <= k0) && (p.right < 0 || q0 + off + p.right >= k1);
  return full ? kFull : kPartial;
}

// One pass over the mask's own elements: the state of every (query tile, key tile) of each
// non-broadcast (batch, head). Rows of contiguous booleans are tested 8 bytes at a time.
void build_mask_state(const AttnParams& p, int64_t Bm, int64_t Hm, int8_t* state) {
  const int64_t BQ = p.BQ, BK = p.BK, nQ = ceil_div(p.Lq, BQ), nK = ceil_div(p.Lk, BK);
  at::parallel_for(0, Bm * Hm * nQ, 1, [&](int64_t begin, int64_t end) {
    auto any = scratch<uint8_t>(nK);
    auto all = scratch<uint8_t>(nK);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nQ, qt = t % nQ, b = bh / Hm, h = bh % Hm;
      const int64_t q0 = qt * BQ, q1 = std::min(q0 + BQ, p.Lq);
      std::fill(any.get(), any.get() + nK, 0);
      std::fill(all.get(), all.get() + nK, 1);
      for (int64_t i = q0; i < q1; ++i) {
        const char* base = static_cast<const char*>(p.mask);
        if (p.mask_kind == kMaskBool) {
          const uint8_t* row = reinterpret_cast<const uint8_t*>(base) + b * p.m_s[0] + h * p.m_s[1] + i * p.m_s[2];
          for (int64_t kt = 0; kt < nK; ++kt) {
            const int64_t k0 = kt * BK, k1 = std::min(k0 + BK, p.Lk);
            if (p.m_s[3] == 1) {
              uint64_t orv = 0, andv = ~uint64_t(0);
              int64_t j = k0;
              for (; j + 8 <= k1; j += 8) {
                uint64_t w;
                std::memcpy(&w, row + j, 8);
                orv |= w;
                andv &= w;
              }
              bool a = orv != 0, l = (andv & 0x0101010101010101ull) == 0x0101010101010101ull;
              for (; j < k1; ++j) {
                a = a || row[j];
                l = l && row[j];
              }
              any[kt] |= a;
              all[kt] &= l;
            } else {
              for (int64_t j = k0; j < k1; ++j) {
                const bool v = row[j * p.m_s[3]];
                any[kt] |= v;
                all[kt] &= v;
              }
            }
          }
        } else {
          const float* row = reinterpret_cast<const float*>(base) + b * p.m_s[0] + h * p.m_s[1] + i * p.m_s[2];
          for (int64_t kt = 0; kt < nK; ++kt) {
            if (any[kt]) continue;
            const int64_t k0 = kt * BK, k1 = std::min(k0 + BK, p.Lk);
            bool a = false;
            for (int64_t j = k0; j < k1; ++j) a = a || (row[j * p.m_s[3]] != kNegInf);
            any[kt] |= a;
          }
        }
      }
      int8_t* out = state + t * nK;
      for (int64_t kt = 0; kt < nK; ++kt) {
        if (!any[kt])
          out[kt] = kEmpty;
        else
          out[kt] = (p.mask_kind == kMaskBool && all[kt]) ? kFull : kPartial;
      }
    }
  });
}

// The state of tile (qt, kt) for (batch b, query head h): band, then the mask's state.
inline int8_t tile_state(const AttnParams& p, const int8_t* mstate, const int64_t* ms_s, int64_t b, int64_t h,
                         int64_t qt, int64_t kt) {
  const int64_t q0 = qt * p.BQ, q1 = std::min(q0 + p.BQ, p.Lq) - 1;
  const int64_t k0 = kt * p.BK, k1 = std::min(k0 + p.BK, p.Lk) - 1;
  int8_t st = band_state(p, q0, q1, k0, k1);
  if (st == kEmpty || p.mask_kind == kMaskNone) return st;
  const int8_t ms = mstate[b * ms_s[0] + h * ms_s[1] + qt * ms_s[2] + kt * ms_s[3]];
  if (ms == kEmpty) return kEmpty;
  if (ms == kPartial || p.mask_kind == kMaskFloat) return kPartial;
  return st;
}

// The mask state to use: the one passed in, or one built here into `own`.
inline const int8_t* mask_state(const AttnParams& p, std::unique_ptr<int8_t[]>& own, int64_t* ms_s) {
  if (p.mask_kind == kMaskNone) return nullptr;
  if (p.state != nullptr) {
    for (int d = 0; d < 4; ++d) ms_s[d] = p.st_s[d];
    return p.state;
  }
  const int64_t Bm = p.m_s[0] == 0 ? 1 : p.B, Hm = p.m_s[1] == 0 ? 1 : p.Hq;
  const int64_t nQ = ceil_div(p.Lq, p.BQ), nK = ceil_div(p.Lk, p.BK);
  own = scratch<int8_t>(Bm * Hm * nQ * nK);
  build_mask_state(p, Bm, Hm, own.get());
  ms_s[0] = Bm == 1 ? 0 : Hm * nQ * nK;
  ms_s[1] = Hm == 1 ? 0 : nQ * nK;
  ms_s[2] = nK;
  ms_s[3] = 1;
  return own.get();
}

inline void release_brgemm(bool used) {
  if (used) at::native::cpublas::brgemm_release(true);
}

// Runs worker(claim) on each of torch's threads; claim() hands out task ids 0, 1, ... (>= n when
// none are left). Dynamic, so a thread slowed by a busy core takes fewer tasks; each task's result
// depends on its id alone, never on the thread that runs it.
template <typename Worker>
void parallel_dynamic(int64_t n, const Worker& worker) {
  std::atomic<int64_t> next{0};
  auto claim = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(claim);
  });
}

// ---------------------------------------------------------------- forward

template <typename scalar_t, typename pack_t>
void attn_fwd(const AttnParams& p) {
  constexpr bool vnni = std::is_same<pack_t, BFloat16>::value;
  const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, Lq = p.Lq, Lk = p.Lk, D = p.D, Dv = p.Dv;
  const int64_t BQ = p.BQ, BK = p.BK, nQ = ceil_div(Lq, BQ), nK = ceil_div(Lk, BK), group = Hq / Hkv;
  const int64_t Dp = vnni ? round_even(D) : D;
  const int64_t blk = BK * (Dp + Dv);
  const bool brg = p.use_brgemm;
  const scalar_t* Q = static_cast<const scalar_t*>(p.q);
  const scalar_t* K = static_cast<const scalar_t*>(p.k);
  const scalar_t* V = static_cast<const scalar_t*>(p.v);
  scalar_t* O = static_cast<scalar_t*>(p.out);
  pack_t* kvp = static_cast<pack_t*>(p.kv_pack);

  std::unique_ptr<int8_t[]> own_state;
  int64_t ms_s[4] = {0, 0, 0, 0};
  const int8_t* mstate = mask_state(p, own_state, ms_s);

  // Kᵀ (Dp × BK) and V (BK × Dv) of every key tile, in brgemm B layout, zero-padded.
  at::parallel_for(0, B * Hkv * nK, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (Hkv * nK), hk = (t / nK) % Hkv, kt = t % nK;
      const int64_t k0 = kt * BK, n = std::min(BK, Lk - k0);
      const scalar_t* kb = K + b * p.k_s[0] + hk * p.k_s[1] + k0 * p.k_s[2];
      const scalar_t* vb = V + b * p.v_s[0] + hk * p.v_s[1] + k0 * p.v_s[2];
      pack_t* dst = kvp + t * blk;
      pack_b(kb, p.k_s[3], p.k_s[2], D, n, Dp, BK, dst);
      pack_b(vb, p.v_s[2], p.v_s[3], n, Dv, BK, Dv, dst + BK * Dp);
    }
  });

  const bool drop = p.dropout_p > 0.f;
  const philox::Rng rng = philox::make_rng(p.philox_seed, p.philox_offset, Lq, Lk, p.dropout_p);
  const float out_scale = drop ? 1.f / (1.f - p.dropout_p) : 1.f;

  const int64_t n_tasks = B * Hq * nQ;
  parallel_dynamic(n_tasks, [&](const auto& claim) {
    auto keep = scratch<float>(drop ? BK : 1);
    auto qa = scratch<pack_t>(BQ * Dp);
    auto S = scratch<float>(BQ * BK);
    auto Pb = scratch<pack_t>(vnni ? BQ * BK : 1);
    auto acc = scratch<float>(BQ * Dv);
    auto mrow = scratch<float>(BQ);
    auto lrow = scratch<float>(BQ);
    auto tiles = scratch<int64_t>(nK);
    auto states = scratch<int8_t>(nK);
    pack_t* P = vnni ? Pb.get() : reinterpret_cast<pack_t*>(S.get());
    for (int64_t task = claim(); task < n_tasks; task = claim()) {
      // Last query tiles first: under causal masks they are the longest.
      const int64_t t = n_tasks - 1 - task;
      const int64_t b = t / (Hq * nQ), h = (t / nQ) % Hq, qt = t % nQ, hk = h / group;
      const int64_t q0 = qt * BQ, m = std::min(BQ, Lq - q0);
      int64_t nt = 0;
      for (int64_t kt = 0; kt < nK; ++kt) {
        const int8_t st = tile_state(p, mstate, ms_s, b, h, qt, kt);
        if (st != kEmpty) {
          tiles[nt] = kt;
          states[nt++] = st;
        }
      }
      scalar_t* orow = O + ((b * Hq + h) * Lq + q0) * Dv;
      float* lse = p.lse + (b * Hq + h) * Lq + q0;
      if (nt == 0) {
        fill_zero(orow, m * Dv);
        std::fill(lse, lse + m, kNegInf);
        continue;
      }
      pack_a(Q + b * p.q_s[0] + h * p.q_s[1] + q0 * p.q_s[2], p.q_s[2], p.q_s[3], m, D, Dp, qa.get());
      std::fill(mrow.get(), mrow.get() + m, kNegInf);
      std::fill(lrow.get(), lrow.get() + m, 0.f);
      std::fill(acc.get(), acc.get() + m * Dv, 0.f);
      for (int64_t it = 0; it < nt; ++it) {
        const int64_t kt = tiles[it], k0 = kt * BK, n = std::min(BK, Lk - k0);
        const int64_t npad = vnni ? round_even(n) : n;
        const pack_t* kpk = kvp + ((b * Hkv + hk) * nK + kt) * blk;
        gemm(brg, m, n, Dp, qa.get(), Dp, kpk, BK, S.get(), BK, false);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = q0 + r;
          float* s = S.get() + r * BK;
          pack_t* prow = P + r * BK;
          int64_t lo, hi;
          band_row(p, i, lo, hi);
          const int64_t c0 = std::clamp<int64_t>(lo - k0, 0, n), c1 = std::clamp<int64_t>(hi - k0 + 1, 0, n);
          if (c0 >= c1) {
            fill_zero(prow, npad);
            continue;
          }
          // With no mask to add and scale > 0, max(s * scale) = scale * max(s): scale inside exp.
          const bool plain = (states[it] == kFull || p.mask_kind == kMaskNone) && p.scale > 0.f;
          float mul = p.scale;
          float row_max;
          if (plain) {
            row_max = max_of(s + c0, c1 - c0) * p.scale;
          } else {
            scale_inplace(s + c0, c1 - c0, p.scale);
            if (p.mask_kind != kMaskNone) apply_mask_row(p, b, h, i, k0, c0, c1, s);
            row_max = max_of(s + c0, c1 - c0);
            mul = 1.f;
          }
          // NaN stays in the rows it touches: std::max(-inf, NaN) would drop it and zero the row.
          const float m_new = std::isnan(row_max) ? row_max : std::max(mrow[r], row_max);
          if (m_new == kNegInf) {
            fill_zero(prow, npad);
            continue;
          }
          const float alpha = mrow[r] == kNegInf ? 0.f : std::exp(mrow[r] - m_new);
          const float sum = exp_store(s + c0, c1 - c0, mul, m_new, prow + c0);
          fill_zero(prow, c0);
          fill_zero(prow + c1, npad - c1);
          if (drop) {  // after the sum: l and the lse never include dropout
            philox::keep_scale(rng, philox::element(rng, b * Hq + h, i, k0 + c0), 1, c1 - c0, 1.f, keep.get());
            apply_keep(prow + c0, keep.get(), c1 - c0);
          }
          lrow[r] = lrow[r] * alpha + sum;
          mrow[r] = m_new;
          if (alpha != 1.f) scale_inplace(acc.get() + r * Dv, Dv, alpha);
        }
        gemm(brg, m, Dv, npad, P, BK, kpk + BK * Dp, Dv, acc.get(), Dv, true);
      }
      for (int64_t r = 0; r < m; ++r) {
        const float l = lrow[r];
        const float inv = l > 0.f ? out_scale / l : 0.f;
        const float* a = acc.get() + r * Dv;
        scalar_t* o = orow + r * Dv;
        for (int64_t e = 0; e < Dv; ++e) o[e] = from_f<scalar_t>(a[e] * inv);
        lse[r] = std::isnan(l) ? l : (l > 0.f ? mrow[r] + std::log(l) : kNegInf);
      }
    }
    release_brgemm(brg);
  });
}

// ---------------------------------------------------------------- backward

template <typename scalar_t, typename pack_t>
void attn_bwd(const AttnParams& p) {
  constexpr bool vnni = std::is_same<pack_t, BFloat16>::value;
  const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, Lq = p.Lq, Lk = p.Lk, D = p.D, Dv = p.Dv;
  const int64_t BQ = p.BQ, BK = p.BK, nQ = ceil_div(Lq, BQ), nK = ceil_div(Lk, BK), group = Hq / Hkv;
  const int64_t Dp = vnni ? round_even(D) : D, Dvp = vnni ? round_even(Dv) : Dv;
  const int64_t n_chunks = p.n_chunks, per_chunk = ceil_div(nK, n_chunks);
  const bool brg = p.use_brgemm;
  const scalar_t* Q = static_cast<const scalar_t*>(p.q);
  const scalar_t* K = static_cast<const scalar_t*>(p.k);
  const scalar_t* V = static_cast<const scalar_t*>(p.v);
  const scalar_t* dO = static_cast<const scalar_t*>(p.dout);
  const scalar_t* Ob = static_cast<const scalar_t*>(p.o);

  std::unique_ptr<int8_t[]> own_state;
  int64_t ms_s[4] = {0, 0, 0, 0};
  const int8_t* mstate = mask_state(p, own_state, ms_s);

  // delta_i = rowsum(dO ∘ O) in fp32.
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      for (int64_t i = 0; i < Lq; ++i) {
        const scalar_t* g = dO + b * p.do_s[0] + h * p.do_s[1] + i * p.do_s[2];
        const scalar_t* o = Ob + b * p.o_s[0] + h * p.o_s[1] + i * p.o_s[2];
        float acc = 0.f;
        for (int64_t e = 0; e < Dv; ++e) acc += to_f(g[e * p.do_s[3]]) * to_f(o[e * p.o_s[3]]);
        p.delta[bh * Lq + i] = acc;
      }
    }
  });

  const bool drop = p.dropout_p > 0.f;
  const philox::Rng rng = philox::make_rng(p.philox_seed, p.philox_offset, Lq, Lk, p.dropout_p);
  const float keep_value = drop ? 1.f / (1.f - p.dropout_p) : 1.f;

  const int64_t n_tasks = B * Hkv * n_chunks;
  parallel_dynamic(n_tasks, [&](const auto& claim) {
    const int64_t mp = vnni ? round_even(BQ) : BQ;
    auto zcol = scratch<float>(drop ? BQ : 1);  // Z = keep / (1 - p) of one key column
    auto KA = scratch<pack_t>(per_chunk * BK * Dp);  // K tile as A: BK × Dp
    auto KB = scratch<pack_t>(per_chunk * BK * D);   // K tile as B: BK × D
    auto VA = scratch<pack_t>(per_chunk * BK * Dvp);  // V tile as A: BK × Dvp
    auto dKacc = scratch<float>(per_chunk * BK * D);
    auto dVacc = scratch<float>(per_chunk * BK * Dv);
    auto QtB = scratch<pack_t>(Dp * BQ);   // Qᵀ as B: Dp × BQ
    auto QB = scratch<pack_t>(mp * D);     // Q as B: BQ × D
    auto dOtB = scratch<pack_t>(Dvp * BQ);  // dOᵀ as B: Dvp × BQ
    auto dOB = scratch<pack_t>(mp * Dv);   // dO as B: BQ × Dv
    auto ST = scratch<float>(BK * BQ);     // Sᵀ, then Pᵀ (fp32)
    auto dPT = scratch<float>(BK * BQ);    // dPᵀ, then dSᵀ (fp32)
    auto PTb = scratch<pack_t>(vnni ? BK * mp : 1);
    auto dSTb = scratch<pack_t>(vnni ? BK * mp : 1);
    auto dSb = scratch<pack_t>(BQ * BK);  // dS as A: BQ × BK
    auto dqacc = scratch<float>(BQ * D);
    auto lse_eff = scratch<float>(BQ);
    auto colshift = scratch<float>(BQ);
    auto tiles = scratch<int64_t>(per_chunk);
    auto states = scratch<int8_t>(per_chunk);
    for (int64_t t = claim(); t < n_tasks; t = claim()) {
      const int64_t b = t / (Hkv * n_chunks), hk = (t / n_chunks) % Hkv, ch = t % n_chunks;
      const int64_t kt0 = ch * per_chunk, kt1 = std::min(nK, kt0 + per_chunk);
      float* dq_part = p.dq_part + ch * (B * Hq * Lq * D);
      for (int64_t kt = kt0; kt < kt1; ++kt) {
        const int64_t k0 = kt * BK, n = std::min(BK, Lk - k0), c = kt - kt0;
        const scalar_t* kb = K + b * p.k_s[0] + hk * p.k_s[1] + k0 * p.k_s[2];
        const scalar_t* vb = V + b * p.v_s[0] + hk * p.v_s[1] + k0 * p.v_s[2];
        pack_a(kb, p.k_s[2], p.k_s[3], n, D, Dp, KA.get() + c * BK * Dp);
        pack_b(kb, p.k_s[2], p.k_s[3], n, D, BK, D, KB.get() + c * BK * D);
        pack_a(vb, p.v_s[2], p.v_s[3], n, Dv, Dvp, VA.get() + c * BK * Dvp);
      }
      std::fill(dKacc.get(), dKacc.get() + per_chunk * BK * D, 0.f);
      std::fill(dVacc.get(), dVacc.get() + per_chunk * BK * Dv, 0.f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t qt = 0; qt < nQ; ++qt) {
          const int64_t q0 = qt * BQ, m = std::min(BQ, Lq - q0);
          const int64_t mpad = vnni ? round_even(m) : m;
          float* dqp = dq_part + ((b * Hq + h) * Lq + q0) * D;
          int64_t nt = 0;
          for (int64_t kt = kt0; kt < kt1; ++kt) {
            const int8_t st = tile_state(p, mstate, ms_s, b, h, qt, kt);
            if (st != kEmpty) {
              tiles[nt] = kt;
              states[nt++] = st;
            }
          }
          if (nt == 0) {
            std::fill(dqp, dqp + m * D, 0.f);
            continue;
          }
          const scalar_t* qb = Q + b * p.q_s[0] + h * p.q_s[1] + q0 * p.q_s[2];
          const scalar_t* gb = dO + b * p.do_s[0] + h * p.do_s[1] + q0 * p.do_s[2];
          pack_b(qb, p.q_s[3], p.q_s[2], D, m, Dp, BQ, QtB.get());
          pack_b(qb, p.q_s[2], p.q_s[3], m, D, mpad, D, QB.get());
          pack_b(gb, p.do_s[3], p.do_s[2], Dv, m, Dvp, BQ, dOtB.get());
          pack_b(gb, p.do_s[2], p.do_s[3], m, Dv, mpad, Dv, dOB.get());
          const float* lse = p.lse_in + (b * Hq + h) * Lq + q0;
          const float* delta = p.delta + (b * Hq + h) * Lq + q0;
          // A row that attends nothing has lse = -inf: +inf makes its P exactly 0.
          for (int64_t r = 0; r < m; ++r)
            lse_eff[r] = lse[r] == kNegInf ? std::numeric_limits<float>::infinity() : lse[r];
          std::fill(dqacc.get(), dqacc.get() + m * D, 0.f);
          for (int64_t it = 0; it < nt; ++it) {
            const int64_t kt = tiles[it], k0 = kt * BK, n = std::min(BK, Lk - k0), c = kt - kt0;
            const int64_t npad = vnni ? round_even(n) : n;
            gemm(brg, n, m, Dp, KA.get() + c * BK * Dp, Dp, QtB.get(), BQ, ST.get(), BQ, false);
            gemm(brg, n, m, Dvp, VA.get() + c * BK * Dvp, Dvp, dOtB.get(), BQ, dPT.get(), BQ, false);
            for (int64_t j = 0; j < n; ++j) {
              const int64_t key = k0 + j;
              // Rows whose band contains this key: key - off - right <= i <= key - off + left.
              const int64_t i_lo = p.right >= 0 ? key - p.q_offset - p.right : q0;
              const int64_t i_hi = p.left >= 0 ? key - p.q_offset + p.left : q0 + m - 1;
              const int64_t r0 = std::clamp<int64_t>(i_lo - q0, 0, m), r1 = std::clamp<int64_t>(i_hi - q0 + 1, 0, m);
              float* s = ST.get() + j * BQ;
              float* dp = dPT.get() + j * BQ;
              std::fill(s, s + r0, 0.f);
              std::fill(s + std::max(r0, r1), s + mpad, 0.f);
              std::fill(dp, dp + r0, 0.f);
              std::fill(dp + std::max(r0, r1), dp + mpad, 0.f);
              if (r0 >= r1) continue;
              // Pᵀ = exp(Sᵀ·scale + mask − lse): the mask column (strided over queries) is gathered
              // into the lse shift first, so the exponentials stay vectorised.
              const float* shift = lse_eff.get();
              if (states[it] != kFull && p.mask_kind != kMaskNone) {
                const int64_t mbase = b * p.m_s[0] + h * p.m_s[1] + (q0 + r0) * p.m_s[2] + key * p.m_s[3];
                if (p.mask_kind == kMaskBool) {
                  const bool* mk = static_cast<const bool*>(p.mask) + mbase;
                  for (int64_t r = r0; r < r1; ++r)
                    colshift[r] = mk[(r - r0) * p.m_s[2]] ? lse_eff[r] : std::numeric_limits<float>::infinity();
                } else {
                  const float* mk = static_cast<const float*>(p.mask) + mbase;
                  for (int64_t r = r0; r < r1; ++r) {
                    const float add = mk[(r - r0) * p.m_s[2]];
                    // -inf in the mask: P = 0 exactly (never inf - inf).
                    colshift[r] = add == kNegInf ? std::numeric_limits<float>::infinity() : lse_eff[r] - add;
                  }
                }
                shift = colshift.get();
              }
              {
                const int64_t vs = Vec::size();
                const Vec vscale(p.scale);
                int64_t r = r0;
                for (; r + vs <= r1; r += vs)
                  at::vec::fmsub(Vec::loadu(s + r), vscale, Vec::loadu(shift + r)).exp_u20().store(s + r);
                if (r < r1)
                  at::vec::fmsub(Vec::loadu(s + r, r1 - r), vscale, Vec::loadu(shift + r, r1 - r))
                      .exp_u20()
                      .store(s + r, r1 - r);
              }
              // dSᵀ = Pᵀ ∘ (dPᵀ − delta), in place over dPᵀ.
              const int64_t vs = Vec::size();
              int64_t r = r0;
              if (drop) {  // dSᵀ = Pᵀ ∘ (dPᵀ ∘ Z − delta), then Pᵀ ∘ Z for dV
                philox::keep_scale(rng, philox::element(rng, b * Hq + h, q0 + r0, key), static_cast<uint64_t>(Lk),
                                   r1 - r0, keep_value, zcol.get() + r0);
                const float* z = zcol.get();
                for (; r + vs <= r1; r += vs) {
                  const Vec vp = Vec::loadu(s + r), vz = Vec::loadu(z + r);
                  (vp * at::vec::fmsub(Vec::loadu(dp + r), vz, Vec::loadu(delta + r))).store(dp + r);
                  (vp * vz).store(s + r);
                }
                for (; r < r1; ++r) {
                  dp[r] = s[r] * (dp[r] * z[r] - delta[r]);
                  s[r] *= z[r];
                }
              } else {
                for (; r + vs <= r1; r += vs)
                  (Vec::loadu(s + r) * (Vec::loadu(dp + r) - Vec::loadu(delta + r))).store(dp + r);
                for (; r < r1; ++r) dp[r] = s[r] * (dp[r] - delta[r]);
              }
            }
            if (p.dmask != nullptr) {
              float* dm = p.dmask + ((b * Hq + h) * Lq + q0) * Lk + k0;
              for (int64_t r = 0; r < m; ++r)
                for (int64_t j = 0; j < n; ++j) dm[r * Lk + j] = dPT[j * BQ + r];
            }
            const pack_t* PTa;
            const pack_t* dSTa;
            int64_t ldt;
            if constexpr (vnni) {
              for (int64_t j = 0; j < n; ++j) {
                at::vec::convert(ST.get() + j * BQ, PTb.get() + j * mpad, mpad);
                at::vec::convert(dPT.get() + j * BQ, dSTb.get() + j * mpad, mpad);
              }
              PTa = PTb.get();
              dSTa = dSTb.get();
              ldt = mpad;
            } else {
              PTa = ST.get();
              dSTa = dPT.get();
              ldt = BQ;
            }
            gemm(brg, n, Dv, mpad, PTa, ldt, dOB.get(), Dv, dVacc.get() + c * BK * Dv, Dv, true);
            gemm(brg, n, D, mpad, dSTa, ldt, QB.get(), D, dKacc.get() + c * BK * D, D, true);
            // dS (m × npad) as A, from dSᵀ.
            for (int64_t r = 0; r < m; ++r) {
              pack_t* d = dSb.get() + r * BK;
              for (int64_t j = 0; j < n; ++j) d[j] = from_f<pack_t>(dPT[j * BQ + r]);
              for (int64_t j = n; j < npad; ++j) d[j] = from_f<pack_t>(0.f);
            }
            gemm(brg, m, D, npad, dSb.get(), BK, KB.get() + c * BK * D, D, dqacc.get(), D, true);
          }
          for (int64_t r = 0; r < m; ++r)
            for (int64_t d = 0; d < D; ++d) dqp[r * D + d] = dqacc[r * D + d] * p.scale;
        }
      }
      scalar_t* dk = static_cast<scalar_t*>(p.dk);
      scalar_t* dv = static_cast<scalar_t*>(p.dv);
      for (int64_t kt = kt0; kt < kt1; ++kt) {
        const int64_t k0 = kt * BK, n = std::min(BK, Lk - k0), c = kt - kt0;
        scalar_t* dkr = dk + ((b * Hkv + hk) * Lk + k0) * D;
        scalar_t* dvr = dv + ((b * Hkv + hk) * Lk + k0) * Dv;
        const float* ka = dKacc.get() + c * BK * D;
        const float* va = dVacc.get() + c * BK * Dv;
        for (int64_t x = 0; x < n * D; ++x) dkr[x] = from_f<scalar_t>(ka[x] * p.scale);
        for (int64_t x = 0; x < n * Dv; ++x) dvr[x] = from_f<scalar_t>(va[x]);
      }
    }
    release_brgemm(brg);
  });

  // dQ = the sum of the chunks' partials, in chunk order.
  scalar_t* dq = static_cast<scalar_t*>(p.dq);
  const int64_t total = B * Hq * Lq * D, stride = total;
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      float acc = p.dq_part[x];
      for (int64_t ch = 1; ch < n_chunks; ++ch) acc += p.dq_part[ch * stride + x];
      dq[x] = from_f<scalar_t>(acc);
    }
  });
}

void fwd_entry(const AttnParams& p) {
  if (!p.bf16)
    attn_fwd<float, float>(p);
  else if (p.bf16_brgemm)
    attn_fwd<BFloat16, BFloat16>(p);
  else
    attn_fwd<BFloat16, float>(p);
}

void bwd_entry(const AttnParams& p) {
  if (!p.bf16)
    attn_bwd<float, float>(p);
  else if (p.bf16_brgemm)
    attn_bwd<BFloat16, BFloat16>(p);
  else
    attn_bwd<BFloat16, float>(p);
}

// Runs brgemm on a small odd-sized problem and compares with a plain loop.
bool brgemm_selftest(bool bf16) {
  try {
    const int64_t M = 5, N = 7, K = 6;
    float a[M * K], b[K * N], ref[M * N], c[M * N];
    for (int64_t x = 0; x < M * K; ++x) a[x] = static_cast<float>((x * 7) % 11) - 5.f;
    for (int64_t x = 0; x < K * N; ++x) b[x] = static_cast<float>((x * 5) % 13) - 6.f;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += a[i * K + k] * b[k * N + j];
        ref[i * N + j] = s;
      }
    if (bf16) {
      BFloat16 ab[M * K], bb[K * N];
      for (int64_t x = 0; x < M * K; ++x) ab[x] = BFloat16(a[x]);
      pack_b(b, N, 1, K, N, K, N, bb);
      gemm(true, M, N, K, ab, K, bb, N, c, N, false);
    } else {
      gemm(true, M, N, K, a, K, b, N, c, N, false);
    }
    at::native::cpublas::brgemm_release(bf16);
    for (int64_t x = 0; x < M * N; ++x)
      if (c[x] != ref[x]) return false;
    return true;
  } catch (...) {
    return false;
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fastattn_cpu

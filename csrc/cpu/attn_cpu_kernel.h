// Fused attention forward and backward on the CPU, compiled once per instruction set.
//
// Design note
// -----------
// FLOPs: forward 4·B·Hq·Lq·Lk·D over the attended tiles (QKᵀ and PV); backward 2.5× that
// (5 GEMMs: recompute Sᵀ, dV, dPᵀ, dK, dQ). Minimum bytes: q, k, v, out once (plus the mask's
// own size when one is given), so at D = 64 the work is compute bound by a wide margin (about
// 64 FLOPs per byte per key tile); the bound to reach is the core's fp32 FMA rate (measured
// below), and with a native bf16 dot (avx512_bf16, AMX) about twice that in bf16.
//
// Tiling (FlashAttention-2 style): a task is (batch, query head, query tile of BQ rows); it
// walks the non-empty key tiles of BK keys, keeping the running max m, the running sum l and
// an fp32 accumulator BQ × Dv in L1/L2. S = scale·Q Kᵀ and P V go through the register-blocked
// fp32 micro-kernel of attn_cpu_gemm.h (6 × 16 in AVX2, 8 × 32 in AVX-512), whose epilogues also
// take each score row's maximum (no separate max pass) and rescale the accumulator by alpha (no
// separate rescale pass); bf16 on a CPU with a native bf16 dot goes through oneDNN's brgemm (VNNI
// pairs; the AVX-512 build only). K and V are packed once per call into GEMM-ready panels (Kᵀ per
// tile), converted to fp32 on the way for bf16 (no native dot) and float16, which is also what makes
// any input stride work and what lets GQA share a kv head's packed tiles between its query heads
// without a copy per head. Softmax is fp32 and vectorised (exp2_vec, a 12-operation 2^x); P is
// rounded to bf16 only as the native-bf16 PV GEMM's input. Scratch is O(BQ·BK + BQ·Dv) per thread
// plus the packed K/V (O(Lk·D)): no Lq × Lk buffer.
//
// Where the time goes (benchmarks/cpu_kernel_phases.py, 2026-12-04: AMD EPYC (Zen 4), 2 cores shared
// with other jobs, so one thread's CPU time rather than wall time; dense forward B = 1, H = 8, L = 2048,
// D = 64; two rounds, ranges are their spread):
//
//   The bound. The core's fp32 FMA peak is 117 GFLOP/s under AVX2 and AVX-512 alike (Zen 4 runs a
//   512-bit FMA as two 256-bit halves). torch.mm fp32 2048³ (MKL, which takes a generic path on AMD)
//   reaches 90-95 capped to AVX2 and 75-89 under AVX-512: "the fp32 matmul peak" is ~80% of the FMA
//   peak here, so the FMA peak is the stricter yardstick and the one quoted below.
//
//   Before (brgemm for every GEMM, exp_u20, a max pass over the scores, a rescale pass over the
//   accumulator), the AVX2 build ran the forward at 85-86 GFLOP/s (73% of the FMA peak, 0.87-0.91x
//   torch.mm), the backward at 85-88. The GEMMs were the cause: brgemm JITed for AVX2 ran S = QKᵀ
//   (64 × 256 × 64, B plain with ldb = 256) at 85-86 GFLOP/s (73%) and PV at 96-112 (82-96%); its
//   AVX-512 code reaches 105-114 and 111-117. Our 6 × 16 micro-kernel on packed panels reaches 113-114
//   on S alone (97%): the shape is fine; brgemm's AVX2 code and the plain B layout (ldb = 1 KB: every
//   k-step a new cache line of the same few L1 sets) are not.
//
//   Now, one 64 × 256 tile of the AVX2 build, phases timed alone:
//     S = scale·QKᵀ with row maxima (kScaleMax)   46% of the tile   111 GFLOP/s (95% of the FMA peak)
//     PV with the alpha rescale (kScaleAdd)        44%               116 GFLOP/s (99%)
//     exp pass (exp2_vec, row sums, P stored)      10%               0.25 ns per score (exp_u20: 0.34)
//     K/V packing, shared by the 32 query tiles    0.7%              0.27 ns per element fp32, 0.18 bf16
//                                                                    and fp16 (vcvtph2ps; at::vec's
//                                                                    generic Half loop took 0.45-1.0)
//   A separate max pass would cost 0.07 ns per score (2.8% of the tile); in the S epilogue it costs the
//   GEMM about 2.5% of its own time (97% -> 95%). Tile model: 102 GFLOP/s (87% of the FMA peak). The
//   whole forward measures 93-97 GFLOP/s (80-83%; 0.99-1.07x torch.mm and 1.13-1.17x SDPA in the same
//   AVX2-capped process): perf puts the GEMMs at 88% of its samples (so about 92% efficient in place,
//   against 95-99% alone: key tiles arrive from L2/L3), the exp pass and per-row bookkeeping at 10%,
//   packing at 2%. bf16 and fp16 run the same fp32 tiles at 95-97 (conversion is O(L·D), the work
//   O(L²·D)); the fp32 backward at 99 (85%). AVX-512 build: S 110, PV 116, exp pass 0.15-0.17 ns per
//   score, tile model 104-105 (90%), forward 89-92, bf16 through the native dot 140-147.
//
//   The exp pass is bound by the FMA pipes (7 of its 15 vector operations: the scaling FMA, five
//   polynomial FMAs, the 2^n product), so what is left lives there; a degree-4 polynomial would save
//   one of them at about 30 ulp of error, not taken.
//
//   Threads: 2 threads, wall clock, dense fp32 forward: 182-189 GFLOP/s (AVX2) and 185-192 (AVX-512),
//   1.9-2.0x one thread's CPU-time rate. Tasks (batch, head, query tile; 256 here) are claimed
//   dynamically, so a core slowed by another process takes fewer of them; OMP_WAIT_POLICY=passive
//   made no consistent difference (AVX2 47.0/46.5 ms against 45.4 ms and one 96 ms run under load with
//   OpenMP's default spinning; AVX-512 44.8/46.0 against 46.5/46.0).
//
// Dropout (attn_cpu_dropout.h, the GPU backends' Philox contract bit for bit): the forward zeroes the
// dropped probabilities of each row of P before the PV GEMM (the row sum l and the lse stay undropped)
// and scales the output by 1 / (1 - p); the backward regenerates the same bits per key column of Pᵀ and
// applies dP ∘ Z and P ∘ Z (Z = keep / (1 - p)), as fastattn.reference.attention_backward states it.
//
// Variants (csrc/attn_rules.h, the rules shared with the CUDA kernels): the band and the chunk bound each
// row's keys (rules::row_bounds) and decide tile states; in the forward the S micro-kernel multiplies by
// scale / softcap (the tanh's inner factor) and a softcap or ALiBi then forms each row's scores in one
// vectorised pass in the same tile (score_row: tanh through one power of 2, ALiBi from an iota of positions),
// the row max still the GEMM's epilogue's where only the (monotone) softcap changed the scores; the backward
// takes each key column's scores, probabilities and dS in one pass (bwd_col), 1 - tanh² from the same r. A sink joins
// each row's (max, sum) once after its last tile (rules::add_sink) and its gradient is computed in Python
// from out, lse and dO. Every ISA build and tile type runs the same code, but for the softcap's powers of 2
// and reciprocal (AVX-512 and AVX2 instructions where they pay, softcap_r).
//
// What the variants cost (benchmarks/cpu_variants.py --clock thread, 2026-12-05, L = 2048, AVX-512;
// results/cpu-variants-*): sinks nothing measurable (one add_sink per row). Chunk is no slower than the same
// attention computed without it (each chunk a batch entry), and with a chunk that is a multiple of 256 the dense
// 64 x 256 tiles are kept (block_sizes). ALiBi +3-7% forward, +3-4% forward+backward: off the diagonal its bias
// is linear in the key (kLinearAlibi: a column term per tile, a row term in the exp pass's subtrahend, one add
// per score), on it the |distance| is formed in the exp pass after a read-only max pass. The softcap +3-8%
// forward, +5-8% forward+backward (results/cpu-variants-softcap-bwd-2026-12-05): its tanh costs about what the
// softmax's exp does per score, so it takes the short forms (vreduceps/vscalefps powers of 2 with no clamps, the
// 1 - 2r folded into the exp pass's FMA, the rows' maxima capped together, no scale pass on bf16 tiles), and the
// backward forms a key column's P and dS in the pass that forms its scores (bwd_col: before it, four passes over
// the column, and bf16 forward+backward +10-15%). Every row is within issue #19's 10%; the nearest are the dense
// forwards and bf16's dense forward+backward (+7-8%), where the tanh's own operations are what is left. The AVX2
// build (8 lanes, exp2_vec's 12-operation powers for both exponentials) is above it: +17-19% forward, +9-14%
// forward+backward.
//
// Tile skipping: a (query tile, key tile) pair is EMPTY (skipped), PARTIAL (mask read per
// element) or FULL (no mask read). Causal, window, chunk and q_offset are analytic; a mask tensor
// contributes a per-tile state, either passed in (fastattn.Mask's cached summary) or built here
// by one vectorised pass over the mask's own (non-broadcast) elements.
//
// Backward: a task is (batch, kv head, chunk of key tiles); it holds dK, dV for its keys in fp32,
// loops over the query heads of its GQA group and the query tiles, recomputes Pᵀ from the saved
// lse, and adds its dQ contribution to a per-chunk fp32 buffer (formed as dQᵀ += Kᵀ·dSᵀ, so that
// dSᵀ, already in memory, is the micro-kernel's B operand: no per-tile transpose of dS). Chunks depend on the problem
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
#include "attn_cpu_gemm.h"
#include "attn_cpu_params.h"

namespace fastattn_cpu {
namespace CPU_CAPABILITY {
namespace {

using c10::BFloat16;
using c10::Half;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.44269504088896341f;

template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// ---------------------------------------------------------------- bf16 GEMM (native dot)

// C (M × N, ldc) = (add ? C : 0) + A (M × K, lda) · B, B in VNNI pairs [K/2][N][2] (K even), through
// oneDNN's brgemm: only where the CPU has a native bf16 dot (avx512_bf16, AMX) and the self-test at
// load passed. Everything else (fp32, float16, bf16 without a native dot) runs attn_cpu_gemm.h's fp32
// micro-kernel on converted tiles.
inline void gemm_vnni(int64_t M, int64_t N, int64_t K, const BFloat16* A, int64_t lda, const BFloat16* Bm,
                      int64_t ldb, float* C, int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, Bm, C, true);
}

// ---------------------------------------------------------------- packing (native-bf16 path)

// The fp32 tiles' packing is attn_cpu_gemm.h's (pack_panels, pack_rows); these two lay out the bf16
// operands brgemm reads.

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

// The identity score transform of exp_store (the scores are final).
struct AsIs {
  Vec operator()(const Vec& v, int64_t) const { return v; }
};

// exp_store's 2^x: exact zeros for -inf.
struct Exp2 {
  Vec operator()(const Vec& x) const { return exp2_vec(x); }
};

// out[j] = exp(f(x)[j] * mul - sub) converted to out_t, two vectors at a time (one bf16 vector);
// returns the fp32 sum. Computed as 2^(f(x)·mul·log2 e − sub·log2 e) with exp2 (exp2_vec, attn_cpu_gemm.h).
// f(v, j) maps the vector of x at j to its scores: the softcap's or ALiBi's pass fused into this one.
template <typename out_t, typename F = AsIs, typename E = Exp2>
inline float exp_store(const float* x, int64_t n, float mul, float sub, out_t* out, const F& f = F(),
                       const E& exp2 = E()) {
  const int64_t vs = Vec::size();
  const Vec vmul(mul * kLog2e), vsub(sub * kLog2e), zero(0.f);
  Vec sum0(0.f), sum1(0.f);
  int64_t j = 0;
  for (; j + 2 * vs <= n; j += 2 * vs) {
    const Vec e0 = exp2(at::vec::fmsub(f(Vec::loadu(x + j), j), vmul, vsub));
    const Vec e1 = exp2(at::vec::fmsub(f(Vec::loadu(x + j + vs), j + vs), vmul, vsub));
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
    const Vec e0 = Vec::set(zero, exp2(at::vec::fmsub(f(Vec::loadu(x + j, c0), j), vmul, vsub)), c0);
    const Vec e1 =
        c1 > 0 ? Vec::set(zero, exp2(at::vec::fmsub(f(Vec::loadu(x + j + vs, c1), j + vs), vmul, vsub)), c1)
               : zero;
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

// The softcap's tanh, by csrc/attn_rules.h's formula tanh(x) = 1 - 2 r, r = 1 / (e^{2x} + 1) (exact at the
// saturated ends, about 1e-7 absolute near 0). softcap_r gives r, so that the forward's exp pass folds the
// 1 - 2 r and the outer factor into the FMA it already does (softcap_exp_store); tanh_vec gives the tanh.
// The reciprocal is the ISA's approximate one plus a Newton step (rcp14: 2^-28 relative after it; AVX2's rcp:
// about 2^-23) instead of a division, whose throughput is a fraction of the FMA pipes'. e^{2x} on AVX-512 is
// softcap_r512's; elsewhere exp2_vec with its input capped at 64 (2 / (2^64 + 1) already rounds tanh to 1).
// The softcap's cost per score is what issue #19's 10% bar measures: on Zen 4 the 512-bit operations issue
// about one a cycle, so it is their count that costs (measured: four vectors in lockstep gained nothing).
// NaN stays NaN.
#if defined(CPU_CAPABILITY_AVX512)
// 2^y = 2^floor(y) · p(y - floor(y)), the fraction from vreduceps and the power from vscalefps: 7 operations
// against exp2_vec's 12 (whose bit-built power needs the -127 clamp to give exact zeros), and no clamp: vreduceps
// gives 0 for ±inf and vscalefps scales by 2^-inf = 0 and 2^inf = inf (an exact 0 for -inf, a masked score), the
// underflow below -149 rounds to 0, and NaN stays NaN. p of degree 5 on [0, 1), 1.6e-7 relative in fp32
// (exp2_vec's accuracy). A shorter p and no Newton step in softcap_r512 for bf16 probabilities (their row sums
// and the lse stay fp32) put the lse 6e-5 off the oracle where the tests allow 2.6e-5.
inline __m512 pow2_512(__m512 y) {
  const __m512 f = _mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // y - floor(y)
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.0018776348f), f, _mm512_set1_ps(0.0089894049f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.055826042f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24015382f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69315302f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99999994f));
  return _mm512_scalef_ps(p, y);
}

// r for y = 2x·log2 e, capped at 64 (2 / (2^64 + 1) already rounds tanh to 1), where d = inf would make the
// Newton step inf·0; no floor is needed (y = -inf: d = 1, r = 1).
inline __m512 softcap_r512(__m512 y) {
  y = _mm512_min_ps(_mm512_set1_ps(64.f), y);  // NaN: the 2nd operand
  const __m512 d = _mm512_add_ps(pow2_512(y), _mm512_set1_ps(1.f));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));  // Newton: r (2 - d r)
}

// 2^x for the softcap's exp passes (and the backward's ALiBi one).
struct Exp2Scalef {
  Vec operator()(const Vec& x) const { return Vec(pow2_512(x)); }
};
#endif

// r for y = 2x·log2 e (the caller's factor, which it may fold into one of its own).
inline Vec softcap_r_of2(const Vec& y) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(softcap_r512(y));
#elif defined(CPU_CAPABILITY_AVX2)
  const Vec d = exp2_vec(Vec(_mm256_min_ps(Vec(64.f), y))) + Vec(1.f);  // min(cap, NaN) is NaN: the 2nd operand
  const Vec r(_mm256_rcp_ps(d));
  return r * at::vec::fnmadd(d, r, Vec(2.f));  // Newton: r (2 - d r)
#else
  return Vec(1.f) / (exp2_vec(at::vec::minimum(y, Vec(64.f))) + Vec(1.f));
#endif
}

inline Vec softcap_r(const Vec& x) { return softcap_r_of2(x * Vec(2.f * kLog2e)); }

inline Vec tanh_vec(const Vec& x) { return at::vec::fnmadd(Vec(2.f), softcap_r(x), Vec(1.f)); }

// out[j] = exp(mul·r(in·x[j]) - sub) as exp_store does it, r = softcap_r: the softcap's fused exp pass. in
// is the scale still to apply to x (the bf16 GEMM leaves these tiles' scores unscaled: one pass fewer).
template <typename out_t>
inline float softcap_exp_store(const float* x, int64_t n, float in, float mul, float sub, out_t* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const Vec vin(in * 2.f * kLog2e);
  return exp_store(
      x, n, mul, sub, out, [&vin](const Vec& v, int64_t) { return Vec(softcap_r512(v * vin)); }, Exp2Scalef());
#else
  const Vec vin(in);
  return exp_store(x, n, mul, sub, out, [&vin](const Vec& v, int64_t) { return softcap_r(v * vin); });
#endif
}

// The score of one vector of n lanes of dot products: csrc/attn_rules.h's order (rules::scaled_score with
// tanh_vec: s = pre·x, or post·tanh(pre·x) with a softcap, then ALiBi's -slope * |dist|, dist being each
// lane's query position minus its key). Whole vectors take the plain loads and stores.
inline void score_vec(const fastattn::rules::ScoreScale& sc, float slope, const Vec& dist, int64_t n, float* s) {
  const bool whole = n == Vec::size();
  Vec x = (whole ? Vec::loadu(s) : Vec::loadu(s, n)) * Vec(sc.pre);
  if (sc.softcap) x = tanh_vec(x) * Vec(sc.post);
  if (slope != 0.f) x = at::vec::fmadd(dist.abs(), Vec(-slope), x);
  whole ? x.store(s) : x.store(s, n);
}

// Scores of one row of a tile, s[c] for keys k0 + c, c in [c0, c1), in place (see score_vec), query position
// pos. One vectorised pass; called only when there is a softcap or ALiBi (otherwise the GEMM's factor is all).
inline void score_row(const fastattn::rules::ScoreScale& sc, float slope, int64_t pos, int64_t k0, int64_t c0,
                      int64_t c1, float* s) {
  const int64_t vs = Vec::size();
  const Vec iota = Vec::arange(0.f, 1.f);
  for (int64_t c = c0; c < c1; c += vs)
    score_vec(sc, slope, Vec(static_cast<float>(pos - k0 - c)) - iota, std::min<int64_t>(vs, c1 - c), s + c);
}

// The backward's elementwise work on one key's column of Sᵀ and dPᵀ where a softcap or ALiBi forms the scores,
// rows r in [r0, r1) at positions base + r (base = q0 + q_offset - key for ALiBi's distance), in one vectorised
// pass that reads and writes each of the two columns once: s (the raw dot products) becomes Pᵀ (times Z with
// dropout: z, the column's keep / (1 - p), or null) and dp (dPᵀ) becomes dSᵀ = Pᵀ ∘ (dPᵀ (∘ Z) − delta), times
// the softcap's 1 - tanh² = 4r(1 - r) (r = softcap_r's, tanh = 1 - 2r). shift is the lse in base-2 units, less
// post·log2 e with a softcap, so that the 1 - 2r and both outer factors fold into the exponent's one FMA as in
// the forward's exp pass (softcap_exp_store). dmask, when given, is the float mask's gradient column (rows ld
// apart): dS after the softcap, before its 1 - tanh² factor (the mask is added after the softcap).
template <bool kCap, bool kAlibi>
inline void bwd_col(const fastattn::rules::ScoreScale& sc, float slope, int64_t base, int64_t r0, int64_t r1,
                    const float* shift, const float* delta, const float* z, float* dmask, int64_t ld, float* s,
                    float* dp) {
  constexpr int64_t vs = Vec::size();
  const Vec iota = Vec::arange(0.f, 1.f);
  // With a softcap: x·pre·2 log2 e into softcap_r's 2^y, and the exponent's post·log2 e·(1 - 2r) as
  // -2 post·log2 e·r (shift holds the rest); without: x·pre·log2 e.
  const Vec vin(kCap ? sc.pre * 2.f * kLog2e : sc.pre * kLog2e), vout(-2.f * sc.post * kLog2e);
  const Vec vslope(-slope * kLog2e), four(4.f);
  auto step = [&](int64_t r, int64_t cnt) {
    const bool whole = cnt == vs;
    auto load = [whole, cnt](const float* x) { return whole ? Vec::loadu(x) : Vec::loadu(x, cnt); };
    const Vec x = load(s + r) * vin;
    Vec y, rv;
    if constexpr (kCap) {
      rv = softcap_r_of2(x);
      y = at::vec::fmsub(rv, vout, load(shift + r));
    } else {
      y = x - load(shift + r);
    }
    if constexpr (kAlibi) y = at::vec::fmadd((Vec(static_cast<float>(base + r)) + iota).abs(), vslope, y);
#if defined(CPU_CAPABILITY_AVX512)
    const Vec pv = Exp2Scalef()(y);  // -inf (a masked or empty row's +inf shift): an exact 0
#else
    const Vec pv = exp2_vec(y);
#endif
    const Vec vd = load(delta + r);
    Vec ds = pv * (z != nullptr ? at::vec::fmsub(load(dp + r), load(z + r), vd) : load(dp + r) - vd);
    if (dmask != nullptr) {
      float lanes[vs];
      ds.store(lanes);
      for (int64_t l = 0; l < cnt; ++l) dmask[(r + l) * ld] = lanes[l];
    }
    if constexpr (kCap) ds = ds * (rv * at::vec::fnmadd(rv, four, four));
    const Vec pz = z != nullptr ? pv * load(z + r) : pv;
    if (whole) {
      ds.store(dp + r);
      pz.store(s + r);
    } else {
      ds.store(dp + r, cnt);
      pz.store(s + r, cnt);
    }
  };
  int64_t r = r0;
  for (; r + vs <= r1; r += vs) step(r, vs);
  if (r < r1) step(r, r1 - r);
}

// The maximum over c in [0, n) of x[c] + y[c] (y readable a whole vector past n).
inline float max_sum(const float* x, const float* y, int64_t n) {
  const int64_t vs = Vec::size();
  Vec vm(kNegInf);
  int64_t j = 0;
  for (; j + vs <= n; j += vs) vm = at::vec::maximum(vm, Vec::loadu(x + j) + Vec::loadu(y + j));
  if (j < n) vm = at::vec::maximum(vm, Vec::set(Vec(kNegInf), Vec::loadu(x + j, n - j) + Vec::loadu(y + j), n - j));
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
}

// The maximum over c in [0, n) of x[c] - slope * |base - c - lane|: one ALiBi row's max, read only (the exp
// pass then forms the same scores again, cheaper than storing them).
inline float max_alibi(const float* x, int64_t n, float base, float slope) {
  const int64_t vs = Vec::size();
  const Vec iota = Vec::arange(0.f, 1.f), vslope(-slope);
  Vec vm(kNegInf);
  int64_t j = 0;
  for (; j + vs <= n; j += vs)
    vm = at::vec::maximum(vm, at::vec::fmadd((Vec(base - j) - iota).abs(), vslope, Vec::loadu(x + j)));
  if (j < n) {
    const Vec v = at::vec::fmadd((Vec(base - j) - iota).abs(), vslope, Vec::loadu(x + j, n - j));
    vm = at::vec::maximum(vm, Vec::set(Vec(kNegInf), v, n - j));
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
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
  int8_t st = fastattn::rules::tile_state(p.variant, q0, q1, k0, k1, p.Lk);
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

// Elements (of pack_t) of one key tile's packed Kᵀ and V, as the forward's GEMMs read them: fp32
// panels of the micro-kernel (attn_cpu_gemm.h), or brgemm's VNNI pairs on the native-bf16 path.
template <bool vnni>
inline int64_t fwd_k_elems(const AttnParams& p) {
  return vnni ? round_even(p.D) * p.BK : panel_elems(p.D, p.BK);
}
template <bool vnni>
inline int64_t fwd_v_elems(const AttnParams& p) {
  return vnni ? p.BK * p.Dv : panel_elems(p.BK, p.Dv);
}

// Packs key tile kt of (b, hk): Kᵀ (D × n) then V (n × Dv), converted to pack_t, zero-padded.
template <typename scalar_t, typename pack_t>
void fwd_pack_kv(const AttnParams& p, int64_t b, int64_t hk, int64_t kt, pack_t* dst) {
  constexpr bool vnni = std::is_same<pack_t, BFloat16>::value;
  const int64_t k0 = kt * p.BK, n = std::min(p.BK, p.Lk - k0);
  const scalar_t* kb = static_cast<const scalar_t*>(p.k) + b * p.k_s[0] + hk * p.k_s[1] + k0 * p.k_s[2];
  const scalar_t* vb = static_cast<const scalar_t*>(p.v) + b * p.v_s[0] + hk * p.v_s[1] + k0 * p.v_s[2];
  if constexpr (vnni) {
    pack_b(kb, p.k_s[3], p.k_s[2], p.D, n, round_even(p.D), p.BK, dst);
    pack_b(vb, p.v_s[2], p.v_s[3], n, p.Dv, p.BK, p.Dv, dst + fwd_k_elems<true>(p));
  } else {
    pack_panels(kb, p.k_s[3], p.k_s[2], p.D, n, dst);
    pack_panels(vb, p.v_s[2], p.v_s[3], n, p.Dv, dst + fwd_k_elems<false>(p));
  }
}

// S (m × n, row stride BK) = mul·Q·Kᵀ of one tile. The fp32 micro-kernel also leaves each row's
// maximum over the tile in rmax (Vec::size() lanes per row) and returns true; brgemm (bf16) cannot,
// so the caller takes the maxima itself there.
template <typename pack_t>
inline bool fwd_scores(const AttnParams& p, int64_t m, int64_t n, const pack_t* qa, const pack_t* kpk, float mul,
                       float* S, float* rmax) {
  if constexpr (std::is_same<pack_t, BFloat16>::value) {
    gemm_vnni(m, n, round_even(p.D), qa, round_even(p.D), kpk, p.BK, S, p.BK, false);
    if (mul != 1.f)
      for (int64_t r = 0; r < m; ++r) scale_inplace(S + r * p.BK, n, mul);
    return false;
  } else {
    std::fill(rmax, rmax + m * Vec::size(), kNegInf);
    gemm_f32<Out::kScaleMax>(m, n, p.D, qa, p.D, kpk, kNR, p.D * kNR, S, p.BK, nullptr, mul, rmax);
    return true;
  }
}

// acc (m × Dv) = acc·alpha[row] + P (m × n, row stride BK)·V: the online softmax's rescale rides
// on the micro-kernel's load of the accumulator (brgemm cannot, so the bf16 path scales first).
template <typename pack_t>
inline void fwd_pv(const AttnParams& p, int64_t m, int64_t n, const pack_t* P, const pack_t* vpk, const float* alpha,
                   float* acc) {
  if constexpr (std::is_same<pack_t, BFloat16>::value) {
    for (int64_t r = 0; r < m; ++r)
      if (alpha[r] != 1.f) scale_inplace(acc + r * p.Dv, p.Dv, alpha[r]);
    gemm_vnni(m, p.Dv, round_even(n), P, p.BK, vpk, p.Dv, acc, p.Dv, true);
  } else {
    gemm_f32<Out::kScaleAdd>(m, p.Dv, n, P, p.BK, vpk, kNR, n * kNR, acc, p.Dv, alpha);
  }
}

template <typename scalar_t, typename pack_t>
void attn_fwd(const AttnParams& p) {
  constexpr bool vnni = std::is_same<pack_t, BFloat16>::value;
  const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, Lq = p.Lq, Lk = p.Lk, D = p.D, Dv = p.Dv;
  const int64_t BQ = p.BQ, BK = p.BK, nQ = ceil_div(Lq, BQ), nK = ceil_div(Lk, BK), group = Hq / Hkv;
  const int64_t Dp = vnni ? round_even(D) : D;
  const int64_t kblk = fwd_k_elems<vnni>(p), blk = kblk + fwd_v_elems<vnni>(p);
  const scalar_t* Q = static_cast<const scalar_t*>(p.q);
  scalar_t* O = static_cast<scalar_t*>(p.out);
  pack_t* kvp = static_cast<pack_t*>(p.kv_pack);

  std::unique_ptr<int8_t[]> own_state;
  int64_t ms_s[4] = {0, 0, 0, 0};
  const int8_t* mstate = mask_state(p, own_state, ms_s);

  // Kᵀ and V of every key tile, packed once per call and shared by all the query tiles (and the GQA
  // group's query heads) that read them.
  at::parallel_for(0, B * Hkv * nK, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      fwd_pack_kv<scalar_t, pack_t>(p, t / (Hkv * nK), (t / nK) % Hkv, t % nK, kvp + t * blk);
  });

  const bool drop = p.dropout_p > 0.f;
  const philox::Rng rng = philox::make_rng(p.philox_seed, p.philox_offset, p.drop_Lq, p.drop_Lk, p.dropout_p);
  const float out_scale = drop ? 1.f / (1.f - p.dropout_p) : 1.f;
  const fastattn::rules::Variant& var = p.variant;
  // Scores in natural units (the CPU kernel's exp). The GEMM multiplies by sc.pre (the scale, or scale /
  // softcap); a softcap or ALiBi then takes one more pass per row, from sc_post (the softcap's outer factor).
  const fastattn::rules::ScoreScale sc = fastattn::rules::score_scale(p.scale, var, 1.f);
  const fastattn::rules::ScoreScale sc_post{1.f, sc.post, sc.softcap};
  const bool has_alibi = var.alibi != nullptr;
  const bool score_mod = sc.softcap || has_alibi;

  const int64_t n_tasks = B * Hq * nQ;
  parallel_dynamic(n_tasks, [&](const auto& claim) {
    auto keep = scratch<float>(drop ? BK : 1);
    auto qa = scratch<pack_t>(BQ * Dp);
    auto S = scratch<float>(BQ * BK);
    auto Pb = scratch<pack_t>(vnni ? BQ * BK : 1);
    auto acc = scratch<float>(BQ * Dv);
    auto mrow = scratch<float>(BQ);
    auto lrow = scratch<float>(BQ);
    auto alpha = scratch<float>(BQ);
    auto rmax = scratch<float>(BQ * Vec::size());
    auto cap_max = scratch<float>(sc.softcap ? BQ : 1);
    // ALiBi's column term on a tile on one side of the diagonal (alibi_side), padded by a vector for the
    // exp pass's whole-vector reads at a row's tail.
    auto alibi_col = scratch<float>(has_alibi ? BK + Vec::size() : 1);
    if (has_alibi) std::fill(alibi_col.get(), alibi_col.get() + BK + Vec::size(), 0.f);
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
      if (nt == 0) {  // nothing to attend: zeros, and lse -inf (or the sink's logit)
        fill_zero(orow, m * Dv);
        std::fill(lse, lse + m, var.sinks != nullptr ? fastattn::rules::sink_logit(var, h, 1.f) : kNegInf);
        continue;
      }
      const float slope = fastattn::rules::alibi_slope(var, b, h, 1.f);
      const scalar_t* qb = Q + b * p.q_s[0] + h * p.q_s[1] + q0 * p.q_s[2];
      if constexpr (vnni)
        pack_a(qb, p.q_s[2], p.q_s[3], m, D, Dp, qa.get());
      else
        pack_rows(qb, p.q_s[2], p.q_s[3], m, D, D, qa.get());
      std::fill(mrow.get(), mrow.get() + m, kNegInf);
      std::fill(lrow.get(), lrow.get() + m, 0.f);
      std::fill(acc.get(), acc.get() + m * Dv, 0.f);
      for (int64_t it = 0; it < nt; ++it) {
        const int64_t kt = tiles[it], k0 = kt * BK, n = std::min(BK, Lk - k0);
        const int64_t npad = vnni ? round_even(n) : n;
        const pack_t* kpk = kvp + ((b * Hkv + hk) * nK + kt) * blk;
        // A tile with a softcap alone and no mask to read takes the fused exp pass (kFusedCap below), which
        // scales as it goes: the bf16 GEMM then leaves its scores unscaled (cap_in = what is left to apply).
        const bool masked = states[it] != kFull && p.mask_kind != kMaskNone;
        const bool fused_cap = sc.softcap && !has_alibi && !masked;
        const float cap_in = vnni && fused_cap && sc.pre > 0.f ? sc.pre : 1.f;
        const bool have_max = fwd_scores(p, m, n, qa.get(), kpk, sc.pre / cap_in, S.get(), rmax.get());
        // ALiBi alone on a tile whose keys all lie on one side of every row's position is linear in the key:
        // -slope·|pos - key| = side·slope·c - side·slope·(pos - k0) for key = k0 + c (side 1: the keys at or
        // before every position; -1: at or after). The column term is one vector per tile (alibi_col) and the
        // row term joins the exp pass's subtrahend: one add per score instead of the |distance|'s four
        // operations, in the max pass and the exp pass. Both terms are measured from k0, so their magnitudes
        // (and roundings) are those of the distances themselves. The diagonal's tiles keep kFusedAlibi.
        int alibi_side = 0;
        if (has_alibi && !sc.softcap && !masked) {
          if (k0 + n - 1 <= q0 + var.q_offset)
            alibi_side = 1;
          else if (k0 >= q0 + m - 1 + var.q_offset)
            alibi_side = -1;
          const Vec iota = Vec::arange(0.f, 1.f), vslope(alibi_side * slope);
          for (int64_t c = 0; alibi_side != 0 && c < n; c += Vec::size())
            ((iota + Vec(static_cast<float>(c))) * vslope).store(alibi_col.get() + c);
        }
        if (fused_cap) {  // the rows' maxima, capped together: one tanh per row costs a whole key tile's 64 scores
          for (int64_t r = 0; r < m; ++r) {
            int64_t lo, hi;
            fastattn::rules::row_bounds(var, q0 + r + var.q_offset, Lk, lo, hi);
            const int64_t c0 = std::clamp<int64_t>(lo - k0, 0, n), c1 = std::clamp<int64_t>(hi - k0 + 1, 0, n);
            const float* s = S.get() + r * BK;
            // cap_in > 0: the max of the unscaled scores is the scaled ones' max, unscaled
            cap_max[r] = c0 >= c1 ? 0.f
                         : cap_in * (have_max && c0 == 0 && c1 == n ? reduce_max(rmax.get() + r * Vec::size())
                                                                    : max_of(s + c0, c1 - c0));
          }
          for (int64_t r = 0; r < m; r += Vec::size()) {
            const int64_t cnt = std::min<int64_t>(Vec::size(), m - r);
            (tanh_vec(Vec::loadu(cap_max.get() + r, cnt)) * Vec(sc.post)).store(cap_max.get() + r, cnt);
          }
        }
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = q0 + r;
          float* s = S.get() + r * BK;
          pack_t* prow = P + r * BK;
          alpha[r] = 1.f;
          int64_t lo, hi;
          fastattn::rules::row_bounds(var, i + var.q_offset, Lk, lo, hi);
          const int64_t c0 = std::clamp<int64_t>(lo - k0, 0, n), c1 = std::clamp<int64_t>(hi - k0 + 1, 0, n);
          if (c0 >= c1) {
            fill_zero(prow, npad);
            continue;
          }
          // s is pre·QKᵀ (pre = the scale, or scale / softcap; QKᵀ itself where cap_in is pre). A softcap
          // alone or ALiBi alone, where the tile needs no mask, is applied inside the exp pass (fused: no pass
          // that stores the scores); its row max comes from the raw maximum (the softcap is monotone:
          // max(cap(x)) = cap(max(x)), cap_max), from a pass of adds (ALiBi off the diagonal: kLinearAlibi) or
          // from a read-only pass (ALiBi on it). Otherwise the scores are formed in place first (score_row,
          // then the mask).
          const bool whole_row = have_max && c0 == 0 && c1 == n;
          const float base = static_cast<float>(i + var.q_offset - k0 - c0);  // ALiBi: pos - key at c0
          enum { kStored, kFusedCap, kLinearAlibi, kFusedAlibi } path = kStored;
          float row_max, alibi_row = 0.f;
          if (score_mod && !masked && !(sc.softcap && has_alibi)) {
            if (fused_cap) {
              path = kFusedCap;
              row_max = cap_max[r];
            } else if (alibi_side != 0) {
              path = kLinearAlibi;
              alibi_row = -static_cast<float>(alibi_side) * slope * static_cast<float>(i + var.q_offset - k0);
              row_max = max_sum(s + c0, alibi_col.get() + c0, c1 - c0) + alibi_row;
            } else {
              path = kFusedAlibi;
              row_max = max_alibi(s + c0, c1 - c0, base, slope);
            }
          } else {
            if (score_mod) score_row(sc_post, slope, i + var.q_offset, k0, c0, c1, s);
            if (masked) apply_mask_row(p, b, h, i, k0, c0, c1, s);
            row_max = (whole_row && !masked && !score_mod) ? reduce_max(rmax.get() + r * Vec::size())
                                                           : max_of(s + c0, c1 - c0);
          }
          // NaN stays in the rows it touches: std::max(-inf, NaN) would drop it and zero the row.
          const float m_new = std::isnan(row_max) ? row_max : std::max(mrow[r], row_max);
          if (m_new == kNegInf) {
            fill_zero(prow, npad);
            continue;
          }
          alpha[r] = mrow[r] == kNegInf ? 0.f : std::exp(mrow[r] - m_new);
          float sum;
          if (path == kFusedCap) {  // exp(post·tanh(x) - m) = exp(-2 post·r - (m - post)), r from softcap_r
            sum = softcap_exp_store(s + c0, c1 - c0, cap_in, -2.f * sc.post, m_new - sc.post, prow + c0);
          } else if (path == kLinearAlibi) {  // exp(x + column term - (m - row term))
            const float* col = alibi_col.get() + c0;
            sum = exp_store(s + c0, c1 - c0, 1.f, m_new - alibi_row, prow + c0,
                            [col](const Vec& v, int64_t j) { return v + Vec::loadu(col + j); });
          } else if (path == kFusedAlibi) {  // exp(x - slope·|pos - key| - m)
            const Vec iota = Vec::arange(0.f, 1.f), vslope(-slope);
            sum = exp_store(s + c0, c1 - c0, 1.f, m_new, prow + c0, [&](const Vec& v, int64_t j) {
              return at::vec::fmadd((Vec(base - static_cast<float>(j)) - iota).abs(), vslope, v);
            });
          } else {
            sum = exp_store(s + c0, c1 - c0, 1.f, m_new, prow + c0);
          }
          fill_zero(prow, c0);
          fill_zero(prow + c1, npad - c1);
          if (drop) {  // after the sum: l and the lse never include dropout
            philox::keep_scale(rng, philox::element(rng, b * Hq + h, i, k0 + c0), 1, c1 - c0, 1.f, keep.get());
            apply_keep(prow + c0, keep.get(), c1 - c0);
          }
          lrow[r] = lrow[r] * alpha[r] + sum;
          mrow[r] = m_new;
        }
        fwd_pv(p, m, n, P, kpk + kblk, alpha.get(), acc.get());
      }
      for (int64_t r = 0; r < m; ++r) {
        float sink_alpha = 1.f;
        if (var.sinks != nullptr)  // the sink's logit joins the row's denominator once
          sink_alpha = fastattn::rules::add_sink(fastattn::rules::sink_logit(var, h, 1.f), mrow[r], lrow[r], false);
        const float l = lrow[r];
        scale_store(acc.get() + r * Dv, Dv, l > 0.f ? sink_alpha * out_scale / l : 0.f, orow + r * Dv);
        lse[r] = std::isnan(l) ? l : (l > 0.f ? mrow[r] + std::log(l) : kNegInf);
      }
    }
    release_brgemm(vnni);
  });
}

// The forward's packed K/V scratch, in elements of its type (bf16 on the native-dot path, else fp32).
int64_t fwd_pack_elems(const AttnParams& p) {
  const int64_t tiles = p.B * p.Hkv * ceil_div(p.Lk, p.BK);
  return p.bf16_brgemm ? tiles * (fwd_k_elems<true>(p) + fwd_v_elems<true>(p))
                       : tiles * (fwd_k_elems<false>(p) + fwd_v_elems<false>(p));
}

// ---------------------------------------------------------------- backward

// One backward worker's GEMM operands and the five products of a (query tile, key tile) pair, kept
// apart from the elementwise work between them. Layouts: the fp32 micro-kernel (attn_cpu_gemm.h)
// reads A row-major and B as row-major matrices padded to whole panels (rows of ldq = BQ rounded up
// to NR, ldd, lddv), which these small row lengths allow without cache-set conflicts; dQ is formed
// transposed, dQᵀ += Kᵀ·dSᵀ, so that dSᵀ (already in memory, rows of queries) is its B operand and
// no per-tile transpose of dS is needed. The native-bf16 path keeps brgemm's VNNI layouts.
template <typename scalar_t, typename pack_t>
struct BwdOperands {
  static constexpr bool vnni = std::is_same<pack_t, BFloat16>::value;
  const AttnParams& p;
  const int64_t D, Dv, BQ, BK, Dp, Dvp, ldq, ldd, lddv, mp;
  std::unique_ptr<pack_t[]> KA, KB, VA, QtB, QB, dOtB, dOB, PTb, dSTb, dSb;
  std::unique_ptr<float[]> dqacc;  // fp32 path: dQᵀ (D × ldq); bf16 path: dQ (BQ × D)

  BwdOperands(const AttnParams& p_, int64_t per_chunk)
      : p(p_),
        D(p.D),
        Dv(p.Dv),
        BQ(p.BQ),
        BK(p.BK),
        Dp(vnni ? round_even(p.D) : p.D),
        Dvp(vnni ? round_even(p.Dv) : p.Dv),
        ldq(vnni ? p.BQ : round_up(p.BQ, kNR)),
        ldd(vnni ? p.D : round_up(p.D, kNR)),
        lddv(vnni ? p.Dv : round_up(p.Dv, kNR)),
        mp(vnni ? round_even(p.BQ) : p.BQ) {
    KA = scratch<pack_t>(per_chunk * BK * Dp);   // K tile as A: BK × Dp
    KB = scratch<pack_t>(per_chunk * BK * D);    // K tile as B (bf16), or Kᵀ as A: D × BK (fp32)
    VA = scratch<pack_t>(per_chunk * BK * Dvp);  // V tile as A: BK × Dvp
    QtB = scratch<pack_t>(Dp * ldq);             // Qᵀ as B
    QB = scratch<pack_t>(mp * ldd);              // Q as B
    dOtB = scratch<pack_t>(Dvp * ldq);           // dOᵀ as B
    dOB = scratch<pack_t>(mp * lddv);            // dO as B
    PTb = scratch<pack_t>(vnni ? BK * mp : 1);
    dSTb = scratch<pack_t>(vnni ? BK * mp : 1);
    dSb = scratch<pack_t>(vnni ? BQ * BK : 1);
    dqacc = scratch<float>(vnni ? BQ * D : D * ldq);
  }

  // Key tile c of the chunk: n keys of K and V.
  void pack_keys(int64_t c, const scalar_t* kb, const scalar_t* vb, int64_t n) {
    pack_t* ka = KA.get() + c * BK * Dp;
    pack_t* kt = KB.get() + c * BK * D;
    pack_t* va = VA.get() + c * BK * Dvp;
    if constexpr (vnni) {
      pack_a(kb, p.k_s[2], p.k_s[3], n, D, Dp, ka);
      pack_b(kb, p.k_s[2], p.k_s[3], n, D, BK, D, kt);
      pack_a(vb, p.v_s[2], p.v_s[3], n, Dv, Dvp, va);
    } else {
      pack_rows(kb, p.k_s[2], p.k_s[3], n, D, D, ka);
      pack_rows(kb, p.k_s[3], p.k_s[2], D, n, BK, kt);
      pack_rows(vb, p.v_s[2], p.v_s[3], n, Dv, Dv, va);
    }
  }

  // Query tile: m rows of Q and dO; clears the tile's dQ accumulator.
  void pack_queries(const scalar_t* qb, const scalar_t* gb, int64_t m) {
    if constexpr (vnni) {
      const int64_t mpad = round_even(m);
      pack_b(qb, p.q_s[3], p.q_s[2], D, m, Dp, BQ, QtB.get());
      pack_b(qb, p.q_s[2], p.q_s[3], m, D, mpad, D, QB.get());
      pack_b(gb, p.do_s[3], p.do_s[2], Dv, m, Dvp, BQ, dOtB.get());
      pack_b(gb, p.do_s[2], p.do_s[3], m, Dv, mpad, Dv, dOB.get());
      std::fill(dqacc.get(), dqacc.get() + m * D, 0.f);
    } else {
      pack_rows(qb, p.q_s[3], p.q_s[2], D, m, ldq, QtB.get());
      pack_rows(qb, p.q_s[2], p.q_s[3], m, D, ldd, QB.get());
      pack_rows(gb, p.do_s[3], p.do_s[2], Dv, m, ldq, dOtB.get());
      pack_rows(gb, p.do_s[2], p.do_s[3], m, Dv, lddv, dOB.get());
      std::fill(dqacc.get(), dqacc.get() + D * ldq, 0.f);
    }
  }

  // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (n × m, rows ldq apart) for key tile c.
  void transposed_scores(int64_t c, int64_t n, int64_t m, float* ST, float* dPT) {
    if constexpr (vnni) {
      gemm_vnni(n, m, Dp, KA.get() + c * BK * Dp, Dp, QtB.get(), BQ, ST, ldq, false);
      gemm_vnni(n, m, Dvp, VA.get() + c * BK * Dvp, Dvp, dOtB.get(), BQ, dPT, ldq, false);
    } else {
      gemm_f32<Out::kStore>(n, m, D, KA.get() + c * BK * D, D, QtB.get(), ldq, kNR, ST, ldq);
      gemm_f32<Out::kStore>(n, m, Dv, VA.get() + c * BK * Dv, Dv, dOtB.get(), ldq, kNR, dPT, ldq);
    }
  }

  // dV += Pᵀ·dO, dK += dSᵀ·Q (unscaled) and the tile's dQ from dSᵀ, for key tile c. PT and dST hold
  // mpad valid rows' worth of columns (zero past the band).
  void accumulate(int64_t c, int64_t n, int64_t m, const float* PT, const float* dST, float* dV, float* dK) {
    if constexpr (vnni) {
      const int64_t mpad = round_even(m), npad = round_even(n);
      for (int64_t j = 0; j < n; ++j) {
        at::vec::convert(PT + j * ldq, PTb.get() + j * mpad, mpad);
        at::vec::convert(dST + j * ldq, dSTb.get() + j * mpad, mpad);
      }
      gemm_vnni(n, Dv, mpad, PTb.get(), mpad, dOB.get(), Dv, dV, Dv, true);
      gemm_vnni(n, D, mpad, dSTb.get(), mpad, QB.get(), D, dK, D, true);
      for (int64_t r = 0; r < m; ++r) {  // dS (m × npad) as A, from dSᵀ
        BFloat16* d = dSb.get() + r * BK;
        for (int64_t j = 0; j < n; ++j) d[j] = BFloat16(dST[j * ldq + r]);
        for (int64_t j = n; j < npad; ++j) d[j] = BFloat16(0.f);
      }
      gemm_vnni(m, D, npad, dSb.get(), BK, KB.get() + c * BK * D, D, dqacc.get(), D, true);
    } else {
      gemm_f32<Out::kAdd>(n, Dv, m, PT, ldq, dOB.get(), lddv, kNR, dV, Dv);
      gemm_f32<Out::kAdd>(n, D, m, dST, ldq, QB.get(), ldd, kNR, dK, D);
      gemm_f32<Out::kAdd>(D, m, n, KB.get() + c * BK * D, BK, dST, ldq, kNR, dqacc.get(), ldq);
    }
  }

  // The query tile's dQ times the scale, row-major (m × D), into its chunk's partial.
  void store_dq(int64_t m, float scale, float* dqp) const {
    const float* a = dqacc.get();
    for (int64_t r = 0; r < m; ++r)
      for (int64_t d = 0; d < D; ++d) dqp[r * D + d] = (vnni ? a[r * D + d] : a[d * ldq + r]) * scale;
  }
};

template <typename scalar_t, typename pack_t>
void attn_bwd(const AttnParams& p) {
  constexpr bool vnni = std::is_same<pack_t, BFloat16>::value;
  const int64_t B = p.B, Hq = p.Hq, Hkv = p.Hkv, Lq = p.Lq, Lk = p.Lk, D = p.D, Dv = p.Dv;
  const int64_t BQ = p.BQ, BK = p.BK, nQ = ceil_div(Lq, BQ), nK = ceil_div(Lk, BK), group = Hq / Hkv;
  const int64_t n_chunks = p.n_chunks, per_chunk = ceil_div(nK, n_chunks);
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
  const philox::Rng rng = philox::make_rng(p.philox_seed, p.philox_offset, p.drop_Lq, p.drop_Lk, p.dropout_p);
  const float keep_value = drop ? 1.f / (1.f - p.dropout_p) : 1.f;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const fastattn::rules::Variant& var = p.variant;
  const fastattn::rules::ScoreScale sc = fastattn::rules::score_scale(p.scale, var, 1.f);
  const bool score_mod = var.softcap > 0.f || var.alibi != nullptr;
  const float lse_off = sc.softcap ? sc.post * kLog2e : 0.f;

  const int64_t n_tasks = B * Hkv * n_chunks;
  parallel_dynamic(n_tasks, [&](const auto& claim) {
    BwdOperands<scalar_t, pack_t> ops(p, per_chunk);
    const int64_t ldq = ops.ldq;
    auto zcol = scratch<float>(drop ? BQ : 1);  // Z = keep / (1 - p) of one key column
    auto dKacc = scratch<float>(per_chunk * BK * D);
    auto dVacc = scratch<float>(per_chunk * BK * Dv);
    auto ST = scratch<float>(BK * ldq);   // Sᵀ, then Pᵀ (fp32)
    auto dPT = scratch<float>(BK * ldq);  // dPᵀ, then dSᵀ (fp32)
    auto lse_eff = scratch<float>(BQ);
    auto colshift = scratch<float>(BQ);
    auto tiles = scratch<int64_t>(per_chunk);
    auto states = scratch<int8_t>(per_chunk);
    for (int64_t t = claim(); t < n_tasks; t = claim()) {
      const int64_t b = t / (Hkv * n_chunks), hk = (t / n_chunks) % Hkv, ch = t % n_chunks;
      const int64_t kt0 = ch * per_chunk, kt1 = std::min(nK, kt0 + per_chunk);
      float* dq_part = p.dq_part + ch * (B * Hq * Lq * D);
      for (int64_t kt = kt0; kt < kt1; ++kt) {
        const int64_t k0 = kt * BK, n = std::min(BK, Lk - k0);
        ops.pack_keys(kt - kt0, K + b * p.k_s[0] + hk * p.k_s[1] + k0 * p.k_s[2],
                      V + b * p.v_s[0] + hk * p.v_s[1] + k0 * p.v_s[2], n);
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
          const float slope = fastattn::rules::alibi_slope(var, b, h, 1.f);
          ops.pack_queries(Q + b * p.q_s[0] + h * p.q_s[1] + q0 * p.q_s[2],
                           dO + b * p.do_s[0] + h * p.do_s[1] + q0 * p.do_s[2], m);
          const float* lse = p.lse_in + (b * Hq + h) * Lq + q0;
          const float* delta = p.delta + (b * Hq + h) * Lq + q0;
          // The lse in base-2 units, for exp2, less lse_off (bwd_col's shift). A row that attends nothing
          // has lse = -inf: +inf makes its P exactly 0.
          for (int64_t r = 0; r < m; ++r) lse_eff[r] = lse[r] == kNegInf ? kInf : lse[r] * kLog2e - lse_off;
          for (int64_t it = 0; it < nt; ++it) {
            const int64_t kt = tiles[it], k0 = kt * BK, n = std::min(BK, Lk - k0), c = kt - kt0;
            ops.transposed_scores(c, n, m, ST.get(), dPT.get());
            for (int64_t j = 0; j < n; ++j) {
              const int64_t key = k0 + j;
              // Rows whose band and chunk contain this key.
              int64_t i_lo, i_hi;
              fastattn::rules::key_rows(var, key, Lq, i_lo, i_hi);
              const int64_t r0 = std::clamp<int64_t>(i_lo - q0, 0, m), r1 = std::clamp<int64_t>(i_hi - q0 + 1, 0, m);
              float* s = ST.get() + j * ldq;
              float* dp = dPT.get() + j * ldq;
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
                  for (int64_t r = r0; r < r1; ++r) colshift[r] = mk[(r - r0) * p.m_s[2]] ? lse_eff[r] : kInf;
                } else {
                  const float* mk = static_cast<const float*>(p.mask) + mbase;
                  for (int64_t r = r0; r < r1; ++r) {
                    const float add = mk[(r - r0) * p.m_s[2]];
                    // -inf in the mask: P = 0 exactly (never inf - inf).
                    colshift[r] = add == kNegInf ? kInf : lse_eff[r] - add * kLog2e;
                  }
                }
                shift = colshift.get();
              }
              float* dm = p.dmask != nullptr ? p.dmask + ((b * Hq + h) * Lq + q0) * Lk + key : nullptr;
              const float* z = nullptr;
              if (drop) {  // Z of the column, for dSᵀ = Pᵀ ∘ (dPᵀ ∘ Z − delta) and Pᵀ ∘ Z (dV)
                philox::keep_scale(rng, philox::element(rng, b * Hq + h, q0 + r0, key), rng.seqlen_k,
                                   r1 - r0, keep_value, zcol.get() + r0);
                z = zcol.get();
              }
              if (score_mod) {
                const int64_t base = q0 + var.q_offset - key;
                if (!sc.softcap)
                  bwd_col<false, true>(sc, slope, base, r0, r1, shift, delta, z, dm, Lk, s, dp);
                else if (var.alibi != nullptr)
                  bwd_col<true, true>(sc, slope, base, r0, r1, shift, delta, z, dm, Lk, s, dp);
                else
                  bwd_col<true, false>(sc, slope, base, r0, r1, shift, delta, z, dm, Lk, s, dp);
                continue;
              }
              const int64_t vs = Vec::size();
              {  // Pᵀ, in place: Sᵀ·scale in base-2 units less the shift
                const Vec vscale(p.scale * kLog2e);
                int64_t r = r0;
                for (; r + vs <= r1; r += vs)
                  exp2_vec(at::vec::fmsub(Vec::loadu(s + r), vscale, Vec::loadu(shift + r))).store(s + r);
                if (r < r1)
                  exp2_vec(at::vec::fmsub(Vec::loadu(s + r, r1 - r), vscale, Vec::loadu(shift + r, r1 - r)))
                      .store(s + r, r1 - r);
              }
              // dSᵀ = Pᵀ ∘ (dPᵀ − delta), in place over dPᵀ.
              int64_t r = r0;
              if (z != nullptr) {  // dSᵀ = Pᵀ ∘ (dPᵀ ∘ Z − delta), then Pᵀ ∘ Z for dV
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
              if (dm != nullptr)  // the float mask's gradient: dS (zeros elsewhere)
                for (int64_t rr = r0; rr < r1; ++rr) dm[rr * Lk] = dp[rr];
            }
            ops.accumulate(c, n, m, ST.get(), dPT.get(), dVacc.get() + c * BK * Dv, dKacc.get() + c * BK * D);
          }
          ops.store_dq(m, p.scale, dqp);
        }
      }
      scalar_t* dk = static_cast<scalar_t*>(p.dk);
      scalar_t* dv = static_cast<scalar_t*>(p.dv);
      for (int64_t kt = kt0; kt < kt1; ++kt) {
        const int64_t k0 = kt * BK, n = std::min(BK, Lk - k0), c = kt - kt0;
        scale_store(dKacc.get() + c * BK * D, n * D, p.scale, dk + ((b * Hkv + hk) * Lk + k0) * D);
        store_from_f32(dVacc.get() + c * BK * Dv, n * Dv, dv + ((b * Hkv + hk) * Lk + k0) * Dv);
      }
    }
    release_brgemm(vnni);
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

// Only the AVX-512 build takes the native-bf16 brgemm path: the CPUs with a bf16 dot (avx512_bf16,
// AMX) all have AVX-512, and the AVX2 and baseline builds must run their own instructions only
// (brgemm JITs for the CPU it finds, whatever this file was compiled for).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kNativeBf16Path = true;
#else
constexpr bool kNativeBf16Path = false;
#endif

// The tile types per input dtype: fp32 and float16 always in fp32 tiles; bf16 in bf16 tiles where
// brgemm has a native dot, else converted to fp32 tiles like float16.
void fwd_entry(const AttnParams& p) {
  if constexpr (kNativeBf16Path) {
    if (p.bf16 && p.bf16_brgemm) return attn_fwd<BFloat16, BFloat16>(p);
  }
  if (p.f16)
    attn_fwd<Half, float>(p);
  else if (p.bf16)
    attn_fwd<BFloat16, float>(p);
  else
    attn_fwd<float, float>(p);
}

void bwd_entry(const AttnParams& p) {
  if constexpr (kNativeBf16Path) {
    if (p.bf16 && p.bf16_brgemm) return attn_bwd<BFloat16, BFloat16>(p);
  }
  if (p.f16)
    attn_bwd<Half, float>(p);
  else if (p.bf16)
    attn_bwd<BFloat16, float>(p);
  else
    attn_bwd<float, float>(p);
}

#if defined(CPU_CAPABILITY_AVX512)
// Runs the bf16 brgemm on a small odd-sized problem and compares with a plain loop: false where the
// CPU has no native bf16 dot (torch's brgemm refuses) or the result is wrong.
bool brgemm_selftest() {
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
    BFloat16 ab[M * K], bb[K * N];
    for (int64_t x = 0; x < M * K; ++x) ab[x] = BFloat16(a[x]);
    pack_b(b, N, 1, K, N, K, N, bb);
    gemm_vnni(M, N, K, ab, K, bb, N, c, N, false);
    at::native::cpublas::brgemm_release(true);
    for (int64_t x = 0; x < M * N; ++x)
      if (c[x] != ref[x]) return false;
    return true;
  } catch (...) {
    return false;
  }
}

bool bf16_brgemm_ok() {
  static const bool ok = brgemm_selftest();
  return ok;
}
#else
bool bf16_brgemm_ok() { return false; }
#endif

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fastattn_cpu

// fp32 GEMM micro-kernels, B-panel packing, tile conversion and the vectorised softmax primitives of
// the CPU attention kernels, compiled once per instruction set (included by attn_cpu_kernel.h inside
// each ISA's namespace, never on its own).
//
// Why our own micro-kernel rather than oneDNN's brgemm for fp32: brgemm JITs code for the CPU it finds
// (capped only by ONEDNN_MAX_CPU_ISA, a process-wide setting), so an "AVX2 build" that calls it is not
// AVX2 code, and on CPUs or torch builds without the ukernel API it is missing altogether. The kernel
// below is plain at::vec code: what the file is compiled for is what runs, the same on every machine
// (FASTATTN_CPU_ISA=avx2 on an AVX-512 machine runs AVX2 instructions only), and it lets the forward
// fold the online-softmax rescale of the accumulator into the P·V product (one pass fewer).
//
// Shape: MR rows × NR = 2 vectors of C held in registers, A broadcast one element at a time, B read as
// two vectors per k. AVX2 (16 ymm): 6 × 16 → 12 accumulators + 2 B + 1 A = 15 registers, 12 FMAs per
// 8 loads. AVX-512 (32 zmm): 8 × 32 → 16 accumulators + 3. The baseline build (at::vec's generic
// 8-float Vec) uses 4 × 16. B is read as panels of NR columns with a row stride `ldb`: either packed
// (ldb = NR, panels K·NR apart: contiguous, no cache-set conflicts at any K) or a row-major matrix
// whose rows are padded to a multiple of NR (panels NR apart), used only where ldb is small. Columns
// of B past N must be readable (zero or not: a column of C depends on its column of B only, and the
// columns past N are never written back).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attn_cpu_params.h"

namespace fastattn_cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMR = 8;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kMR = 6;
#else
constexpr int kMR = 4;
#endif
constexpr int kNV = 2;
constexpr int64_t kNR = kNV * Vec::size();

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// ---------------------------------------------------------------- micro-kernel

// What the micro-kernel does with C: C = A·B, C += A·B, C = C·rs[row] + A·B (the online softmax's
// rescale of the accumulator by alpha, folded into the P·V product), or C = mul·A·B while keeping each
// row's running maximum (the scores' scale and the softmax's row max, folded into Q·Kᵀ so that no
// separate pass reads the scores for them).
enum class Out { kStore, kAdd, kScaleAdd, kScaleMax };

// max(a, b) per lane, one instruction: a NaN in b is returned, one in a is dropped. Enough for the row
// maxima of kScaleMax: a NaN score turns its own exponential into NaN, and so its row, whatever the max.
inline Vec max_fast(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_max_ps(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_max_ps(a, b));
#else
  return at::vec::maximum(a, b);
#endif
}

// C (MR × NR, ldc) op= A (MR × K, lda) · B (K × NR, rows ldb apart). kScaleAdd reads rs[0, MR);
// kScaleMax scales by mul and updates rmax[i·Vec::size(), +Vec::size()) per row (lanes to be reduced).
template <int MR, Out mode>
inline void ukernel(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                    const float* rs, float mul, float* rmax) {
  constexpr int vs = Vec::size();
  Vec c[MR][kNV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) c[i][v] = Vec(0.f);
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    Vec b[kNV];
#pragma GCC unroll 2
    for (int v = 0; v < kNV; ++v) b[v] = Vec::loadu(B + k * ldb + v * vs);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec a(A[i * lda + k]);
#pragma GCC unroll 2
      for (int v = 0; v < kNV; ++v) c[i][v] = at::vec::fmadd(a, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* ci = C + i * ldc;
    if constexpr (mode == Out::kScaleAdd) {
      const Vec r(rs[i]);
#pragma GCC unroll 2
      for (int v = 0; v < kNV; ++v) at::vec::fmadd(Vec::loadu(ci + v * vs), r, c[i][v]).store(ci + v * vs);
    } else if constexpr (mode == Out::kScaleMax) {
      const Vec vm(mul);
      Vec mx = Vec::loadu(rmax + i * vs);
#pragma GCC unroll 2
      for (int v = 0; v < kNV; ++v) {
        c[i][v] = c[i][v] * vm;
        c[i][v].store(ci + v * vs);
        mx = max_fast(mx, c[i][v]);
      }
      mx.store(rmax + i * vs);
    } else {
#pragma GCC unroll 2
      for (int v = 0; v < kNV; ++v) {
        if constexpr (mode == Out::kAdd) c[i][v] = c[i][v] + Vec::loadu(ci + v * vs);
        c[i][v].store(ci + v * vs);
      }
    }
  }
}

// The micro-kernel for 1 <= rows <= kMR (the last rows of M).
template <Out mode>
inline void ukernel_rows(int64_t rows, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                         int64_t ldc, const float* rs, float mul, float* rmax) {
  switch (rows) {
    case 1: return ukernel<1, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
    case 2: return ukernel<2, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
    case 3: return ukernel<3, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
    default: return ukernel<4, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
#else
    case 4: return ukernel<4, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
    case 5: return ukernel<5, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
#if defined(CPU_CAPABILITY_AVX2)
    default: return ukernel<6, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
#else
    case 6: return ukernel<6, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
    case 7: return ukernel<7, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
    default: return ukernel<8, mode>(K, A, lda, B, ldb, C, ldc, rs, mul, rmax);
#endif
#endif
  }
}

// C (M × N, ldc) op= A (M × K, lda) · B, fp32. B's panel p (columns p·NR ...) starts at B + p·pstride
// and its rows are ldb apart: packed panels have ldb = NR, pstride = K·NR (or more); a row-major B
// padded to a multiple of NR columns has ldb = its row length, pstride = NR. rs: one factor per row
// (kScaleAdd). mul and rmax (M × Vec::size(), caller-initialised): kScaleMax's scale and row maxima.
// A last, partial panel goes through a small buffer, so C is written only where it exists.
template <Out mode>
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
              int64_t pstride, float* C, int64_t ldc, const float* rs = nullptr, float mul = 1.f,
              float* rmax = nullptr) {
  constexpr int64_t vs = Vec::size();
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // A·B = 0
    for (int64_t i = 0; i < M; ++i) {
      float* c = C + i * ldc;
      if constexpr (mode == Out::kStore || mode == Out::kScaleMax)
        std::fill(c, c + N, 0.f);
      else if constexpr (mode == Out::kScaleAdd)
        for (int64_t j = 0; j < N; ++j) c[j] *= rs[i];
      if constexpr (mode == Out::kScaleMax) rmax[i * vs] = std::max(rmax[i * vs], 0.f);
    }
    return;
  }
  alignas(64) float edge[kMR * kNR];
  alignas(64) float edge_max[kMR * vs];
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    const float* bp = B + (j0 / kNR) * pstride;
    const int64_t nc = std::min(kNR, N - j0);
    for (int64_t i0 = 0; i0 < M; i0 += kMR) {
      const int64_t rows = std::min<int64_t>(kMR, M - i0);
      const float* a = A + i0 * lda;
      const float* r = mode == Out::kScaleAdd ? rs + i0 : nullptr;
      float* rm = mode == Out::kScaleMax ? rmax + i0 * vs : nullptr;
      float* c = C + i0 * ldc + j0;
      if (nc == kNR) {
        if (rows == kMR)
          ukernel<kMR, mode>(K, a, lda, bp, ldb, c, ldc, r, mul, rm);
        else
          ukernel_rows<mode>(rows, K, a, lda, bp, ldb, c, ldc, r, mul, rm);
        continue;
      }
      for (int64_t i = 0; i < rows; ++i) {
        if constexpr (mode == Out::kAdd || mode == Out::kScaleAdd)
          std::memcpy(edge + i * kNR, c + i * ldc, sizeof(float) * nc);
        std::fill(edge + i * kNR + nc, edge + (i + 1) * kNR, 0.f);
      }
      if constexpr (mode == Out::kScaleMax) std::fill(edge_max, edge_max + kMR * vs, 0.f);  // not read back
      ukernel_rows<mode>(rows, K, a, lda, bp, ldb, edge, kNR, r, mul, edge_max);
      for (int64_t i = 0; i < rows; ++i) {
        std::memcpy(c + i * ldc, edge + i * kNR, sizeof(float) * nc);
        if constexpr (mode == Out::kScaleMax)  // the columns that exist only; a NaN wins, as in max_fast
          for (int64_t j = 0; j < nc; ++j) {
            const float e = edge[i * kNR + j];
            rm[i * vs] = rm[i * vs] >= e ? rm[i * vs] : e;
          }
      }
    }
  }
}

// The maximum of a row's kScaleMax lanes.
inline float reduce_max(const float* lanes) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, Vec::loadu(lanes));
}

// ---------------------------------------------------------------- conversion and packing

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

template <typename T>
inline T from_f(float x) {
  return static_cast<T>(x);
}

// 16-bit floats to fp32, a vector at a time: F16C's vcvtph2ps for float16, a 16-bit shift for bf16.
// (at::vec has no vectorised Half -> float array conversion: its generic loop converts in software.)
template <typename src_t>
inline int64_t widen_vectors(const src_t* src, int64_t n, float* dst) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; j + 16 <= n; j += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
    if constexpr (std::is_same<src_t, c10::Half>::value)
      _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(h));
    else
      _mm512_storeu_ps(dst + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    if constexpr (std::is_same<src_t, c10::Half>::value)
      _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
    else
      _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
#else
  (void)src, (void)n, (void)dst;
#endif
  return j;
}

// dst[0, n) = src[0, n) as fp32 (src contiguous): whole vectors (widen_vectors), so a converted tile costs
// about what a copy costs.
template <typename src_t>
inline void load_f32(const src_t* src, int64_t n, float* dst) {
  if constexpr (std::is_same<src_t, float>::value) {  // inline: rows here are a panel (16/32 floats) or a head
    const int64_t vs = Vec::size();
    int64_t j = 0;
    for (; j + vs <= n; j += vs) Vec::loadu(src + j).store(dst + j);
    for (; j < n; ++j) dst[j] = src[j];
  } else {
    for (int64_t j = widen_vectors(src, n, dst); j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

// dst[0, n) = src[0, n) from fp32, rounded to nearest even.
template <typename dst_t>
inline void store_from_f32(const float* src, int64_t n, dst_t* dst) {
  if constexpr (std::is_same<dst_t, float>::value) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// dst[0, n) = src[0, n) · a, converted to dst_t.
template <typename dst_t>
inline void scale_store(const float* src, int64_t n, float a, dst_t* dst) {
  const int64_t vs = Vec::size();
  const Vec va(a);
  int64_t j = 0;
  if constexpr (std::is_same<dst_t, float>::value) {
    for (; j + vs <= n; j += vs) (Vec::loadu(src + j) * va).store(dst + j);
    for (; j < n; ++j) dst[j] = src[j] * a;
  } else {
    alignas(64) float tmp[2 * Vec::size()];
    for (; j + 2 * vs <= n; j += 2 * vs) {
      at::vec::convert_from_float<dst_t>(Vec::loadu(src + j) * va, Vec::loadu(src + j + vs) * va).store(dst + j);
    }
    for (; j < n; j += 2 * vs) {
      const int64_t c = std::min<int64_t>(2 * vs, n - j);
      for (int64_t x = 0; x < c; ++x) tmp[x] = src[j + x] * a;
      at::vec::convert(tmp, dst + j, c);
    }
  }
}

// Elements of the packed form of a K × N matrix as B: ceil(N / NR) panels of K × NR.
inline int64_t panel_elems(int64_t K, int64_t N) { return round_up(std::max<int64_t>(N, 1), kNR) * K; }

// dst (panels of K × NR, zero past N) from src where B[k][n] = src[k·sk + n·sn], converted to fp32.
// Row-contiguous sources (sn = 1) are converted a row segment at a time; transposing ones (sk = 1,
// e.g. Kᵀ from K's rows) read each source row contiguously and scatter it down one panel column.
template <typename src_t>
void pack_panels(const src_t* src, int64_t sk, int64_t sn, int64_t K, int64_t N, float* dst) {
  const int64_t np = ceil_div(std::max<int64_t>(N, 1), kNR);
  if (sn == 1) {
    for (int64_t p = 0; p < np; ++p) {
      const int64_t n0 = p * kNR, nc = std::max<int64_t>(0, std::min(kNR, N - n0));
      float* d = dst + p * K * kNR;
      for (int64_t k = 0; k < K; ++k) {
        load_f32(src + k * sk + n0, nc, d + k * kNR);
        std::fill(d + k * kNR + nc, d + (k + 1) * kNR, 0.f);
      }
    }
    return;
  }
  alignas(64) float row[256];
  for (int64_t n = 0; n < N; ++n) {
    float* d = dst + (n / kNR) * K * kNR + n % kNR;
    const src_t* s = src + n * sn;
    for (int64_t k0 = 0; k0 < K; k0 += 256) {
      const int64_t kc = std::min<int64_t>(256, K - k0);
      if (sk == 1) {
        load_f32(s + k0, kc, row);
      } else {
        for (int64_t k = 0; k < kc; ++k) row[k] = to_f(s[(k0 + k) * sk]);
      }
      for (int64_t k = 0; k < kc; ++k) d[(k0 + k) * kNR] = row[k];
    }
  }
  for (int64_t n = N; n < np * kNR; ++n) {
    float* d = dst + (n / kNR) * K * kNR + n % kNR;
    for (int64_t k = 0; k < K; ++k) d[k * kNR] = 0.f;
  }
}

// dst (rows × ld, row-major fp32) from src where A[r][c] = src[r·sr + c·sc]; zero for cols <= c < ld.
template <typename src_t>
void pack_rows(const src_t* src, int64_t sr, int64_t sc, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const src_t* s = src + r * sr;
    float* d = dst + r * ld;
    if (sc == 1) {
      load_f32(s, cols, d);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = to_f(s[c * sc]);
    }
    std::fill(d + cols, d + ld, 0.f);
  }
}

// ---------------------------------------------------------------- softmax primitives

// 2^x, elementwise, for the softmax's exponentials (x = (s − max)·log2(e) <= 0 up to rounding).
// Round-to-nearest range reduction x = n + f, |f| <= 1/2, and a degree-5 minimax polynomial for 2^f
// (relative error below 1.8e-7 evaluated in fp32, about 1.5 ulp: tighter than at::vec's exp_u20),
// times 2^n made from n's bits. x <= -127 (−inf included) gives exactly 0, so masked scores drop out
// exactly; NaN stays NaN. 12 vector operations where exp_u20 takes about 20 (its natural-log
// reduction, two clamps and a blend), on the softmax's critical pass (see the design note).
#if defined(CPU_CAPABILITY_AVX512)
#define FA_PS(op) _mm512_##op##_ps
#define FA_EPI32(op) _mm512_##op##_epi32
#define FA_ROUND(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define FA_CAST_PS _mm512_castsi512_ps
#elif defined(CPU_CAPABILITY_AVX2)
#define FA_PS(op) _mm256_##op##_ps
#define FA_EPI32(op) _mm256_##op##_epi32
#define FA_ROUND(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define FA_CAST_PS _mm256_castsi256_ps
#endif

#if defined(FA_PS)
inline Vec exp2_vec(const Vec& x) {
  // max(lo, x) returns x when x is NaN (the second operand wins on an unordered compare).
  const auto xc = FA_PS(max)(FA_PS(set1)(-127.f), x);
  const auto n = FA_ROUND(xc);
  const auto f = FA_PS(sub)(xc, n);
  auto p = FA_PS(fmadd)(FA_PS(set1)(0.0013264711f), f, FA_PS(set1)(0.00967151206f));
  p = FA_PS(fmadd)(p, f, FA_PS(set1)(0.0555073395f));
  p = FA_PS(fmadd)(p, f, FA_PS(set1)(0.240222424f));
  p = FA_PS(fmadd)(p, f, FA_PS(set1)(0.693147004f));
  p = FA_PS(fmadd)(p, f, FA_PS(set1)(1.f));
  // 2^n as float bits, (n + 127) << 23: exactly 0.0 at n = -127.
  const auto bits = FA_EPI32(slli)(FA_EPI32(add)(FA_EPI32(cvtps)(n), FA_EPI32(set1)(127)), 23);
  return Vec(FA_PS(mul)(p, FA_CAST_PS(bits)));
}
#undef FA_PS
#undef FA_EPI32
#undef FA_ROUND
#undef FA_CAST_PS
#else
inline Vec exp2_vec(const Vec& x) { return (x * Vec(0.693147180559945f)).exp_u20(); }
#endif

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fastattn_cpu

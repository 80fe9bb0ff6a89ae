// Split-KV decoding over a contiguous or paged key/value cache on the CPU, compiled once per instruction set.
//
// Work: one task per (sequence b, key/value head h, split s), or per (b, group of heads, s) for a cache in small
// pages, whose heads a task walks together page by page (decode_head_group). For each head it owns the R = group * Lq
// query rows of h's GQA group (query head h * group + g, query i: row g * Lq + i), so each key and value row it
// reads from the cache serves every query head of the group: the cache is read exactly once per call. Its keys are the
// s-th of `splits` equal parts (multiples of kBlock) of the keys any of its rows attends; key position j lives
// at slot j % page_size of page block_table[b][j / page_size] (a contiguous cache is page b, page_size Lmax).
// Keys go by blocks of kBlock: the block's K rows are converted to fp32 and scored against every row
// (scaled_score, ALiBi, the band of csrc/attn_rules.h, per row), an online softmax keeps each row's max and
// sum, and the block's V rows are accumulated into the rows' fp32 outputs keys outer, each V row read once in
// order into a register tile of 4 rows by 4 vectors of Dv (AVX2: 2; bf16 through VDPBF16PS: 2 rows by 128
// values). The next block's rows are prefetched while the current one computes (Prefetch). A task ends with its
// normalised output and its lse (-inf if it attended nothing) in scratch; a second pass merges the splits of each
// row exactly through their lse, adds the sink's logit to the denominator once, and writes out (input dtype) and
// lse (fp32).
//
// Cost: FLOPs 4 * B * Hq * Lq * total * D (about 8 per cached element read when group * Lq = 4), minimum bytes:
// K and V of every attended key once (2 * D * sizeof(T) per key and kv head), plus q and out. The bound it should
// hit is the machine's measured read bandwidth for long caches (benchmarks/decode.py), but the arithmetic is not
// free on 2 cores: for bf16, D = 128 and a group of 4, a key brings 512 bytes and 1024 multiply-adds, which at
// ~30 GB/s is ~30 G multiply-adds per second per core, Zen 4's fp32 FMA rate; so bf16 caches on CPUs with
// AVX512_BF16 use VDPBF16PS (two multiply-adds per lane, no conversion of K or V; P rounded to bf16 as on GPUs).
// Splits exist so that B * Hkv tasks smaller than the thread count still use every thread; their merge reads
// R * Dv floats per split, nothing next to the cache.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "decode_cpu.h"

namespace fastattn_cpu {
namespace CPU_CAPABILITY {
namespace {

using DVec = at::vec::Vectorized<float>;
namespace rules = fastattn::rules;
constexpr float kDecodeNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 64;  // keys per block: K and V of a block (2 * 64 rows) stay in L1/L2
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kKeysNV = 4;  // vectors of V columns per P.V pass: 4 rows x 4 sums of AVX512's 32 registers
#else
constexpr int kKeysNV = 2;  // 4 rows x 2 sums of AVX2's 16 registers
#endif

// The sum of a vector's lanes (at::vec's reduce_add does not build for the generic vector in every torch).
inline float hsum(const DVec& a) {
  return at::vec::vec_reduce_all<float>([](DVec x, DVec y) { return x + y; }, a);
}

inline void load_vec(const float* p, DVec& out) { out = DVec::loadu(p); }
inline void load_vec(const c10::BFloat16* p, DVec& out) { at::vec::load_fp32_from_bf16(p, out); }
inline void load_vec(const c10::Half* p, DVec& out) { at::vec::load_fp32_from_fp16(p, out); }

// dst[0, n) = src[0, n * stride) as fp32 (vector body when stride is 1, scalar otherwise); dst[n, padded) = 0.
template <typename T>
inline void to_f32(const T* src, int64_t stride, float* dst, int64_t n, int64_t padded) {
  constexpr int64_t W = DVec::size();
  int64_t d = 0;
  if (stride != 1) {
    for (; d < n; ++d) dst[d] = static_cast<float>(src[d * stride]);
  }
  for (; d + W <= n; d += W) {
    DVec x;
    load_vec(src + d, x);
    x.store(dst + d);
  }
  for (; d < n; ++d) dst[d] = static_cast<float>(src[d]);
  for (; d < padded; ++d) dst[d] = 0.f;
}

// The next block's rows that a pass prefetches as it walks the current block: key j's `bytes` when j < n (to L2,
// T1). Each pass prefetches the rows of the next block it will read itself (q.K its K rows, P.V its V rows), so
// that the memory is kept busy through both passes rather than flooded during the first. The hardware prefetchers
// do not run far enough ahead of a kernel that computes between its loads: on long caches at two threads these
// prefetches take bf16 and fp32 from 16-18 to 27-31 GB/s (T0 or NTA instead of T1: 17-22).
//
// always_inline is what keeps them: a function whose only effect is __builtin_prefetch is "const" to GCC's
// pure-const analysis, so a call to it that is not inlined first is deleted as dead code. Without the attribute
// GCC 12 deleted every call of this one and the kernel had no prefetch at all; tests/test_kvcache.py checks the
// built library's decode code for prefetch instructions.
template <typename E>
struct Prefetch {
  const E* const* rows = nullptr;
  int64_t n = 0, bytes = 0;
  __attribute__((always_inline)) inline void at(int64_t j) const {
    if (j >= n) return;
    const char* row = reinterpret_cast<const char*>(rows[j]);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 2);
  }
};

// The sums of four vectors' lanes at once (AVX512: two rounds of 128-bit block shuffles, then in-block adds).
inline void hsum4(const DVec& a0, const DVec& a1, const DVec& a2, const DVec& a3, float* out, int64_t stride) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x0 = a0, x1 = a1, x2 = a2, x3 = a3;
  // blocks [x0.q0 + x0.q2, x0.q1 + x0.q3, x1.q0 + x1.q2, x1.q1 + x1.q3], the same for x2, x3
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x44), _mm512_shuffle_f32x4(x0, x1, 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(x2, x3, 0x44), _mm512_shuffle_f32x4(x2, x3, 0xEE));
  // block i: four partial sums of x_i
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, t);
  out[0] = lanes[0];
  out[stride] = lanes[4];
  out[2 * stride] = lanes[8];
  out[3 * stride] = lanes[12];
#else
  out[0] = hsum(a0);
  out[stride] = hsum(a1);
  out[2 * stride] = hsum(a2);
  out[3 * stride] = hsum(a3);
#endif
}

// Where a block's K or V rows are read: straight from the cache (unit stride, a whole number of vectors per row:
// each vector converted to fp32 in registers as it is used), or from an fp32 copy made by to_f32 (any stride or
// head dim; padded rows). bf16 rows on AVX512_BF16 CPUs go to the *_bf16 functions instead.
template <typename T>
struct DirectRows {
  const T* const* rows;
  inline DVec load(int64_t j, int64_t d) const {
    DVec x;
    load_vec(rows[j] + d, x);
    return x;
  }
};

struct BufferRows {
  const float* base;
  int64_t ld;
  inline DVec load(int64_t j, int64_t d) const { return DVec::loadu(base + j * ld + d); }
};

#if defined(CPU_CAPABILITY_AVX512)
// The lane sums of 16 vectors at once: lane 4 * b + c of the result is the sum of v[4 * c + b]'s lanes. Two rounds
// of 128-bit block shuffles, then two of in-block shuffles, each halving the number of vectors: 45 shuffles and adds
// for the 16 sums, where hsum4 takes 13 for 4 and then stores its sums one by one.
inline __m512 hsum16(const __m512* v) {
  __m512 s[8], t[4];
  for (int i = 0; i < 8; ++i)  // blocks [v2i.q0 + v2i.q2, v2i.q1 + v2i.q3, v2i+1.q0 + v2i+1.q2, v2i+1.q1 + v2i+1.q3]
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // block b: four partial sums of v[4i + b]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  // block b: two partial sums of v[b], two of v[4 + b] (u0); of v[8 + b] and v[12 + b] (u1)
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], 0x44), _mm512_shuffle_ps(t[0], t[1], 0xEE));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_ps(t[2], t[3], 0x44), _mm512_shuffle_ps(t[2], t[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(u0, u1, 0x88), _mm512_shuffle_ps(u0, u1, 0xDD));
}

// The scores of 4 keys by 4 rows from their 16 sums a[4 * c + r] (key c, row r): out[r * ostride + c].
inline void store_scores16(const __m512* a, float* out, int64_t ostride) {
  const __m512 w = hsum16(a);  // 128-bit block r: row r's four scores
  _mm_storeu_ps(out, _mm512_extractf32x4_ps(w, 0));  // the block index is an immediate
  _mm_storeu_ps(out + ostride, _mm512_extractf32x4_ps(w, 1));
  _mm_storeu_ps(out + 2 * ostride, _mm512_extractf32x4_ps(w, 2));
  _mm_storeu_ps(out + 3 * ostride, _mm512_extractf32x4_ps(w, 3));
}

// Scores of 4 rows of q (fp32, stride ld, zero-padded to `padded`) against keys j..j+3, read in place:
// out[r * ostride + j + c]. The 16 sums are independent FMA chains reduced together (store_scores16), rather than
// each key's four by hsum4: fp32 caches that fit L3 +16-30% at one and two threads (two: 47-54 against 61-63 GB/s),
// long ones +4-6%.
template <class Src>
inline void dot_rows4(const float* qf, int64_t ld, const Src& k, int64_t j, int64_t padded, float* out,
                      int64_t ostride) {
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < padded; d += DVec::size()) {
    __m512 kv[4];
    for (int c = 0; c < 4; ++c) kv[c] = k.load(j + c, d);
    for (int r = 0; r < 4; ++r) {
      const __m512 x = _mm512_loadu_ps(qf + r * ld + d);
      for (int c = 0; c < 4; ++c) a[4 * c + r] = _mm512_fmadd_ps(x, kv[c], a[4 * c + r]);
    }
  }
  store_scores16(a, out + j, ostride);
}
#endif

// Scores of `rows` query rows (fp32, stride ld, zero-padded to `padded`) against key j: out[r * ostride].
template <class Src>
inline void dot_rows(const float* qf, int64_t rows, int64_t ld, const Src& k, int64_t j, int64_t padded, float* out,
                     int64_t ostride) {
  constexpr int64_t W = DVec::size();
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    DVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    for (int64_t d = 0; d < padded; d += W) {
      const DVec kv = k.load(j, d);
      a0 = at::vec::fmadd(DVec::loadu(qf + (r + 0) * ld + d), kv, a0);
      a1 = at::vec::fmadd(DVec::loadu(qf + (r + 1) * ld + d), kv, a1);
      a2 = at::vec::fmadd(DVec::loadu(qf + (r + 2) * ld + d), kv, a2);
      a3 = at::vec::fmadd(DVec::loadu(qf + (r + 3) * ld + d), kv, a3);
    }
    hsum4(a0, a1, a2, a3, out + r * ostride, ostride);
  }
  for (; r < rows; ++r) {
    DVec a(0.f);
    for (int64_t d = 0; d < padded; d += W) a = at::vec::fmadd(DVec::loadu(qf + r * ld + d), k.load(j, d), a);
    out[r * ostride] = hsum(a);
  }
}

// acc[r, c + e * W] += sum_j p[r, j] * v[j, c + e * W] for NR rows, NV vectors of columns, keys [0, n) outer: the
// NR x NV sums stay in registers as independent FMA chains, and each key's NV vectors of V are read once, in order,
// so a block's V streams like its K. (Columns outer, one vector of each of the block's rows per pass, measured 15%
// slower single-threaded on long fp32 caches, 12.6 against 14.5 GB/s, before the prefetches were compiled in; its
// P.V pass took 1.5x the time from L3.)
template <int NR, int NV, class Src, class PF>
inline void accumulate_keys(float* acc, int64_t ld, const float* p, int64_t pld, const Src& v, int64_t n, int64_t c,
                            const PF& pf) {
  constexpr int64_t W = DVec::size();
  DVec a[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int e = 0; e < NV; ++e) a[r][e] = DVec::loadu(acc + r * ld + c + e * W);
  for (int64_t j = 0; j < n; ++j) {
    pf.at(j);
    DVec x[NV];
    for (int e = 0; e < NV; ++e) x[e] = v.load(j, c + e * W);
    for (int r = 0; r < NR; ++r) {
      const DVec pr(p[r * pld + j]);
      for (int e = 0; e < NV; ++e) a[r][e] = at::vec::fmadd(pr, x[e], a[r][e]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int e = 0; e < NV; ++e) a[r][e].store(acc + r * ld + c + e * W);
}

// Every column of NR rows; the first pass carries the prefetches.
template <int NR, class Src, class PF>
inline void accumulate_keys_cols(float* acc, int64_t ld, const float* p, int64_t pld, const Src& v, int64_t n,
                                 int64_t padded, PF pf) {
  constexpr int64_t W = DVec::size();
  int64_t c = 0;
  for (; c + kKeysNV * W <= padded; c += kKeysNV * W, pf = {})
    accumulate_keys<NR, kKeysNV>(acc, ld, p, pld, v, n, c, pf);
  for (; c < padded; c += W, pf = {}) accumulate_keys<NR, 1>(acc, ld, p, pld, v, n, c, pf);
}

// pf: the Prefetch of the next block's V rows, carried by the first pass only.
template <class Src, class PF>
inline void accumulate(float* acc, int64_t ld, const float* p, int64_t pld, const Src& v, int64_t n, int64_t padded,
                       int64_t rows, PF pf) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4, pf = {}) accumulate_keys_cols<4>(acc + r * ld, ld, p + r * pld, pld, v, n, padded, pf);
  for (; r + 2 <= rows; r += 2, pf = {}) accumulate_keys_cols<2>(acc + r * ld, ld, p + r * pld, pld, v, n, padded, pf);
  for (; r < rows; ++r, pf = {}) accumulate_keys_cols<1>(acc + r * ld, ld, p + r * pld, pld, v, n, padded, pf);
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
// bf16 caches on a CPU with AVX512_BF16 (checked at run time: DecodeParams::bf16_dot). VDPBF16PS multiplies pairs
// of bf16 and adds both products to an fp32 lane: per key and GQA row it does the work of two fp32 FMAs and needs
// no bf16 -> fp32 conversion of K or V, which is what bounds the fp32 path on bf16 (per key of D = 128 with a
// group of 4: 1024 multiply-adds for 512 bytes of K and V, about Zen 4's fp32 FMA rate at its read bandwidth).
// q.K is exact in its products (q and K are bf16); P.V rounds P to bf16 first, as FlashAttention does on GPUs.
// These functions take their own target (the AVX512 build's list plus avx512bf16) so that the build still runs
// on AVX512 CPUs without it; they are called once per block of keys, so they are not inlined into the task.
#define FASTATTN_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")))

// Scores of 4 rows of q (bf16, row stride qld, D = 32 * nc) against keys rows[0, n): out[r * ostride + j]. Four
// keys per step: their 16 sums (key c, row b: a[4c + b]) are independent accumulation chains, reduced together
// (store_scores16). q is read from L1 as it is used, so that the 16 sums and the 4 keys' chunks fit the registers.
// pf: the next unit's K rows, prefetched one key per key scored, so that the lines in flight are spread over the
// pass: the whole block's at once measured 12 against 17 GB/s on one thread from memory. Against two keys per step
// with each row's sums reduced by hsum4: +7-13% on caches that fit L3 (two threads: 39-43 against 44-47 GB/s),
// equal within noise on long caches, which the memory bounds.
template <int NC>
FASTATTN_BF16_TARGET void dot_rows4_bf16(const uint16_t* q, int64_t qld, int64_t nc_rt, const uint16_t* const* rows,
                                         int64_t n, float* out, int64_t ostride, const Prefetch<uint16_t>& pf) {
  const int64_t nc = NC > 0 ? NC : nc_rt;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    for (int c = 0; c < 4; ++c) pf.at(j + c);
    __m512 a[16];
    for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      __m512bh k[4];
      for (int kk = 0; kk < 4; ++kk) k[kk] = (__m512bh)_mm512_loadu_si512(rows[j + kk] + 32 * c);
      for (int r = 0; r < 4; ++r) {
        const __m512bh x = (__m512bh)_mm512_loadu_si512(q + r * qld + 32 * c);
        for (int kk = 0; kk < 4; ++kk) a[4 * kk + r] = _mm512_dpbf16_ps(a[4 * kk + r], x, k[kk]);
      }
    }
    store_scores16(a, out + j, ostride);
  }
  for (; j < n; ++j) {
    pf.at(j);
    for (int r = 0; r < 4; ++r) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t c = 0; c < nc; ++c)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + r * qld + 32 * c),
                             (__m512bh)_mm512_loadu_si512(rows[j] + 32 * c));
      out[r * ostride + j] = _mm512_reduce_add_ps(a);
    }
  }
}

// Scores of one row of q against keys rows[0, n), two keys per step (two independent chains); q stays in
// registers when NC (the chunks of 32) is known at compile time. The rows a group of 4 leaves over.
template <int NC>
FASTATTN_BF16_TARGET void dot_row_bf16(const uint16_t* q, int64_t nc_rt, const uint16_t* const* rows, int64_t n,
                                       float* out, const Prefetch<uint16_t>& pf) {
  const int64_t nc = NC > 0 ? NC : nc_rt;
  constexpr int QR = NC > 0 ? NC : 1;
  __m512i qv[QR];
  if (NC > 0)
    for (int c = 0; c < QR; ++c) qv[c] = _mm512_loadu_si512(q + 32 * c);
  auto qload = [&](int64_t c) { return (__m512bh)(NC > 0 ? qv[c] : _mm512_loadu_si512(q + 32 * c)); };
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    pf.at(j);
    pf.at(j + 1);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      a0 = _mm512_dpbf16_ps(a0, qload(c), (__m512bh)_mm512_loadu_si512(rows[j] + 32 * c));
      a1 = _mm512_dpbf16_ps(a1, qload(c), (__m512bh)_mm512_loadu_si512(rows[j + 1] + 32 * c));
    }
    out[j] = _mm512_reduce_add_ps(a0);
    out[j + 1] = _mm512_reduce_add_ps(a1);
  }
  if (j < n) {
    pf.at(j);
    __m512 a = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) a = _mm512_dpbf16_ps(a, qload(c), (__m512bh)_mm512_loadu_si512(rows[j] + 32 * c));
    out[j] = _mm512_reduce_add_ps(a);
  }
}

// Scores of R rows of q against keys rows[0, n); the first group of rows carries pf.
template <int NC>
FASTATTN_BF16_TARGET void dot_block_bf16(const uint16_t* q, int64_t R, int64_t qld, int64_t nc,
                                         const uint16_t* const* rows, int64_t n, float* out, int64_t ostride,
                                         Prefetch<uint16_t> pf) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4, pf = {}) dot_rows4_bf16<NC>(q + r * qld, qld, nc, rows, n, out + r * ostride, ostride, pf);
  for (; r < R; ++r, pf = {}) dot_row_bf16<NC>(q + r * qld, nc, rows, n, out + r * ostride, pf);
}

// p (R rows of n fp32 probabilities, stride pld) rounded to bf16 (round to nearest even, as c10::BFloat16) into
// pb (stride pld), with a zero after an odd n: the pairs (p[j], p[j + 1]) are then the 32-bit words of pb.
FASTATTN_BF16_TARGET inline void round_p_bf16(const float* p, int64_t R, int64_t pld, int64_t n, uint16_t* pb) {
  for (int64_t r = 0; r < R; ++r) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + r * pld + j + 16), _mm512_loadu_ps(p + r * pld + j));
      _mm512_storeu_si512(pb + r * pld + j, (__m512i)x);
    }
    for (; j < n; ++j) pb[r * pld + j] = c10::BFloat16(p[r * pld + j]).x;
    if (n % 2) pb[r * pld + n] = 0;
  }
}

// acc[r, :] += sum_j p[r, j] * v[j, :] for NR rows, CH chunks of 32 values at c: keys in pairs (j, j + 1), whose
// rows are interleaved by 16-bit unpacks, so that one VDPBF16PS against the broadcast pair (p[r, j], p[r, j + 1])
// adds both keys. The unpacks work within 128-bit lanes: a chunk's outputs are kept in "pair order" (see
// pair_index), which the task undoes once at the end. `zero` stands for the missing partner of an odd last key.
template <int NR, int CH>
FASTATTN_BF16_TARGET inline void accumulate_rows_bf16(float* acc, int64_t ld, const uint16_t* pb, int64_t pld,
                                                      const uint16_t* const* rows, const uint16_t* zero, int64_t n,
                                                      int64_t c, const Prefetch<uint16_t>& pf) {
  __m512 a[NR][2 * CH];
  for (int r = 0; r < NR; ++r)
    for (int h = 0; h < 2 * CH; ++h) a[r][h] = _mm512_loadu_ps(acc + r * ld + c + 16 * h);
  for (int64_t j = 0; j < n; j += 2) {
    pf.at(j);
    pf.at(j + 1);
    const uint16_t* v0 = rows[j] + c;
    const uint16_t* v1 = j + 1 < n ? rows[j + 1] + c : zero;
    __m512bh lo[CH], hi[CH];
    for (int h = 0; h < CH; ++h) {
      const __m512i x0 = _mm512_loadu_si512(v0 + 32 * h), x1 = _mm512_loadu_si512(v1 + 32 * h);
      lo[h] = (__m512bh)_mm512_unpacklo_epi16(x0, x1);
      hi[h] = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
    }
    for (int r = 0; r < NR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, pb + r * pld + j, sizeof(pair));
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int h = 0; h < CH; ++h) {
        a[r][2 * h] = _mm512_dpbf16_ps(a[r][2 * h], lo[h], pv);
        a[r][2 * h + 1] = _mm512_dpbf16_ps(a[r][2 * h + 1], hi[h], pv);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int h = 0; h < 2 * CH; ++h) _mm512_storeu_ps(acc + r * ld + c + 16 * h, a[r][h]);
}

// Every column of NR rows, 128 at a time (a whole V row of D = 128 per pass), then 64, then 32.
template <int NR>
FASTATTN_BF16_TARGET inline void accumulate_cols_bf16(float* acc, int64_t ld, const uint16_t* pb, int64_t pld,
                                                      const uint16_t* const* rows, const uint16_t* zero, int64_t n,
                                                      int64_t dv, Prefetch<uint16_t> pf) {
  int64_t c = 0;
  for (; c + 128 <= dv; c += 128, pf = {}) accumulate_rows_bf16<NR, 4>(acc, ld, pb, pld, rows, zero, n, c, pf);
  for (; c + 64 <= dv; c += 64, pf = {}) accumulate_rows_bf16<NR, 2>(acc, ld, pb, pld, rows, zero, n, c, pf);
  if (c < dv) accumulate_rows_bf16<NR, 1>(acc, ld, pb, pld, rows, zero, n, c, pf);
}

// Rows in pairs, each pass reading whole V rows (2 rows x 4 chunks: 16 sums and 8 unpacked vectors in registers)
// rather than 4 rows over half a row at a time: for a group of 4 rows each V chunk is unpacked twice instead of
// once, but the first pass walks the block's V in address order, which the memory streams faster, and that wins
// on long caches (bf16, two threads: 28-31 against 26-27 GB/s).
FASTATTN_BF16_TARGET void accumulate_bf16(float* acc, int64_t ld, const float* p, uint16_t* pb, int64_t pld,
                                          const uint16_t* const* rows, const uint16_t* zero, int64_t n, int64_t dv,
                                          int64_t R, Prefetch<uint16_t> pf) {
  round_p_bf16(p, R, pld, n, pb);
  int64_t r = 0;
  for (; r + 2 <= R; r += 2, pf = {})
    accumulate_cols_bf16<2>(acc + r * ld, ld, pb + r * pld, pld, rows, zero, n, dv, pf);
  if (r < R) accumulate_cols_bf16<1>(acc + r * ld, ld, pb + r * pld, pld, rows, zero, n, dv, pf);
}
#undef FASTATTN_BF16_TARGET
#endif

// Where output column d of a chunk of 32 sits in accumulate_rows_bf16's pair order: 16-bit unpacks of 128-bit lane
// L (columns 8L..8L+7) put columns 8L..8L+3 in fp32 lanes 4L..4L+3 of the low half, 8L+4..8L+7 in the high half.
inline int64_t pair_index(int64_t d) {
  const int64_t c = d / 32 * 32, e = d % 32, lane = e / 8, i = e % 8;
  return c + (i < 4 ? 4 * lane + i : 16 + 4 * lane + i - 4);
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The keys [k0, k1) of split s of sequence b's attended range, and that range's total: R rows' union of bounds.
struct Range {
  int64_t total, k0, k1;
};

inline Range split_range(const DecodeParams& p, int64_t b, int64_t s) {
  const int64_t total = p.seqlens[b] + p.new_len;
  int64_t lo_first, hi_first, lo_last, hi_last;
  rules::row_bounds(p.variant, total - p.Lq, total, lo_first, hi_first);  // query 0
  rules::row_bounds(p.variant, total - 1, total, lo_last, hi_last);       // query Lq - 1
  const int64_t lo = std::max<int64_t>(lo_first, 0), hi = hi_last;    // bounds never decrease with the row
  if (total == 0 || hi < lo) return {total, 0, 0};
  const int64_t part = round_up((hi - lo + 1 + p.splits - 1) / p.splits, kBlock);
  const int64_t k0 = std::min(lo + s * part, hi + 1), k1 = std::min(lo + (s + 1) * part, hi + 1);
  return {total, k0, k1};
}

// One head's state in a task, kept across blocks: its rows' queries in fp32 (R, Dp) and in bf16 for the VDPBF16PS
// path (R, Dp), unnormalised outputs (R, Dvp), running max, running sum and ALiBi slopes (R each).
struct HeadState {
  float *qf, *acc, *m, *l, *slope;
  uint16_t* qb;
};

// Keys [k0, k0 + n) of one head against its rows: scores, online softmax, P.V into its acc. sc, raw, pb, kb, vb
// are scratch shared by the heads. kpf/vpf: the rows of the unit processed next (Prefetch), each carried by the
// pass that reads the same tensor.
template <typename T>
struct HeadBlock {
  const DecodeParams& p;
  int64_t R, Dp, Dvp;
  bool direct, dp;
  const int64_t* lo;  // (R) each row's attended keys [lo, hi] (the same for every head)
  const int64_t* hi;
  float *kb, *vb, *sc, *raw;
  uint16_t *pb, *zero;
  rules::ScoreScale ss;
  bool alibi, scores_modified;
  int64_t total;

  void operator()(const HeadState& st, int64_t k0, int64_t n, const T* const* krow, const T* const* vrow,
                  const Prefetch<T>& kpf, const Prefetch<T>& vpf) const {
    constexpr int64_t W = DVec::size();
    float *const qf = st.qf, *const acc = st.acc, *const m = st.m, *const l = st.l;
    const float* slope = st.slope;
    const uint16_t* qb = st.qb;
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
    if (dp) {
      const auto rows = reinterpret_cast<const uint16_t* const*>(krow);
      const Prefetch<uint16_t> pf{reinterpret_cast<const uint16_t* const*>(kpf.rows), kpf.n, kpf.bytes};
      if (p.D == 128)
        dot_block_bf16<4>(qb, R, Dp, 4, rows, n, raw, kBlock, pf);
      else
        dot_block_bf16<0>(qb, R, Dp, p.D / 32, rows, n, raw, kBlock, pf);
    }
#endif
    int64_t jj = dp ? n : 0;
#if defined(CPU_CAPABILITY_AVX512)
    if (direct && R >= 4)  // four keys at a time against each group of 4 rows, then the rows left over key by key
      for (; jj + 4 <= n; jj += 4) {
        for (int c = 0; c < 4; ++c) kpf.at(jj + c);
        int64_t r = 0;
        for (; r + 4 <= R; r += 4) dot_rows4(qf + r * Dp, Dp, DirectRows<T>{krow}, jj, Dp, raw + r * kBlock, kBlock);
        for (int c = 0; c < 4 && r < R; ++c)
          dot_rows(qf + r * Dp, R - r, Dp, DirectRows<T>{krow}, jj + c, Dp, raw + r * kBlock + jj + c, kBlock);
      }
#endif
    for (; jj < n; ++jj) {
      kpf.at(jj);
      if (direct) {
        dot_rows(qf, R, Dp, DirectRows<T>{krow}, jj, Dp, raw + jj, kBlock);
      } else {
        to_f32(krow[jj], p.k_s[3], kb + jj * Dp, p.D, Dp);
        to_f32(vrow[jj], p.v_s[3], vb + jj * Dvp, p.Dv, Dvp);
        dot_rows(qf, R, Dp, BufferRows{kb, Dp}, jj, Dp, raw + jj, kBlock);
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float* srow = sc + r * kBlock;
      const float* rrow = raw + r * kBlock;
      const int64_t pos = total - p.Lq + r % p.Lq;
      float mx = m[r];
      if (!scores_modified && k0 >= lo[r] && k0 + n - 1 <= hi[r]) {  // the whole block attended: vectors
        const DVec pre(ss.pre);
        DVec vmax(kDecodeNegInf);
        int64_t jj = 0;
        for (; jj + W <= n; jj += W) {
          const DVec x = DVec::loadu(rrow + jj) * pre;
          x.store(srow + jj);
          vmax = at::vec::maximum(vmax, x);
        }
        for (; jj < n; ++jj) {
          srow[jj] = rrow[jj] * ss.pre;
          mx = std::max(mx, srow[jj]);
        }
        mx = std::max(mx, at::vec::vec_reduce_all<float>([](DVec x, DVec y) { return at::vec::maximum(x, y); }, vmax));
      } else {
        for (int64_t jj = 0; jj < n; ++jj) {
          const int64_t j = k0 + jj;
          float t;
          float x = rules::scaled_score(rrow[jj], ss, t);
          if (alibi) x += rules::alibi_bias(slope[r], pos, j);
          if (j < lo[r] || j > hi[r]) x = kDecodeNegInf;
          srow[jj] = x;
          mx = std::max(mx, x);
        }
      }
      if (mx == kDecodeNegInf) {  // nothing attended yet: keep zeros
        std::fill(srow, srow + n, 0.f);
        continue;
      }
      const float corr = std::exp(m[r] - mx);  // 0 when m was -inf
      m[r] = mx;
      if (corr != 1.f) {
        const DVec cv(corr);
        for (int64_t c = 0; c < Dvp; c += W) (DVec::loadu(acc + r * Dvp + c) * cv).store(acc + r * Dvp + c);
      }
      int64_t jj = 0;
      DVec sum(0.f);
      const DVec mv(mx);
      for (; jj + W <= n; jj += W) {
        const DVec e = (DVec::loadu(srow + jj) - mv).exp_u20();
        e.store(srow + jj);
        sum = sum + e;
      }
      float tail = 0.f;
      for (; jj < n; ++jj) {
        srow[jj] = std::exp(srow[jj] - mx);
        tail += srow[jj];
      }
      l[r] = l[r] * corr + hsum(sum) + tail;
    }
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
    if (dp)
      accumulate_bf16(acc, Dvp, sc, pb, kBlock, reinterpret_cast<const uint16_t* const*>(vrow), zero, n, p.Dv, R,
                      {reinterpret_cast<const uint16_t* const*>(vpf.rows), vpf.n, vpf.bytes});
    else
#endif
        if (direct)
      accumulate(acc, Dvp, sc, kBlock, DirectRows<T>{vrow}, n, Dvp, R, vpf);
    else
      accumulate(acc, Dvp, sc, kBlock, BufferRows{vb, Dvp}, n, Dvp, R, vpf);
  }
};

// Heads [h0, h0 + nh) of sequence b over split s, block by block with the heads inner: a page of a paged cache
// holds every head's rows of its slots, (Hkv, page_size, D) contiguous, so walking its heads in turn reads it in
// address order, where one head at a time reads a page_size * D slice and jumps to another page (see
// decode_head_group). A contiguous cache takes one head per task: its heads are far apart.
template <typename T>
void decode_task(const DecodeParams& p, int64_t b, int64_t h0, int64_t nh, int64_t s, std::vector<float>& buf) {
  const int64_t G = p.Hq / p.Hkv, R = G * p.Lq;
  constexpr int64_t W = DVec::size();
  const int64_t Dp = round_up(p.D, W), Dvp = round_up(p.Dv, W);
  // Per head (HeadState): qf, acc, m, l, slope, then qb (half a float per value).
  const int64_t per_head = R * Dp + R * Dvp + 3 * R + (R * Dp + 1) / 2;
  buf.resize(nh * per_head + kBlock * Dp + kBlock * Dvp + 2 * R * kBlock + (R * kBlock + Dvp) / 2 + 1);
  float* kb = buf.data() + nh * per_head;  // (kBlock, Dp) the block's keys
  float* vb = kb + kBlock * Dp;            // (kBlock, Dvp) the block's values
  float* sc = vb + kBlock * Dvp;           // (R, kBlock) scores, then probabilities
  float* raw = sc + R * kBlock;            // (R, kBlock) dot products
  uint16_t* pb = reinterpret_cast<uint16_t*>(raw + R * kBlock);  // (R, kBlock) probabilities in bf16
  uint16_t* zero = pb + R * kBlock;                              // (Dvp) a value row of zeros
  auto state = [&](int64_t hh) {
    float* base = buf.data() + hh * per_head;
    HeadState st;
    st.qf = base;
    st.acc = st.qf + R * Dp;
    st.m = st.acc + R * Dvp;
    st.l = st.m + R;
    st.slope = st.l + R;
    st.qb = reinterpret_cast<uint16_t*>(st.slope + R);
    return st;
  };
  std::vector<int64_t> lo(R), hi(R);

  const Range range = split_range(p, b, s);
  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.k);
  const T* vc = static_cast<const T*>(p.v);
  const int64_t kbytes = p.D * p.k_s[3] * int64_t(sizeof(T)), vbytes = p.Dv * p.v_s[3] * int64_t(sizeof(T));
  // Rows read in place: unit last-dim strides and head dims a whole number of vectors (the common case).
  const bool direct = p.k_s[3] == 1 && p.v_s[3] == 1 && p.D == Dp && p.Dv == Dvp;
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  const bool dp = std::is_same<T, c10::BFloat16>::value && p.bf16_dot && direct && p.D % 32 == 0 && p.Dv % 32 == 0;
#else
  constexpr bool dp = false;
#endif
  for (int64_t r = 0; r < R; ++r) {
    int64_t a, z;
    rules::row_bounds(p.variant, range.total - p.Lq + r % p.Lq, range.total, a, z);
    lo[r] = std::max<int64_t>(a, 0);
    hi[r] = z;
  }
  for (int64_t hh = 0; hh < nh; ++hh) {
    const HeadState st = state(hh);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t hq = (h0 + hh) * G + r / p.Lq, i = r % p.Lq;
      const T* qr = q + b * p.q_s[0] + hq * p.q_s[1] + i * p.q_s[2];
      to_f32(qr, p.q_s[3], st.qf + r * Dp, p.D, Dp);
      if (dp)
        for (int64_t d = 0; d < p.D; ++d) std::memcpy(st.qb + r * Dp + d, qr + d * p.q_s[3], sizeof(uint16_t));
      st.slope[r] = rules::alibi_slope(p.variant, b, hq, 1.f);
    }
    std::fill(st.acc, st.acc + R * Dvp, 0.f);
    std::fill(st.m, st.m + R, kDecodeNegInf);
    std::fill(st.l, st.l + R, 0.f);
  }
  if (dp) std::fill(zero, zero + Dvp, uint16_t(0));
  const HeadBlock<T> head_block{p, R, Dp, Dvp, direct, dp, lo.data(), hi.data(), kb, vb, sc, raw, pb, zero,
                                rules::score_scale(p.scale, p.variant, 1.f), p.variant.alibi != nullptr,
                                rules::modifies_scores(p.variant), range.total};

  // A block's rows are found through the block table once per block as offsets that every head shares (one
  // division per block: the slots of consecutive keys step through the pages), computed one block ahead; a head's
  // row pointers add its offset. Each (block, head) unit prefetches the rows of the unit after it (the next head's,
  // or the first head's of the next block) while it computes (Prefetch): the loads of a decode step are its cost,
  // and keeping lines in flight through the whole unit is what reaches the memory bandwidth. To L2 (T1), not L1:
  // a unit's K and V are 32-64 KiB, as much as L1 holds, so T0 would evict the rows being scored.
  int64_t koff[2][kBlock], voff[2][kBlock];
  auto locate = [&](int64_t k0, int64_t n, int slot_buf) {
    int64_t index = k0 / p.page_size, slot = k0 - index * p.page_size;
    for (int64_t jj = 0; jj < n; ++jj, ++slot) {
      if (slot == p.page_size) {
        slot = 0;
        ++index;
      }
      const int64_t page = p.block_table ? p.block_table[b * p.bt_stride + index] : b;
      koff[slot_buf][jj] = page * p.k_s[0] + slot * p.k_s[2];
      voff[slot_buf][jj] = page * p.v_s[0] + slot * p.v_s[2];
    }
  };
  const T* krow[2][kBlock];  // [unit]: this unit's rows, [unit ^ 1]: the next unit's
  const T* vrow[2][kBlock];
  int unit = 0;
  auto rows = [&](int64_t h, int slot_buf, int64_t n, int which) {
    const T* kh = kc + h * p.k_s[1];
    const T* vh = vc + h * p.v_s[1];
    for (int64_t jj = 0; jj < n; ++jj) {
      krow[which][jj] = kh + koff[slot_buf][jj];
      vrow[which][jj] = vh + voff[slot_buf][jj];
    }
  };
  int cur = 0;
  if (range.k0 < range.k1) {
    locate(range.k0, std::min(kBlock, range.k1 - range.k0), cur);
    rows(h0, cur, std::min(kBlock, range.k1 - range.k0), unit);
  }
  for (int64_t k0 = range.k0; k0 < range.k1; k0 += kBlock, cur ^= 1) {
    const int64_t n = std::min(kBlock, range.k1 - k0);
    const int64_t n_next = std::clamp<int64_t>(range.k1 - k0 - kBlock, 0, kBlock);
    if (n_next) locate(k0 + kBlock, n_next, cur ^ 1);
    for (int64_t hh = 0; hh < nh; ++hh) {
      // The unit after (k0, hh): the next head of this block, else the first head of the next block (if any).
      const bool same_block = hh + 1 < nh;
      const int64_t n_after = same_block ? n : n_next;
      if (n_after) rows(same_block ? h0 + hh + 1 : h0, same_block ? cur : cur ^ 1, n_after, unit ^ 1);
      const Prefetch<T> kpf{krow[unit ^ 1], n_after, kbytes}, vpf{vrow[unit ^ 1], n_after, vbytes};
      head_block(state(hh), k0, n, krow[unit], vrow[unit], kpf, vpf);
      unit ^= 1;
    }
  }

  for (int64_t hh = 0; hh < nh; ++hh) {
    const HeadState st = state(hh);
    const int64_t task = (b * p.Hkv + h0 + hh) * p.splits + s;
    float* out = p.part_out + task * R * p.Dv;
    float* lse = p.part_lse + task * R;
    for (int64_t r = 0; r < R; ++r) {
      const bool any = st.l[r] > 0.f;
      const float inv = any ? 1.f / st.l[r] : 0.f;
      for (int64_t d = 0; d < p.Dv; ++d) out[r * p.Dv + d] = st.acc[r * Dvp + (dp ? pair_index(d) : d)] * inv;
      lse[r] = any ? st.m[r] + std::log(st.l[r]) : kDecodeNegInf;
    }
  }
}

// Merges the splits of (b, h)'s rows exactly through their lse, adds the sink, writes out and lse.
template <typename T>
void merge_task(const DecodeParams& p, int64_t b, int64_t h) {
  const int64_t G = p.Hq / p.Hkv, R = G * p.Lq;
  T* out = static_cast<T*>(p.out);
  std::vector<float> row(p.Dv);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r / p.Lq, i = r % p.Lq, hq = h * G + g;
    float top = kDecodeNegInf;
    for (int64_t s = 0; s < p.splits; ++s) top = std::max(top, p.part_lse[((b * p.Hkv + h) * p.splits + s) * R + r]);
    const bool sink = p.variant.sinks != nullptr;
    const float sink_logit = sink ? p.variant.sinks[hq] : kDecodeNegInf;
    top = std::max(top, sink_logit);
    std::fill(row.begin(), row.end(), 0.f);
    float total = 0.f;
    if (top != kDecodeNegInf) {
      for (int64_t s = 0; s < p.splits; ++s) {
        const int64_t task = (b * p.Hkv + h) * p.splits + s;
        const float ls = p.part_lse[task * R + r];
        if (ls == kDecodeNegInf) continue;
        const float w = std::exp(ls - top);
        total += w;
        const float* o = p.part_out + (task * R + r) * p.Dv;
        for (int64_t d = 0; d < p.Dv; ++d) row[d] += w * o[d];
      }
      if (sink) total += std::exp(sink_logit - top);
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    T* dst = out + ((b * p.Hq + hq) * p.Lq + i) * p.Dv;
    for (int64_t d = 0; d < p.Dv; ++d) dst[d] = static_cast<T>(row[d] * inv);
    p.lse[(b * p.Hq + hq) * p.Lq + i] = total > 0.f ? top + std::log(total) : kDecodeNegInf;
  }
}

// Heads per task: for a paged cache in pages of at most kBlock keys, the most that still leave a whole number of
// tasks per thread, or at least 8 per thread (decode_task); else 1. Long caches (B = 1 and 8 bf16 at 32k keys,
// B = 8 fp32 at 16k), two threads, shuffled block table, the two builds alternated three times: paged over
// contiguous time 0.90-1.11 against 1.00-1.25 with one head per task in pages of 64, 0.96-1.22 against 1.08-1.63
// in pages of 16. Larger pages keep one head per task: a head's slice of a page is then a stream of its own
// (0.83-0.97 in pages of 256), and heads walked together would interleave as many streams as heads.
inline int64_t decode_head_group(const DecodeParams& p, int64_t threads) {
  if (p.block_table == nullptr || p.page_size > kBlock) return 1;
  for (int64_t nh = p.Hkv; nh > 1; --nh) {
    if (p.Hkv % nh) continue;
    const int64_t tasks = p.B * (p.Hkv / nh) * p.splits;
    if (tasks % threads == 0 || tasks >= 8 * threads) return nh;
  }
  return 1;
}

template <typename T>
void decode_typed(const DecodeParams& p) {
  const int64_t nh = decode_head_group(p, at::get_num_threads()), groups = p.Hkv / nh;
  const int64_t tasks = p.B * groups * p.splits;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t % p.splits, bg = t / p.splits;
      decode_task<T>(p, bg / groups, bg % groups * nh, nh, s, buf);
    }
  });
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) merge_task<T>(p, bh / p.Hkv, bh % p.Hkv);
  });
}

}  // namespace

void decode_entry(const DecodeParams& p) {
  if (p.dtype == kDecodeBF16)
    decode_typed<c10::BFloat16>(p);
  else if (p.dtype == kDecodeF16)
    decode_typed<c10::Half>(p);
  else
    decode_typed<float>(p);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastattn_cpu

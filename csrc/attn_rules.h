// The attention variants' rules in C++: which (query, key) pairs attend, how a score is formed.
//
// The C++ statement of fastattn/variants.py (the rules, their order, and why the tile ranges below are
// exact, are written there; fastattn/backends/triton/_common.py is the Triton one), with the same names.
// Inline host/device functions of plain C++ (no torch, no CUDA headers): the CUDA kernels (nvcc), their
// emulator build (host C++, FASTATTN_EMULATE) and the CPU kernel (csrc/cpu) all include this one header,
// so a new rule is written here once for all three.
//
//   positions: query i sits at key position pos = i + q_offset
//   allowed:   pos - left <= j <= pos + right (-1: unbounded; causal is right = 0), and with a chunk
//              floor(pos / chunk) == floor(j / chunk); keys 0 <= j < Lk; then the boolean mask tensor
//   score:     s = scale * q.k; softcap: s = softcap * tanh(s / softcap); ALiBi: s -= slope * |pos - j|;
//              then the float mask tensor is added
//   softmax:   over the allowed keys, plus the sink's logit in the denominator when there are sinks
//
// Kernels work in either unit of the exponential: the GPU kernels in the exp2 domain (scores times
// log2(e)), the CPU kernel in natural units; `unit` below is that factor.
#pragma once

#include <math.h>
#include <stdint.h>

#include <cmath>
#include <string>

#if defined(__CUDACC__)
#define FA_RULE __host__ __device__ __forceinline__
#else
#define FA_RULE inline
#endif

namespace fastattn {
namespace rules {

constexpr float kLog2e = 1.4426950408889634f;

// Tile states of the per-tile summary (fastattn.masks): EMPTY tiles are skipped, FULL ones need no mask work.
enum : int8_t { kTileEmpty = 0, kTilePartial = 1, kTileFull = 2 };

// Every rule's parameters for one call (AttnParams' variant fields): a member of each backend's params struct.
struct Variant {
    int64_t left, right;     // the band with causal folded in (AttnParams.bounds); -1: that side unbounded
    int64_t q_offset;        // query i sits at key position i + q_offset
    int64_t chunk;           // chunked attention's chunk size; 0: none
    float softcap;           // 0: none
    const float* alibi;      // ALiBi slopes, float32 (1|B, Hq), or null
    int64_t alibi_stride_b;  // 0 (one row of slopes for the whole batch) or Hq
    const float* sinks;      // sink logits, float32 (Hq,), or null
};

// The band of v alone (no chunk, softcap or ALiBi; the sinks kept): a kernel instantiation for calls without
// them takes its variant through this, so that the compiler folds their code away (registers).
FA_RULE Variant band_only(const Variant& v) {
    return Variant{v.left, v.right, v.q_offset, 0, 0.f, nullptr, 0, v.sinks};
}

// The ops' `float[] variant` argument (fastattn/params.py: VariantScalars): Variant's scalars in this order, as
// doubles (integers exact below 2^53). The tensors (ALiBi slopes, sinks) are separate op arguments.
enum VariantScalar : int { kWindowLeft, kWindowRight, kQOffset, kChunk, kSoftcap, kVariantScalars };

// Fills v's scalars from the ops' variant argument `s` of `n` numbers and returns "" when they are valid, else
// what is wrong, naming the scalar and the value received (the ops raise it). Host only.
inline std::string unpack_variant(const double* s, size_t n, Variant& v) {
    static const char* const names[kVariantScalars] = {"window_left", "window_right", "q_offset", "chunk",
                                                       "softcap"};
    if (n != kVariantScalars) {
        std::string listed = names[0];
        for (int i = 1; i < kVariantScalars; ++i) listed = listed + ", " + names[i];
        return "expected " + std::to_string(int(kVariantScalars)) + " numbers (" + listed + "), got " +
               std::to_string(n);
    }
    for (int i = 0; i < kVariantScalars; ++i) {
        const bool integral = i != kSoftcap;
        if (!std::isfinite(s[i]) || (integral && (s[i] != std::floor(s[i]) || std::fabs(s[i]) >= 0x1p53)))
            return std::string(names[i]) + " must be a finite " + (integral ? "integer" : "number") + ", got " +
                   std::to_string(s[i]);
    }
    v.left = int64_t(s[kWindowLeft]), v.right = int64_t(s[kWindowRight]), v.q_offset = int64_t(s[kQOffset]);
    v.chunk = int64_t(s[kChunk]), v.softcap = float(s[kSoftcap]);
    if (v.left < -1 || v.right < -1)
        return "window_left and window_right must be >= -1 (-1: unbounded), got " + std::to_string(v.left) +
               " and " + std::to_string(v.right);
    if (v.chunk < 0) return "chunk must be >= 0 (0: none), got " + std::to_string(v.chunk);
    if (s[kSoftcap] < 0.0) return "softcap must be >= 0 (0: none), got " + std::to_string(s[kSoftcap]);
    return std::string();
}

FA_RULE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
FA_RULE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// floor(a / c) for c > 0 (C's division truncates toward zero).
FA_RULE int64_t floor_div(int64_t a, int64_t c) { return a >= 0 ? a / c : -((c - 1 - a) / c); }

// ---------------------------------------------------------------------------------------------- which pairs

// floor(x / c) * c for 0 <= x and 0 < c, the start of x's chunk, in a 32-bit division where x < 2^32 (on the GPU
// a 64-bit division is a call, whose saved registers spill in the kernels). The GPU ops check that lengths are
// below 2^31, so a key's x stays below 2^32, and so does a position's past the first two chunks (row_bounds
// divides only for pos < seqlen_k - 1 + c; pos >= 2c then needs c < seqlen_k).
FA_RULE int64_t chunk_start(int64_t x, int64_t c) {
    if (x < c) return 0;
    if (x - c < c) return c;
#if defined(__CUDA_ARCH__)
    return int64_t(uint32_t(x) / uint32_t(c)) * c;
#else
    return x < (int64_t(1) << 32) ? int64_t(uint32_t(x) / uint32_t(c)) * c : (x / c) * c;
#endif
}

// Keys [lo, hi] (inclusive) that key position `pos` attends, clipped to [0, seqlen_k - 1]; none when lo > hi.
FA_RULE void row_bounds(const Variant& v, int64_t pos, int64_t seqlen_k, int64_t& lo, int64_t& hi) {
    lo = 0;
    hi = seqlen_k - 1;
    if (v.left >= 0) lo = max64(lo, pos - v.left);
    if (v.right >= 0) hi = min64(hi, pos + v.right);
    if (v.chunk > 0) {
        // A position before 0, or at or past seqlen_k - 1 + chunk, has no key in its chunk (its chunk ends before
        // 0, or starts at or after seqlen_k), so the division only sees 0 <= pos < seqlen_k - 1 + chunk. Emptied
        // on that side (hi = -1, lo = seqlen_k), the bounds still never decrease with pos (tile_keys, tile_full).
        if (pos < 0) {
            hi = -1;
            return;
        }
        if (pos >= seqlen_k - 1 + v.chunk) {
            lo = seqlen_k;
            return;
        }
        const int64_t start = chunk_start(pos, v.chunk);
        lo = max64(lo, start);
        hi = min64(hi, start + v.chunk - 1);
    }
}

// Whether key position `pos` attends key j (0 <= j < Lk): the band and the chunk.
FA_RULE bool allowed(const Variant& v, int64_t pos, int64_t j) {
    if (v.left >= 0 && j < pos - v.left) return false;
    if (v.right >= 0 && j > pos + v.right) return false;
    if (v.chunk > 0) {  // pos in key j's chunk (no division of pos, which may be any int64)
        const int64_t start = chunk_start(j, v.chunk);
        if (pos < start || pos - start >= v.chunk) return false;
    }
    return true;
}

// Query rows [lo, hi] (inclusive) that attend key j (0 <= j), clipped to [0, seqlen_q - 1]: row_bounds' transpose.
FA_RULE void key_rows(const Variant& v, int64_t j, int64_t seqlen_q, int64_t& lo, int64_t& hi) {
    lo = 0;
    hi = seqlen_q - 1;
    if (v.right >= 0) lo = max64(lo, j - v.q_offset - v.right);
    if (v.left >= 0) hi = min64(hi, j - v.q_offset + v.left);
    if (v.chunk > 0) {
        const int64_t start = chunk_start(j, v.chunk) - v.q_offset;
        lo = max64(lo, start);
        hi = min64(hi, start + v.chunk - 1);
    }
}

// A tile's bounds along the other axis, computed once per tile: a kernel's loop over the other axis's tiles then
// needs no division (the GPU compiles a 64-bit division to a call, whose saved registers spill). For a tile of
// rows, `lo..hi` are the keys some row attends and `full_lo..full_hi` the keys every row attends (a key tile
// inside them is FULL); for a tile of keys, the same with rows. Empty when lo > hi.
struct TileBounds {
    int64_t lo, hi, full_lo, full_hi;
};

// Rows [q0, q1] (in range): the first row's first key to the last row's last (the bounds never decrease with
// the row and leave no gap); every row attends the last row's first key to the first row's last.
FA_RULE TileBounds row_tile(const Variant& v, int64_t q0, int64_t q1, int64_t seqlen_k) {
    TileBounds t;
    row_bounds(v, q0 + v.q_offset, seqlen_k, t.lo, t.full_hi);
    row_bounds(v, q1 + v.q_offset, seqlen_k, t.full_lo, t.hi);
    return t;
}

// Keys [k0, k1] (in range): row_tile's transpose (a row that attends both ends of the tile attends all of it).
FA_RULE TileBounds key_tile(const Variant& v, int64_t k0, int64_t k1, int64_t seqlen_q) {
    TileBounds t;
    key_rows(v, k0, seqlen_q, t.lo, t.full_hi);
    key_rows(v, k1, seqlen_q, t.full_lo, t.hi);
    return t;
}

// TileBounds as 32-bit ints for the kernels (lengths below 2^31), each clamped to [-1, n] (n: the other axis'
// length), which changes no comparison with an index in [0, n) and keeps lo > hi where it was.
struct TileBounds32 {
    int lo, hi, full_lo, full_hi;
};

FA_RULE int clamp_index(int64_t x, int64_t n) { return int(x < -1 ? -1 : (x > n ? n : x)); }

FA_RULE TileBounds32 narrow(const TileBounds& t, int64_t n) {
    return TileBounds32{clamp_index(t.lo, n), clamp_index(t.hi, n), clamp_index(t.full_lo, n),
                        clamp_index(t.full_hi, n)};
}

// Whether [a0, a1] of the other axis lies inside what every row (key) of the tile pairs with.
template <class Bounds>
FA_RULE bool encloses(const Bounds& t, int64_t a0, int64_t a1) {
    return t.full_lo <= a0 && t.full_hi >= a1;
}

// Keys [lo, hi] that some row of the tile of rows [q0, q1] (in range) attends. Empty when lo > hi.
FA_RULE void tile_keys(const Variant& v, int64_t q0, int64_t q1, int64_t seqlen_k, int64_t& lo, int64_t& hi) {
    const TileBounds t = row_tile(v, q0, q1, seqlen_k);
    lo = t.lo;
    hi = t.hi;
}

// Rows [lo, hi] that attend some key of the tile of keys [k0, k1] (in range): tile_keys' transpose.
FA_RULE void tile_rows(const Variant& v, int64_t k0, int64_t k1, int64_t seqlen_q, int64_t& lo, int64_t& hi) {
    const TileBounds t = key_tile(v, k0, k1, seqlen_q);
    lo = t.lo;
    hi = t.hi;
}

// Whether every row of [q0, q1] attends every key of [k0, k1] (keys in range).
FA_RULE bool tile_full(const Variant& v, int64_t q0, int64_t q1, int64_t k0, int64_t k1, int64_t seqlen_k) {
    return encloses(row_tile(v, q0, q1, seqlen_k), k0, k1);
}

// EMPTY / PARTIAL / FULL of the tile rows [q0, q1] x keys [k0, k1] (in range) under the band and the chunk
// (fastattn.variants.tile_states).
FA_RULE int8_t tile_state(const Variant& v, int64_t q0, int64_t q1, int64_t k0, int64_t k1, int64_t seqlen_k) {
    int64_t lo, hi;
    tile_keys(v, q0, q1, seqlen_k, lo, hi);
    if (hi < k0 || lo > k1) return kTileEmpty;
    return tile_full(v, q0, q1, k0, k1, seqlen_k) ? kTileFull : kTilePartial;
}

// ---------------------------------------------------------------------------------------------- scores

// The exponential of the kernel's float-like type F (float on the GPU and in the emulator; the CPU kernel
// specialises it for at::vec's vectors), as exp2.
template <class F>
struct Math;

template <>
struct Math<float> {
    static FA_RULE float exp2(float x) { return exp2f(x); }
};

// a / b: on the GPU the approximate division (about 2 ulp, no call to the IEEE division's slow path, whose saved
// registers spill in the kernels' loops; a denominator above 2^126 gives 0, the right limit here).
template <class F>
FA_RULE F fast_div(F a, F b) {
    return a / b;
}
FA_RULE float fast_div(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdividef(a, b);
#else
    return a / b;
#endif
}

// tanh(x) = 1 - 2 / (e^{2x} + 1): exact at the saturated ends, about 1e-7 absolute near 0 in fp32, one
// exponential and one division (the Triton kernels use the same formula).
template <class F>
FA_RULE F tanh_of(F x) {
    return F(1.f) - fast_div(F(2.f), Math<F>::exp2(x * F(2.f * kLog2e)) + F(1.f));
}

// How raw dot products become scores in a kernel's unit (log2(e) for exp2, 1 for natural): scale, and the
// softcap. With a softcap, s = post * tanh(pre * raw) (pre = scale / softcap, post = softcap * unit);
// without, s = pre * raw (pre = scale * unit).
struct ScoreScale {
    float pre, post;
    bool softcap;
};

// v by value: taken by reference to the CUDA backward's local variant, it cost the sm_90 dK/dV kernel at head dim
// 256 32 more spill bytes (nvcc 13.0); inlined, the copy is free.
FA_RULE ScoreScale score_scale(float scale, Variant v, float unit) {
    if (v.softcap > 0.f) return ScoreScale{scale / v.softcap, v.softcap * unit, true};
    return ScoreScale{scale * unit, 1.f, false};
}

// Whether v forms scores other than scale * q.k (a softcap, ALiBi): the kernels' kMod instantiation, which
// goes through scaled_score, alibi_bias and score_grad; the plain one multiplies by the scale alone.
FA_RULE bool modifies_scores(const Variant& v) { return v.softcap > 0.f || v.alibi != nullptr; }

// The score of a raw dot product (before ALiBi and the mask), and the softcap's tanh in t (for softcap_grad;
// left unset without a softcap).
template <class F>
FA_RULE F scaled_score(F raw, const ScoreScale& m, F& t) {
    if (m.softcap) {
        t = tanh_of(raw * F(m.pre));
        return t * F(m.post);
    }
    return raw * F(m.pre);
}

// Query head h's ALiBi slope in the kernel's unit (0 without ALiBi).
FA_RULE float alibi_slope(const Variant& v, int64_t b, int64_t h, float unit) {
    return v.alibi != nullptr ? v.alibi[b * v.alibi_stride_b + h] * unit : 0.f;
}

// ALiBi's term -slope * |pos - j| (slope in the kernel's unit).
FA_RULE float alibi_bias(float slope, int64_t pos, int64_t j) {
    return -slope * float(pos >= j ? pos - j : j - pos);
}

// The gradient of the score before the softcap from the one after it: ds * (1 - tanh^2).
template <class F>
FA_RULE F softcap_grad(F ds, F t) {
    return ds * (F(1.f) - t * t);
}

// The gradient of the raw score's scaled value from that of the score scaled_score formed (t: its tanh):
// the backward's one hook for the rules of scaled_score (ALiBi and the mask add terms of derivative 1).
template <class F>
FA_RULE F score_grad(F ds, F t, const ScoreScale& m) {
    return m.softcap ? softcap_grad(ds, t) : ds;
}

// Query head h's sink logit in the kernel's unit (only when v.sinks is set).
FA_RULE float sink_logit(const Variant& v, int64_t h, float unit) { return v.sinks[h] * unit; }

// The sink joins a row's softmax once, at the end: its running max m and sum l (of exp(s - m), in the
// kernel's unit, with exp2 = true for base 2) become those with the sink's logit; returns the factor the row's
// accumulator is rescaled by. A row that attended nothing (m = -inf, l = 0) gets l = 1 at m = the sink.
FA_RULE float add_sink(float sink, float& m, float& l, bool base2) {
    const float m_new = m > sink ? m : sink;
    const float alpha = m == -INFINITY ? 0.f : (base2 ? exp2f(m - m_new) : expf(m - m_new));
    l = l * alpha + (base2 ? exp2f(sink - m_new) : expf(sink - m_new));
    m = m_new;
    return alpha;
}

}  // namespace rules
}  // namespace fastattn

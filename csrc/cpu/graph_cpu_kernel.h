// Fused graph attention (GAT, GATv2, graph-transformer dot product) on the CPU, compiled once per
// instruction set by graph_cpu_{avx512,avx2,default}.cpp.
//
// Design note
// -----------
// Work: a target node i owns the CSR row of its incoming edges. The forward walks that row in blocks of
// kBlock edges: it gathers the block's source rows (all heads at once, H·C contiguous floats), scores
// every (edge, head), raises the running max once per block, rescales the accumulator, and adds the
// block's probabilities times the value rows — FlashAttention's online softmax with a block of edges
// in place of a key tile. Nothing per edge is written but the optional probabilities (E × H) for
// return_attention_weights; per thread the scratch is O(kBlock · H · C).
//
// FLOPs per edge and head (C channels, De edge features): dot 4C (score, value), GAT 2C + 2,
// GATv2 6C, plus 2·De·C for the edge projection W_e e_ij computed on the fly (kDot, kGatV2). Minimum
// bytes: the node features once (N · H · C), the graph (E · 16 for col and eid) and, for the
// backward, E · H · 8 of per-edge scalars. Per edge the forward touches H·C·4 bytes of one gathered
// source row for 4–6 FLOPs per element, so it is bound by the gather (memory latency and L2/L3
// bandwidth), not by arithmetic: the bound to reach is the rate of random 512-byte row reads of
// the machine (at H·C = 128), a few GB/s per core, i.e. tens of ns per edge per core. Latency, not
// bandwidth, is what a plain loop hits (one row's 8 cache lines at a time), so every pass
// prefetches the rows of the edges ahead (the next block; kAhead edges in the backward): measured
// on the 2-core EPYC, 20k nodes / 340k edges, H = 8, C = 16, one thread, CPU time: GATv2 forward
// 81 -> 53 ms, backward 243 -> 124 ms; GAT 62 -> 27 and 132 -> 78 ms (about 80 ns per edge forward).
//
// Backward, two passes, no atomics, results independent of the thread count:
//  1. by target (CSR): recompute each edge's score, p = exp(s − lse), dp = dO_i · v_j,
//     ds = p (dp − Δ_i) with Δ_i = dO_i · O_i − dlse_i; write the kept probability P and ds per edge
//     (E × H fp32 each: the only per-edge storage), accumulate the target-side gradient, the edge
//     features' gradient (per edge, or its logit for GAT) and the parameter gradients (att, W_e) into
//     per-chunk partials that the dispatcher sums in a fixed order;
//  2. by source (CSC): gather P and ds of each outgoing edge and accumulate the source-side gradients
//     (keys and values, or x_l for GATv2, whose LeakyReLU derivative is recomputed from the features).
// Dropout regenerates each (edge, head) keep bit from the counter-based Philox of
// graph_cpu_params.h, so the backward replays the forward's mask without storing it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "graph_cpu_params.h"

namespace fastattn_cpu {
namespace graph {
namespace CPU_CAPABILITY {
namespace {

using c10::BFloat16;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 16;  // edges scored per running-max update
constexpr int64_t kAhead = 8;   // edges the backward prefetches ahead
constexpr int64_t kV = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------- rows and vector helpers

// Row `index` of a (rows, n) matrix as fp32: the row itself for float32, widened into buf for bfloat16.
inline const float* row(const float* base, int64_t index, int64_t n, float*) { return base + index * n; }

inline const float* row(const BFloat16* base, int64_t index, int64_t n, float* buf) {
  const uint16_t* r = reinterpret_cast<const uint16_t*>(base + index * n);
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = uint32_t(r[k]) << 16;  // bf16 is the top half of a float32
    __builtin_memcpy(buf + k, &bits, sizeof(float));
  }
  return buf;
}

inline void store_row(const float* s, float* d, int64_t n) { std::memcpy(d, s, n * sizeof(float)); }

inline void store_row(const float* s, BFloat16* d, int64_t n) {
  for (int64_t k = 0; k < n; ++k) d[k] = BFloat16(s[k]);
}

inline float lrelu(float z, float slope) { return z > 0.f ? z : z * slope; }

// Gathered rows are random reads from node tables of megabytes: ask for them ahead of use. always_inline: GCC
// deletes a call to a function whose only effect is a prefetch unless it is inlined first (decode_cpu_kernel.h).
template <typename T>
__attribute__((always_inline)) inline void prefetch_row(const T* base, int64_t index, int64_t n) {
  const char* p = reinterpret_cast<const char*>(base + index * n);
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t k = 0;
  float s = 0.f;
  if (n >= kV) {
    Vec acc(0.f);
    for (; k + kV <= n; k += kV) acc = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), acc);
    s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  }
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// y += alpha · x
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const Vec va(alpha);
  int64_t k = 0;
  for (; k + kV <= n; k += kV) at::vec::fmadd(va, Vec::loadu(x + k), Vec::loadu(y + k)).store(y + k);
  for (; k < n; ++k) y[k] += alpha * x[k];
}

// out = a + b (+ c when c is not null); out may alias a.
inline void add3(const float* a, const float* b, const float* c, float* out, int64_t n) {
  int64_t k = 0;
  if (c != nullptr) {
    for (; k + kV <= n; k += kV) (Vec::loadu(a + k) + Vec::loadu(b + k) + Vec::loadu(c + k)).store(out + k);
    for (; k < n; ++k) out[k] = a[k] + b[k] + c[k];
  } else {
    for (; k + kV <= n; k += kV) (Vec::loadu(a + k) + Vec::loadu(b + k)).store(out + k);
    for (; k < n; ++k) out[k] = a[k] + b[k];
  }
}

// out = LeakyReLU(z)
inline void lrelu_row(const float* z, float slope, float* out, int64_t n) {
  const Vec zero(0.f), vs(slope);
  int64_t k = 0;
  for (; k + kV <= n; k += kV) {
    const Vec v = Vec::loadu(z + k);
    at::vec::fmadd(vs, at::vec::minimum(v, zero), at::vec::maximum(v, zero)).store(out + k);
  }
  for (; k < n; ++k) out[k] = lrelu(z[k], slope);
}

// out = ds · att ⊙ LeakyReLU'(z)   (the derivative is taken as slope at z = 0, as torch does)
inline void dlrelu_row(float ds, const float* att, const float* z, float slope, float* out, int64_t n) {
  const Vec zero(0.f), vs(slope * ds), vd(ds);
  int64_t k = 0;
  for (; k + kV <= n; k += kV) {
    const Vec g = Vec::blendv(vs, vd, Vec::loadu(z + k) > zero);
    (g * Vec::loadu(att + k)).store(out + k);
  }
  for (; k < n; ++k) out[k] = (z[k] > 0.f ? ds : ds * slope) * att[k];
}

inline void exp_row(float* x, int64_t n) {
  int64_t k = 0;
  for (; k + kV <= n; k += kV) Vec::loadu(x + k).exp().store(x + k);
  for (; k < n; ++k) x[k] = std::exp(x[k]);
}

// The dropout scale of (edge id e, head h): 1/(1-p) kept, 0 dropped, 1 without dropout.
inline float keep_scale(const GraphParams& p, int64_t e, int64_t h) {
  if (!p.dropout) return 1.f;
  const uint64_t elem = p.rng_offset + uint64_t(e) * uint64_t(p.H) + uint64_t(h);
  return philox_uniform(p.k0, p.k1, elem) >= p.p ? 1.f / (1.f - p.p) : 0.f;
}

// The edge-feature reader every pass shares (one per thread).
template <typename T>
struct Edges {
  const GraphParams& p;
  const T* edge_attr;
  const T* loop_attr;
  int64_t width;  // De (raw features) or H (GAT logits)
  std::vector<float> buf;
  const float* raw = nullptr;  // the last features read, fp32

  explicit Edges(const GraphParams& params)
      : p(params),
        edge_attr(static_cast<const T*>(params.edge_attr)),
        loop_attr(static_cast<const T*>(params.loop_attr)),
        width(params.kind == kGat ? params.H : params.De),
        buf(std::max<int64_t>(width, 1)) {}

  // Edge id e's feature row (real edge or added self loop), as fp32.
  const float* features(int64_t e) {
    raw = e < p.E ? row(edge_attr, e, width, buf.data()) : row(loop_attr, e - p.E, width, buf.data());
    return raw;
  }

  // out (H·C) = W_e e_ij for kDot/kGatV2; out (H) = the logits for kGat.
  void project(int64_t e, float* out) {
    const float* f = features(e);
    if (p.kind == kGat) {
      std::memcpy(out, f, p.H * sizeof(float));
      return;
    }
    const int64_t HC = p.H * p.C;
    std::fill(out, out + HC, 0.f);
    for (int64_t d = 0; d < p.De; ++d) axpy(f[d], p.proj_t + d * HC, out, HC);
  }

  // Writes the gradient of edge e's feature row (or logits), in the input dtype.
  void store_grad(int64_t e, const float* g) {
    T* d = e < p.E ? static_cast<T*>(p.d_edge_attr) + e * width : static_cast<T*>(p.d_loop_attr) + (e - p.E) * width;
    store_row(g, d, width);
  }
};

// ------------------------------------------------------------------ forward

template <int KIND, typename T>
void fwd_range(const GraphParams& p, int64_t t0, int64_t t1) {
  const int64_t H = p.H, C = p.C, Cv = p.Cv, HC = H * C, HCv = H * Cv;
  const int64_t Ks = KIND == kGat ? H : HC;  // width of a score-side node row
  const float slope = p.slope;
  const bool edge = p.has_edge;
  const T* dst = static_cast<const T*>(p.dst);
  const T* src = static_cast<const T*>(p.src);
  const T* val = KIND == kGatV2 ? src : static_cast<const T*>(p.values);
  T* out = static_cast<T*>(p.out);
  Edges<T> edges(p);
  std::vector<float> dbuf(Ks), kbuf(kBlock * Ks), vbuf(kBlock * HCv), ebuf(Ks), z(HC), s(kBlock * H), acc(HCv),
      m(H), l(H), orow(HCv);
  const float* krows[kBlock];
  const float* vrows[kBlock];

  for (int64_t i = t0; i < t1; ++i) {
    const float* drow = row(dst, i, Ks, dbuf.data());
    if (KIND == kDot) {  // q · scale, once per target
      for (int64_t k = 0; k < HC; ++k) dbuf[k] = drow[k] * p.scale;
      drow = dbuf.data();
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), 0.f);
    const int64_t begin = p.rowptr[i], end = p.rowptr[i + 1];
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int64_t nb = std::min(kBlock, end - b0);
      for (int64_t q = b0 + kBlock; q < std::min(b0 + 2 * kBlock, p.rowptr[t1]); ++q) {  // the next block's rows
        prefetch_row(src, p.col[q], Ks);
        if (KIND != kGatV2) prefetch_row(val, p.col[q], HCv);
      }
      // Scores of the block: all heads of each edge from one gathered source row.
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t j = p.col[b0 + b];
        float* sb = s.data() + b * H;
        const float* kr = row(src, j, Ks, kbuf.data() + b * Ks);
        const float* vr = KIND == kGatV2 ? kr : row(val, j, HCv, vbuf.data() + b * HCv);
        if (edge) edges.project(p.eid[b0 + b], ebuf.data());
        if (KIND == kDot) {
          if (edge) {  // k_j + e_ij and v_j + e_ij (Cv == C), into this edge's slots of the block
            add3(kr, ebuf.data(), nullptr, kbuf.data() + b * Ks, HC);
            add3(vr, ebuf.data(), nullptr, vbuf.data() + b * HCv, HC);
            kr = kbuf.data() + b * Ks, vr = vbuf.data() + b * HCv;
          }
          for (int64_t h = 0; h < H; ++h) sb[h] = dot(drow + h * C, kr + h * C, C);
        } else if (KIND == kGat) {
          for (int64_t h = 0; h < H; ++h) sb[h] = lrelu(kr[h] + drow[h] + (edge ? ebuf[h] : 0.f), slope);
        } else {
          add3(kr, drow, edge ? ebuf.data() : nullptr, z.data(), HC);
          lrelu_row(z.data(), slope, z.data(), HC);
          for (int64_t h = 0; h < H; ++h) sb[h] = dot(p.att + h * C, z.data() + h * C, C);
        }
        krows[b] = kr;
        vrows[b] = vr;
        if (p.probs != nullptr) std::memcpy(p.probs + (b0 + b) * H, sb, H * sizeof(float));
      }
      // One running-max update per block, then the block's weighted values.
      for (int64_t h = 0; h < H; ++h) {
        float mb = m[h];
        for (int64_t b = 0; b < nb; ++b) mb = std::max(mb, s[b * H + h]);
        const float alpha = std::exp(m[h] - mb);  // 0 on the first block (m = -inf)
        if (alpha != 1.f) {
          l[h] *= alpha;
          for (int64_t c = 0; c < Cv; ++c) acc[h * Cv + c] *= alpha;
        }
        m[h] = mb;
      }
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t h = 0; h < H; ++h) s[b * H + h] -= m[h];
      exp_row(s.data(), nb * H);
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t e = p.eid[b0 + b];
        for (int64_t h = 0; h < H; ++h) {
          const float pr = s[b * H + h];
          l[h] += pr;  // the normaliser never includes dropout
          if (p.dropout && keep_scale(p, e, h) == 0.f) continue;
          axpy(pr, vrows[b] + h * Cv, acc.data() + h * Cv, Cv);
        }
      }
    }
    const float inv_keep = p.dropout ? 1.f / (1.f - p.p) : 1.f;
    for (int64_t h = 0; h < H; ++h) {
      const bool empty = l[h] == 0.f;  // no incoming edge: zeros and lse -inf
      const float r = empty ? 0.f : inv_keep / l[h];
      for (int64_t c = 0; c < Cv; ++c) orow[h * Cv + c] = acc[h * Cv + c] * r;
      p.lse[i * H + h] = empty ? kNegInf : m[h] + std::log(l[h]);
    }
    store_row(orow.data(), out + i * HCv, HCv);
    if (p.probs != nullptr)
      for (int64_t q = begin; q < end; ++q)
        for (int64_t h = 0; h < H; ++h) p.probs[q * H + h] = std::exp(p.probs[q * H + h] - p.lse[i * H + h]);
  }
}

// ------------------------------------------------------------------ backward, pass 1: by target

template <int KIND, typename T>
void bwd_target_range(const GraphParams& p, int64_t chunk, int64_t t0, int64_t t1) {
  const int64_t H = p.H, C = p.C, Cv = p.Cv, HC = H * C, HCv = H * Cv, De = p.De;
  const int64_t Ks = KIND == kGat ? H : HC;
  const float slope = p.slope;
  const bool edge = p.has_edge, proj_grad = edge && KIND != kGat;
  const T* dst = static_cast<const T*>(p.dst);
  const T* src = static_cast<const T*>(p.src);
  const T* val = KIND == kGatV2 ? src : static_cast<const T*>(p.values);
  const T* dout = static_cast<const T*>(p.dout);
  const T* o = static_cast<const T*>(p.o);
  float* datt = KIND == kGatV2 ? p.d_att_part + chunk * HC : nullptr;
  float* dproj = proj_grad ? p.d_proj_part + chunk * De * HC : nullptr;
  Edges<T> edges(p);
  std::vector<float> dbuf(Ks), gbuf(HCv), obuf(HCv), delta(H), sc(H), dp(H), gd(Ks), kbuf(Ks), vbuf(HCv), er(Ks),
      z(HC), lz(HC), dz(HC), dea(std::max<int64_t>(De, H));

  for (int64_t i = t0; i < t1; ++i) {
    const int64_t begin = p.rowptr[i], end = p.rowptr[i + 1];
    if (begin == end) {  // no incoming edge: no gradient to the target
      std::fill(gd.begin(), gd.end(), 0.f);
      store_row(gd.data(), static_cast<T*>(p.d_dst) + i * Ks, Ks);
      continue;
    }
    const float* drow = row(dst, i, Ks, dbuf.data());
    const float* go = row(dout, i, HCv, gbuf.data());
    const float* orow = row(o, i, HCv, obuf.data());
    for (int64_t h = 0; h < H; ++h)
      delta[h] = dot(go + h * Cv, orow + h * Cv, Cv) - (p.dlse ? p.dlse[i * H + h] : 0.f);
    std::fill(gd.begin(), gd.end(), 0.f);
    const float* lse = p.lse_in + i * H;
    for (int64_t q = begin; q < end; ++q) {
      const int64_t j = p.col[q], e = p.eid[q];
      if (q + kAhead < p.rowptr[t1]) {
        prefetch_row(src, p.col[q + kAhead], Ks);
        if (KIND != kGatV2) prefetch_row(val, p.col[q + kAhead], HCv);
      }
      const float* kr = row(src, j, Ks, kbuf.data());
      const float* vr = KIND == kGatV2 ? kr : row(val, j, HCv, vbuf.data());
      if (edge) edges.project(e, er.data());
      if (KIND == kDot && edge) {
        add3(kr, er.data(), nullptr, kbuf.data(), HC);
        add3(vr, er.data(), nullptr, vbuf.data(), HC);
        kr = kbuf.data(), vr = vbuf.data();
      }
      if (KIND == kGatV2) {
        add3(kr, drow, edge ? er.data() : nullptr, z.data(), HC);
        lrelu_row(z.data(), slope, lz.data(), HC);
      }
      for (int64_t h = 0; h < H; ++h) {
        if (KIND == kDot)
          sc[h] = p.scale * dot(drow + h * C, kr + h * C, C);
        else if (KIND == kGat)
          sc[h] = lrelu(kr[h] + drow[h] + (edge ? er[h] : 0.f), slope);
        else
          sc[h] = dot(p.att + h * C, lz.data() + h * C, C);
        sc[h] -= lse[h];
        dp[h] = dot(go + h * Cv, vr + h * Cv, Cv);
      }
      exp_row(sc.data(), H);
      for (int64_t h = 0; h < H; ++h) {
        const float pr = sc[h], ks = keep_scale(p, e, h);
        const float ds = pr * (ks * dp[h] - delta[h]);
        const float pk = pr * ks;
        p.P[q * H + h] = pk;
        if (KIND == kDot) {
          const float dss = ds * p.scale;
          p.DS[q * H + h] = dss;
          axpy(dss, kr + h * C, gd.data() + h * C, C);
          if (proj_grad) {  // d(e_ij) = ds·scale·q_i (key side) + p·dO_i (value side)
            std::fill(dz.data() + h * C, dz.data() + (h + 1) * C, 0.f);
            axpy(dss, drow + h * C, dz.data() + h * C, C);
            axpy(pk, go + h * C, dz.data() + h * C, C);
          }
        } else if (KIND == kGat) {
          const float pre = kr[h] + drow[h] + (edge ? er[h] : 0.f);
          const float dpre = pre > 0.f ? ds : ds * slope;
          p.DS[q * H + h] = dpre;
          gd[h] += dpre;
          dea[h] = dpre;
        } else {
          p.DS[q * H + h] = ds;
          dlrelu_row(ds, p.att + h * C, z.data() + h * C, slope, dz.data() + h * C, C);
          axpy(ds, lz.data() + h * C, datt + h * C, C);
        }
      }
      if (KIND == kGatV2) axpy(1.f, dz.data(), gd.data(), HC);
      if (KIND == kGat && edge) edges.store_grad(e, dea.data());
      if (proj_grad) {
        // d e_raw = W_eᵀ d(W_e e), dW_eᵀ += e_raw ⊗ d(W_e e); edges.raw still holds e's features.
        for (int64_t d = 0; d < De; ++d) {
          dea[d] = dot(p.proj_t + d * HC, dz.data(), HC);
          axpy(edges.raw[d], dz.data(), dproj + d * HC, HC);
        }
        edges.store_grad(e, dea.data());
      }
    }
    store_row(gd.data(), static_cast<T*>(p.d_dst) + i * Ks, Ks);
  }
}

// ------------------------------------------------------------------ backward, pass 2: by source

template <int KIND, typename T>
void bwd_source_range(const GraphParams& p, int64_t s0, int64_t s1) {
  const int64_t H = p.H, C = p.C, Cv = p.Cv, HC = H * C, HCv = H * Cv;
  const int64_t Ks = KIND == kGat ? H : HC;
  const float slope = p.slope;
  const bool edge = p.has_edge;
  const T* dst = static_cast<const T*>(p.dst);
  const T* src = static_cast<const T*>(p.src);
  const T* dout = static_cast<const T*>(p.dout);
  Edges<T> edges(p);
  std::vector<float> kbuf(Ks), gbuf(HCv), qbuf(Ks), er(Ks), z(HC), dz(HC), gs(Ks), gv(HCv);

  for (int64_t j = s0; j < s1; ++j) {
    const float* kr = KIND == kGatV2 ? row(src, j, Ks, kbuf.data()) : nullptr;
    std::fill(gs.begin(), gs.end(), 0.f);
    std::fill(gv.begin(), gv.end(), 0.f);
    for (int64_t t = p.colptr[j]; t < p.colptr[j + 1]; ++t) {
      const int64_t i = p.row[t], q = p.slot[t];
      if (t + kAhead < p.colptr[s1]) {
        const int64_t ia = p.row[t + kAhead];
        prefetch_row(dout, ia, HCv);
        if (KIND != kGat) prefetch_row(dst, ia, Ks);
        __builtin_prefetch(p.P + p.slot[t + kAhead] * H);
        __builtin_prefetch(p.DS + p.slot[t + kAhead] * H);
      }
      const float* P = p.P + q * H;
      const float* DS = p.DS + q * H;
      const float* go = row(dout, i, HCv, gbuf.data());
      if (KIND == kDot) {
        const float* qr = row(dst, i, Ks, qbuf.data());
        for (int64_t h = 0; h < H; ++h) {
          axpy(DS[h], qr + h * C, gs.data() + h * C, C);
          axpy(P[h], go + h * Cv, gv.data() + h * Cv, Cv);
        }
      } else if (KIND == kGat) {
        for (int64_t h = 0; h < H; ++h) {
          gs[h] += DS[h];
          axpy(P[h], go + h * Cv, gv.data() + h * Cv, Cv);
        }
      } else {
        const float* xr = row(dst, i, Ks, qbuf.data());
        if (edge) edges.project(p.eid[q], er.data());
        add3(kr, xr, edge ? er.data() : nullptr, z.data(), HC);
        for (int64_t h = 0; h < H; ++h) {
          dlrelu_row(DS[h], p.att + h * C, z.data() + h * C, slope, dz.data() + h * C, C);
          axpy(P[h], go + h * C, dz.data() + h * C, C);
        }
        axpy(1.f, dz.data(), gs.data(), HC);
      }
    }
    store_row(gs.data(), static_cast<T*>(p.d_src) + j * Ks, Ks);
    if (KIND != kGatV2) store_row(gv.data(), static_cast<T*>(p.d_values) + j * HCv, HCv);
  }
}

// ------------------------------------------------------------------ drivers

int64_t default_chunks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(n, int64_t(at::get_num_threads()) * 8));
}

template <int KIND, typename T>
void fwd_impl(const GraphParams& p) {
  const int64_t n = default_chunks(p.Nd);
  std::vector<int64_t> bounds(n + 1);
  balanced_bounds(p.rowptr, p.Nd, n, bounds.data());
  at::parallel_for(0, n, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fwd_range<KIND, T>(p, bounds[c], bounds[c + 1]);
  });
}

template <int KIND, typename T>
void bwd_impl(const GraphParams& p) {
  std::vector<int64_t> tb(p.n_chunks + 1);
  balanced_bounds(p.rowptr, p.Nd, p.n_chunks, tb.data());
  at::parallel_for(0, p.n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) bwd_target_range<KIND, T>(p, c, tb[c], tb[c + 1]);
  });
  const int64_t n = default_chunks(p.Ns);
  std::vector<int64_t> sb(n + 1);
  balanced_bounds(p.colptr, p.Ns, n, sb.data());
  at::parallel_for(0, n, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) bwd_source_range<KIND, T>(p, sb[c], sb[c + 1]);
  });
}

template <typename T>
void fwd_typed(const GraphParams& p) {
  if (p.kind == kDot) return fwd_impl<kDot, T>(p);
  if (p.kind == kGat) return fwd_impl<kGat, T>(p);
  return fwd_impl<kGatV2, T>(p);
}

template <typename T>
void bwd_typed(const GraphParams& p) {
  if (p.kind == kDot) return bwd_impl<kDot, T>(p);
  if (p.kind == kGat) return bwd_impl<kGat, T>(p);
  return bwd_impl<kGatV2, T>(p);
}

}  // namespace

void fwd_entry(const GraphParams& p) { p.bf16 ? fwd_typed<BFloat16>(p) : fwd_typed<float>(p); }
void bwd_entry(const GraphParams& p) { p.bf16 ? bwd_typed<BFloat16>(p) : bwd_typed<float>(p); }

}  // namespace CPU_CAPABILITY
}  // namespace graph
}  // namespace fastattn_cpu

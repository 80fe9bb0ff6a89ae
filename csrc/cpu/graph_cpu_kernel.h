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
// the machine (at H·C = 128), a few GB/s per core, i.e. tens of ns per edge per core.
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
constexpr int64_t kBlock = 16;  // edges scored per running-max update
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline void load_row(const float* __restrict s, float* __restrict d, int64_t n) { std::memcpy(d, s, n * sizeof(float)); }

inline void load_row(const BFloat16* __restrict s, float* __restrict d, int64_t n) {
  const uint16_t* r = reinterpret_cast<const uint16_t*>(s);
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = uint32_t(r[k]) << 16;  // bf16 is the top half of a float32
    __builtin_memcpy(d + k, &bits, sizeof(float));
  }
}

inline void store_row(const float* __restrict s, float* __restrict d, int64_t n) { std::memcpy(d, s, n * sizeof(float)); }

inline void store_row(const float* __restrict s, BFloat16* __restrict d, int64_t n) {
  for (int64_t k = 0; k < n; ++k) d[k] = BFloat16(s[k]);
}

inline float lrelu(float z, float slope) { return z > 0.f ? z : z * slope; }

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

inline void axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

// The dropout scale of (edge id e, head h): 1/(1-p) kept, 0 dropped, 1 without dropout.
inline float keep_scale(const GraphParams& p, int64_t e, int64_t h) {
  if (!p.dropout) return 1.f;
  const uint64_t elem = p.rng_offset + uint64_t(e) * uint64_t(p.H) + uint64_t(h);
  return philox_uniform(p.k0, p.k1, elem) >= p.p ? 1.f / (1.f - p.p) : 0.f;
}

// Per-thread rows and the edge-feature reader every pass shares.
template <typename T>
struct Edges {
  const GraphParams& p;
  const T* edge_attr;
  const T* loop_attr;
  int64_t width;  // De (raw features) or H (GAT logits)
  std::vector<float> raw;

  explicit Edges(const GraphParams& params)
      : p(params),
        edge_attr(static_cast<const T*>(params.edge_attr)),
        loop_attr(static_cast<const T*>(params.loop_attr)),
        width(params.kind == kGat ? params.H : params.De),
        raw(std::max<int64_t>(width, 1)) {}

  // Edge id e's feature row (real edge or added self loop), widened to fp32.
  const float* features(int64_t e) {
    const T* r = e < p.E ? edge_attr + e * width : loop_attr + (e - p.E) * width;
    load_row(r, raw.data(), width);
    return raw.data();
  }

  // out (H·C) = W_e e_ij for kDot/kGatV2; the H logits for kGat.
  void project(int64_t e, float* __restrict out) {
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
  const T* dst = static_cast<const T*>(p.dst);
  const T* src = static_cast<const T*>(p.src);
  const T* val = KIND == kGatV2 ? src : static_cast<const T*>(p.values);
  T* out = static_cast<T*>(p.out);
  Edges<T> edges(p);
  std::vector<float> drow(Ks), kbuf(kBlock * Ks), vbuf(KIND == kGatV2 ? 1 : kBlock * HCv), ebuf(kBlock * Ks), z(HC),
      s(kBlock * H), acc(HCv), m(H), l(H), orow(HCv);

  for (int64_t i = t0; i < t1; ++i) {
    load_row(dst + i * Ks, drow.data(), Ks);
    if (KIND == kDot)
      for (int64_t k = 0; k < HC; ++k) drow[k] *= p.scale;
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), 0.f);
    const int64_t begin = p.rowptr[i], end = p.rowptr[i + 1];
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int64_t nb = std::min(kBlock, end - b0);
      // Scores of the block: all heads of each edge from one gathered source row.
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t j = p.col[b0 + b], e = p.eid[b0 + b];
        float* kr = kbuf.data() + b * Ks;
        float* er = ebuf.data() + b * Ks;
        float* sb = s.data() + b * H;
        load_row(src + j * Ks, kr, Ks);
        if (KIND != kGatV2) load_row(val + j * HCv, vbuf.data() + b * HCv, HCv);
        if (p.has_edge) edges.project(e, er);
        if (KIND == kDot) {
          if (p.has_edge) {
            axpy(1.f, er, kr, HC);  // k_j + e_ij
            axpy(1.f, er, vbuf.data() + b * HCv, HC);  // v_j + e_ij (Cv == C)
          }
          for (int64_t h = 0; h < H; ++h) sb[h] = dot(drow.data() + h * C, kr + h * C, C);
        } else if (KIND == kGat) {
          for (int64_t h = 0; h < H; ++h) sb[h] = lrelu(kr[h] + drow[h] + (p.has_edge ? er[h] : 0.f), p.slope);
        } else {
#pragma omp simd
          for (int64_t k = 0; k < HC; ++k) z[k] = p.att[k] * lrelu(kr[k] + drow[k] + (p.has_edge ? er[k] : 0.f), p.slope);
          for (int64_t h = 0; h < H; ++h) {
            float a = 0.f;
#pragma omp simd reduction(+ : a)
            for (int64_t c = 0; c < C; ++c) a += z[h * C + c];
            sb[h] = a;
          }
        }
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
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t e = p.eid[b0 + b];
        const float* vr = KIND == kGatV2 ? kbuf.data() + b * HC : vbuf.data() + b * HCv;
        for (int64_t h = 0; h < H; ++h) {
          const float pr = std::exp(s[b * H + h] - m[h]);
          l[h] += pr;  // the normaliser never includes dropout
          const float pk = p.dropout ? (keep_scale(p, e, h) != 0.f ? pr : 0.f) : pr;
          if (pk != 0.f) axpy(pk, vr + h * Cv, acc.data() + h * Cv, Cv);
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
  const bool proj_grad = p.has_edge && KIND != kGat;
  const T* dst = static_cast<const T*>(p.dst);
  const T* src = static_cast<const T*>(p.src);
  const T* val = KIND == kGatV2 ? src : static_cast<const T*>(p.values);
  const T* dout = static_cast<const T*>(p.dout);
  const T* o = static_cast<const T*>(p.o);
  float* datt = KIND == kGatV2 ? p.d_att_part + chunk * HC : nullptr;
  float* dproj = proj_grad ? p.d_proj_part + chunk * De * HC : nullptr;
  Edges<T> edges(p);
  std::vector<float> drow(Ks), go(HCv), orow(HCv), delta(H), gd(Ks), kr(Ks), vr(HCv), er(Ks), z(HC), dproj_e(HC),
      dea(std::max<int64_t>(De, H));

  for (int64_t i = t0; i < t1; ++i) {
    load_row(dst + i * Ks, drow.data(), Ks);
    load_row(dout + i * HCv, go.data(), HCv);
    load_row(o + i * HCv, orow.data(), HCv);
    for (int64_t h = 0; h < H; ++h)
      delta[h] = dot(go.data() + h * Cv, orow.data() + h * Cv, Cv) - (p.dlse ? p.dlse[i * H + h] : 0.f);
    std::fill(gd.begin(), gd.end(), 0.f);
    const float* lse = p.lse_in + i * H;
    for (int64_t q = p.rowptr[i]; q < p.rowptr[i + 1]; ++q) {
      const int64_t j = p.col[q], e = p.eid[q];
      load_row(src + j * Ks, kr.data(), Ks);
      if (KIND == kGatV2)
        std::memcpy(vr.data(), kr.data(), HC * sizeof(float));
      else
        load_row(val + j * HCv, vr.data(), HCv);
      if (p.has_edge) edges.project(e, er.data());
      if (KIND == kDot && p.has_edge) {
        axpy(1.f, er.data(), kr.data(), HC);
        axpy(1.f, er.data(), vr.data(), HC);
      }
      if (KIND == kGatV2) {
#pragma omp simd
        for (int64_t k = 0; k < HC; ++k) z[k] = kr[k] + drow[k] + (p.has_edge ? er[k] : 0.f);
      }
      for (int64_t h = 0; h < H; ++h) {
        float sc;
        if (KIND == kDot) {
          sc = p.scale * dot(drow.data() + h * C, kr.data() + h * C, C);
        } else if (KIND == kGat) {
          sc = lrelu(kr[h] + drow[h] + (p.has_edge ? er[h] : 0.f), p.slope);
        } else {
          sc = 0.f;
#pragma omp simd reduction(+ : sc)
          for (int64_t c = 0; c < C; ++c) sc += p.att[h * C + c] * lrelu(z[h * C + c], p.slope);
        }
        const float pr = std::exp(sc - lse[h]);
        const float ks = keep_scale(p, e, h);
        const float dp = ks * dot(go.data() + h * Cv, vr.data() + h * Cv, Cv);
        const float ds = pr * (dp - delta[h]);
        const float pk = pr * ks;
        p.P[q * H + h] = pk;
        if (KIND == kDot) {
          const float dss = ds * p.scale;
          p.DS[q * H + h] = dss;
          axpy(dss, kr.data() + h * C, gd.data() + h * C, C);
          if (proj_grad) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) dproj_e[h * C + c] = dss * drow[h * C + c] + pk * go[h * C + c];
          }
        } else if (KIND == kGat) {
          const float pre = kr[h] + drow[h] + (p.has_edge ? er[h] : 0.f);
          const float dpre = pre > 0.f ? ds : ds * p.slope;
          p.DS[q * H + h] = dpre;
          gd[h] += dpre;
          dea[h] = dpre;
        } else {
          p.DS[q * H + h] = ds;
          const float* a = p.att + h * C;
          const float* zh = z.data() + h * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float dz = ds * a[c] * (zh[c] > 0.f ? 1.f : p.slope);
            gd[h * C + c] += dz;
            datt[h * C + c] += ds * lrelu(zh[c], p.slope);
            dproj_e[h * C + c] = dz;
          }
        }
      }
      if (KIND == kGat && p.has_edge) edges.store_grad(e, dea.data());
      if (proj_grad) {
        // d e_raw = W_eᵀ d(W_e e), dW_eᵀ += e_raw ⊗ d(W_e e); edges.raw still holds e's features.
        const float* f = edges.raw.data();
        for (int64_t d = 0; d < De; ++d) {
          dea[d] = dot(p.proj_t + d * HC, dproj_e.data(), HC);
          axpy(f[d], dproj_e.data(), dproj + d * HC, HC);
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
  const T* dst = static_cast<const T*>(p.dst);
  const T* src = static_cast<const T*>(p.src);
  const T* dout = static_cast<const T*>(p.dout);
  Edges<T> edges(p);
  std::vector<float> kr(Ks), go(HCv), qr(Ks), er(Ks), gs(Ks), gv(HCv);

  for (int64_t j = s0; j < s1; ++j) {
    if (KIND == kGatV2) load_row(src + j * Ks, kr.data(), Ks);
    std::fill(gs.begin(), gs.end(), 0.f);
    std::fill(gv.begin(), gv.end(), 0.f);
    for (int64_t t = p.colptr[j]; t < p.colptr[j + 1]; ++t) {
      const int64_t i = p.row[t], q = p.slot[t];
      const float* P = p.P + q * H;
      const float* DS = p.DS + q * H;
      load_row(dout + i * HCv, go.data(), HCv);
      if (KIND == kDot) {
        load_row(dst + i * Ks, qr.data(), Ks);
        for (int64_t h = 0; h < H; ++h) {
          axpy(DS[h], qr.data() + h * C, gs.data() + h * C, C);
          axpy(P[h], go.data() + h * Cv, gv.data() + h * Cv, Cv);
        }
      } else if (KIND == kGat) {
        for (int64_t h = 0; h < H; ++h) {
          gs[h] += DS[h];
          axpy(P[h], go.data() + h * Cv, gv.data() + h * Cv, Cv);
        }
      } else {
        load_row(dst + i * Ks, qr.data(), Ks);
        if (p.has_edge) edges.project(p.eid[q], er.data());
        for (int64_t h = 0; h < H; ++h) {
          const float ds = DS[h], pk = P[h];
          const float* a = p.att + h * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const int64_t k = h * C + c;
            const float zk = kr[k] + qr[k] + (p.has_edge ? er[k] : 0.f);
            gs[k] += ds * a[c] * (zk > 0.f ? 1.f : p.slope) + pk * go[k];
          }
        }
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

// Plain parameter struct of the fused graph-attention kernels, shared by the dispatcher (graph_cpu.cpp)
// and the per-ISA kernel files (graph_cpu_{avx512,avx2,default}.cpp). No torch headers: only plain data
// crosses between translation units compiled for different instruction sets.
#pragma once

#include <cstdint>

namespace fastattn_cpu {
namespace graph {

// The three scorings (fastattn/graph/_ops.py names them): the per-edge score of target i, source j, head h.
enum Kind : int {
  kDot = 0,    // (q_i · (k_j + e_ij)) · scale, values v_j + e_ij          (TransformerConv)
  kGat = 1,    // LeakyReLU(a_j + b_i + c_ij), values x_j; a, b, c scalars per head   (GATConv)
  kGatV2 = 2,  // att · LeakyReLU(xl_j + xr_i + e_ij), values xl_j          (GATv2Conv)
};

struct GraphParams {
  int kind;
  bool bf16;  // feature tensors are bfloat16 (else float32); accumulation is always fp32
  // Sizes: targets, sources, heads, channels of the score features, channels of the values,
  // edge feature width (0 = none), real edges, all edge ids (real + added self loops).
  int64_t Nd, Ns, H, C, Cv, De, E, Etot;

  // The graph: CSR of incoming edges by target (rowptr (Nd+1), col = source, eid = edge id per slot)
  // and CSC of outgoing edges by source (colptr (Ns+1), row = target, slot = the CSR slot).
  const int64_t* rowptr;
  const int64_t* col;
  const int64_t* eid;
  const int64_t* colptr;
  const int64_t* row;
  const int64_t* slot;

  // Features, contiguous. dst: (Nd, H, C) or (Nd, H) for kGat; src: (Ns, H, C) or (Ns, H) for kGat;
  // values: (Ns, H, Cv), or null for kGatV2 (the values are src).
  const void* dst;
  const void* src;
  const void* values;
  const float* att;  // kGatV2: (H·C) fp32
  // Edge features of edge id e: edge_attr[e] for e < E, loop_attr[e - E] for the added self loops;
  // rows of De elements (kDot, kGatV2: raw features, projected by proj) or H logits (kGat).
  const void* edge_attr;
  const void* loop_attr;
  const float* proj_t;  // (De, H·C) fp32: the edge projection W_e transposed
  bool has_edge;

  float scale;  // kDot
  float slope;  // LeakyReLU's negative slope (kGat, kGatV2)
  // Dropout (the contract of fastattn/graph/_dropout.py): keep (e, h) iff uniform(e·H + h) >= p.
  bool dropout;
  float p;
  uint32_t k0, k1;
  uint64_t rng_offset;

  // Forward outputs: out (Nd, H, Cv) in the input dtype, lse (Nd, H) fp32, probs (Etot, H) fp32 per
  // CSR slot (softmax before dropout) or null.
  void* out;
  float* lse;
  float* probs;

  // Backward inputs: grad_out and out (Nd, H, Cv) in the input dtype, lse (Nd, H), grad_lse or null.
  const void* dout;
  const void* o;
  const float* lse_in;
  const float* dlse;
  // Backward scratch, per CSR slot (Etot, H) fp32: the kept probability and the score gradient.
  float* P;
  float* DS;
  // Backward outputs, contiguous, in the input dtype: d_dst, d_src, d_values (null for kGatV2),
  // d_edge_attr (zeros beforehand: dropped self loops keep 0), d_loop_attr.
  void* d_dst;
  void* d_src;
  void* d_values;
  void* d_edge_attr;
  void* d_loop_attr;
  // Parameter gradients as per-chunk fp32 partials: d_att (n_chunks, H·C), d_proj_t (n_chunks, De, H·C).
  float* d_att_part;
  float* d_proj_part;
  int64_t n_chunks;  // chunks of the backward's target pass (balanced_bounds): fixed by the problem alone
};

// Boundaries (n_chunks + 1) of contiguous node ranges of about equal cost, cost(t) = ptr[t] + t (edges plus
// nodes before node t): a hub's edges do not land on one thread, and isolated nodes still count.
inline void balanced_bounds(const int64_t* ptr, int64_t n, int64_t n_chunks, int64_t* bounds) {
  const int64_t total = ptr[n] + n;
  bounds[0] = 0;
  for (int64_t c = 1; c < n_chunks; ++c) {
    const int64_t want = (total * c) / n_chunks;
    int64_t lo = bounds[c - 1], hi = n;  // the first t with cost(t) >= want
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (ptr[mid] + mid >= want)
        hi = mid;
      else
        lo = mid + 1;
    }
    bounds[c] = lo;
  }
  bounds[n_chunks] = n;
}

struct GraphKernels {
  const char* isa;
  void (*fwd)(const GraphParams&);
  void (*bwd)(const GraphParams&);
};

// Each returns nullptr when that instruction set was not compiled in (non-GCC or non-x86).
const GraphKernels* graph_kernels_avx512();
const GraphKernels* graph_kernels_avx2();
const GraphKernels* graph_kernels_default();

// Philox-4x32-10 exactly as Triton's tl.rand (the contract of fastattn/graph/_dropout.py; the same
// arithmetic as csrc/cuda/dropout.cuh): counter (lo, hi of elem, 0, 0), key (lo, hi of seed); the first
// word as int32, x < 0 ? ~x : x, times 4.6566127342e-10 in fp32.
inline float philox_uniform(uint32_t k0, uint32_t k1, uint64_t elem) {
  uint32_t c0 = uint32_t(elem), c1 = uint32_t(elem >> 32), c2 = 0u, c3 = 0u;
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = uint32_t((uint64_t(0xCD9E8D57u) * a2) >> 32) ^ c1 ^ k0;
    c2 = uint32_t((uint64_t(0xD2511F53u) * a0) >> 32) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = int32_t(c0);
  x = x < 0 ? ~x : x;
  return float(x) * 4.6566127342e-10f;
}

}  // namespace graph
}  // namespace fastattn_cpu

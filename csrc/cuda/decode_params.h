// Parameters of the CUDA decode kernel (csrc/cuda/decode.cu, fastattn.kvcache_attention), shared with its torch
// op (csrc/decode_ops.cpp). Plain C++: no torch or CUDA headers, like params.h.
#pragma once

#include <stdint.h>

#include "../attn_rules.h"
#include "params.h"

namespace fastattn {

// query (B, Hq, Lq, D); the caches addressed as (page, head, slot, dim): a paged cache's pages, or a contiguous
// (B, Hkv, Lmax, D) cache as B pages of page_size = Lmax (block_table null: page b). Any strides, in elements.
struct DecodeParams {
    const void* q;
    const void* k;
    const void* v;
    int64_t q_s[4], k_s[4], v_s[4];
    const int32_t* block_table;  // (B, pages_per_seq) with row stride bt_stride, or null
    int64_t bt_stride;
    const int32_t* seqlens;  // (B,) keys cached before the call; sequence b attends seqlens[b] + new_len keys
    int new_len;
    int batch, heads_q, heads_kv, seqlen_q, head_dim, head_dim_v, page_size, splits;
    float scale;
    // The band with causal folded in, softcap, ALiBi; q_offset and chunk unused (each sequence is aligned
    // bottom-right), sinks unused (the merge adds them).
    rules::Variant variant;
    DType dtype;
    // Per split the normalised partial output (S, B, Hq, Lq, Dv) and its natural-log lse (S, B, Hq, Lq), fp32,
    // contiguous; -inf and zeros for a split with no key.
    float* part_out;
    float* part_lse;
};

// The merge of the splits' partials (decode::merge): row r of (B, Hq, Lq) from part_out (S, rows, Dv) and
// part_lse (S, rows), fp32 contiguous, into out (rows, Dv) in dtype and lse (rows,) fp32.
struct MergeParams {
    const float* part_out;
    const float* part_lse;
    const float* sinks;  // (Hq,) fp32 logits added to every row's denominator, or null
    void* out;
    float* lse;
    int64_t rows;
    int heads_q, seqlen_q, head_dim_v, splits;
    DType dtype;
};

namespace decode {
constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows of a GQA group per block
constexpr int kBlockN = 32;                   // keys per tile: one per lane
constexpr int kMaxHeadDim = 256;              // head_dim and head_dim_v
constexpr int kMergeThreads = 128;           // threads per merged row, over its head_dim_v values
const char* launch(const DecodeParams& p, void* stream);
const char* merge(const MergeParams& p, void* stream);
}  // namespace decode

}  // namespace fastattn

// Parameters of the CUDA backward attention kernels (csrc/cuda/attn_bwd.cu), shared with their torch op
// (csrc/attn_bwd_ops.cpp). Plain C++: no torch or CUDA headers, like params.h.
#pragma once

#include <stdint.h>

#include "attn_params.h"
#include "params.h"

namespace fastattn {

// Gradients of out = softmax(scale · q kᵀ + mask) v given dout, out and the forward's lse:
// dq (B, Hq, Lq, D), dk and dv (B, Hkv, Lk, D). q, k, v, out, dout, dq, dk, dv: last stride 1, other
// strides multiples of 8 elements, 16-byte aligned pointers (16-byte cp.async and vector stores).
// lse and delta: fp32 (B, Hq, Lq), rows contiguous, through lse_stride; delta is the preprocess's output,
// read by the other two. Packed sequences as in AttnFwdParams (the layout, batch strides 0, the longest
// lengths).
struct AttnBwdParams {
    const void* q;
    const void* k;
    const void* v;
    const void* out;
    const void* dout;
    const float* lse;
    float* delta;
    void* dq;
    void* dk;
    void* dv;
    int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], dout_stride[3];  // batch, head, row
    int64_t dq_stride[3], dk_stride[3], dv_stride[3];
    int64_t lse_stride[2];  // batch, head of lse and delta
    int batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
    float scale;
    SeqLayout layout;
    // The variant, as in AttnFwdParams (the sinks are in lse: the kernels never read them).
    rules::Variant variant;
    MaskElem mask_elem;
    const void* mask;
    int64_t mask_stride[4];
    // The float mask's gradient dS, or null: contiguous (B, Hq, Lq, Lk) in the mask's dtype (mask_elem),
    // written whole by the dQ pass (zeros in the tiles it skips and where a pair is masked).
    void* dmask;
    // dQ pass: TileSummary for (kBlockMdq, kBlockN): state (Bm, Hm, nQ, nK), kv_count (Bm, Hm, nQ),
    // kv_index (Bm, Hm, nQ, nK), contiguous int8/int32. Null without a mask tensor (the band is analytic).
    const int8_t* kv_state;
    const int32_t* kv_count;
    const int32_t* kv_index;
    // dK/dV pass: the transposed summary for (kBlockMkv, kBlockN): state (Bm, Hm, nK, nQ), q_count
    // (Bm, Hm, nK), q_index (Bm, Hm, nK, nQ): the non-empty query tiles of each key tile.
    const int8_t* q_state;
    const int32_t* q_count;
    const int32_t* q_index;
    int summary_batch, summary_heads;  // Bm, Hm of both summaries: 1 (broadcast) or B, Hq
    DType dtype;
    DropoutParams dropout;  // the forward's, to regenerate its keep-mask (attn_params.h)
};

namespace attn_bwd {
constexpr int kBlockN = 64;    // keys per tile: resident in the dK/dV pass, streamed in the dQ pass
constexpr int kBlockMkv = 32;  // query rows per tile streamed past the dK/dV pass
constexpr int kBlockMdq = 64;  // query rows per tile resident in the dQ pass
constexpr int kHeadDims[] = {32, 64, 96, 128, 256};
const char* launch(const AttnBwdParams& p, void* stream);
}  // namespace attn_bwd

}  // namespace fastattn

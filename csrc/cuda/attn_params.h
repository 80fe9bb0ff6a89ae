// Parameters of the CUDA forward attention kernel (csrc/cuda/attn_fwd.cu), shared with its torch op
// (csrc/attn_ops.cpp). Plain C++: no torch or CUDA headers, like params.h.
#pragma once

#include <stdint.h>

#include "../attn_rules.h"
#include "params.h"

namespace fastattn {

// Dropout (the contract of fastattn/backends/triton/dropout.py, implemented by cuda/dropout.cuh): philox is
// the int64 [seed, offset] tensor on the device (read by the kernels: no host sync), null without dropout;
// p is the drop rate and scale = 1 / (1 - p).
struct DropoutParams {
    const int64_t* philox;
    float p, scale;
};

// The sequence layout of a launch (the registry's OP_LAYOUT_ARGS): null offsets for a dense batch; for packed
// sequences (varlen_attention) the int32 (B + 1,) offsets of sequence b's query rows cu_seqlens_q[b] ..
// cu_seqlens_q[b + 1] and key rows cu_seqlens_k[b] .., on the device. The kernels turn it into one program's
// sequence (attn_common.cuh: seq_info), so the dense batch is the special case of one code path (the forward
// compiles it twice, kPacked: its dense kernels never look the layout up).
struct SeqLayout {
    const int32_t* cu_seqlens_q;
    const int32_t* cu_seqlens_k;
};

// Element type of the mask tensor: a bool mask is read as bytes, a float one is added to the scores.
enum class MaskElem : int { none = 0, boolean = 1, f32 = 2, f16 = 3, bf16 = 4, f64 = 5 };

// out (B, Hq, Lq, D) = softmax(scale · q kᵀ + mask) v, and lse (B, Hq, Lq) fp32.
// Strides are in elements; the last dim of q, k, v, out has stride 1, every other stride is a
// multiple of 8 and the pointers are 16-byte aligned (16-byte cp.async / vector stores).
// Packed (layout.cu_seqlens_q non-null): q, k, v, out are (1, H, total, D) views of token-major (total, H, D)
// tensors, the lse (1, Hq, total_q); batch is the number of sequences, seqlen_q/seqlen_k are the longest
// sequence's lengths (the grid and the dropout contract's index), and the batch strides are 0 (every sequence
// lives in batch 0, at its offset).
struct AttnFwdParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    float* lse;
    int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];  // batch, head, row
    int64_t lse_stride[2];                                         // batch, head (rows are contiguous)
    int batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
    float scale;
    SeqLayout layout;
    // The variant (csrc/attn_rules.h): the band of AttnParams.bounds (causal folded in), q_offset, chunk,
    // softcap, ALiBi slopes and sinks.
    rules::Variant variant;
    // Optional mask tensor, read through its (B, Hq, Lq, Lk) strides (0 on broadcast dims).
    MaskElem mask_elem;
    const void* mask;
    int64_t mask_stride[4];
    // Optional TileSummary for (kBlockM, block_n(head_dim)): state int8 (Bm, Hm, nQ, nK),
    // kv_count int32 (Bm, Hm, nQ), kv_index int32 (Bm, Hm, nQ, nK), contiguous; Bm, Hm are 1 or B, Hq.
    const int8_t* tile_state;
    const int32_t* kv_count;
    const int32_t* kv_index;
    int summary_batch, summary_heads;
    DType dtype;
    DropoutParams dropout;
};

// keep (B, Hq, Lq, Lk) uint8 contiguous: 1 where the attention kernels keep a probability under `dropout`
// (cuda/dropout_mask.cu; for tests, and for the reference backward when it replays a CUDA forward).
struct DropoutMaskParams {
    uint8_t* keep;
    int batch, heads_q, seqlen_q, seqlen_k;
    DropoutParams dropout;
};

namespace dropout_mask {
constexpr int kThreads = 128;  // one element per thread
const char* launch(const DropoutMaskParams& p, void* stream);
}  // namespace dropout_mask

namespace attn_fwd {
constexpr int kBlockM = 64;  // query rows per block: 4 warps x 16
constexpr int block_n(int head_dim) { return head_dim <= 128 ? 64 : 32; }
constexpr int kHeadDims[] = {32, 64, 96, 128, 256};
const char* launch(const AttnFwdParams& p, void* stream);
}  // namespace attn_fwd

}  // namespace fastattn

// The dropout keep-mask materialised: kernel dropout_mask_kernel, launcher dropout_mask::launch, op
// fastattn::cuda_dropout_keep_mask (csrc/attn_ops.cpp). Element (bh, i, j) of the contiguous (B, Hq, Lq, Lk)
// output is the decision the attention kernels make for that score, through the same dropout::keep
// (dropout.cuh). For tests (against Triton's dropout_keep_mask) and for a reference backward that replays a
// CUDA forward's dropout; never on the attention path, which regenerates the mask and stores nothing.
#include "attn_params.h"
#include "dropout.cuh"
#include "primitives.cuh"

namespace fastattn {
namespace dropout_mask {

__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(const DropoutMaskParams p) {
    const int64_t idx = int64_t(blockIdx.x) * kThreads + int64_t(threadIdx.x);
    const int64_t per_head = int64_t(p.seqlen_q) * p.seqlen_k;
    if (idx >= per_head * p.batch * p.heads_q) return;
    const dropout::Rng rng = dropout::make_rng(p.dropout, p.seqlen_q, p.seqlen_k);
    const int64_t bh = idx / per_head;
    const int i = int((idx % per_head) / p.seqlen_k), j = int(idx % p.seqlen_k);
    p.keep[idx] = dropout::keep(rng, bh, i, j) ? 1 : 0;
}

const char* launch(const DropoutMaskParams& p, void* stream) {
    const int64_t total = int64_t(p.batch) * p.heads_q * p.seqlen_q * p.seqlen_k;
    if (total <= 0) return nullptr;
    const int64_t blocks = (total + kThreads - 1) / kThreads;
    if (blocks > 0x7fffffff) return "dropout_mask: more than 2^31 - 1 blocks of 128 elements";
    FA_LAUNCH_KERNEL(dropout_mask_kernel, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, p);
    return fa_launch_status();
}

}  // namespace dropout_mask
}  // namespace fastattn

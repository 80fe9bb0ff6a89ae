// Torch op of the CUDA backward attention kernels (csrc/cuda/attn_bwd.cu): fastattn::cuda_attn_bwd.
//
// Checks every argument (naming it, what was expected and what was received), fills the plain params
// struct and launches the preprocess, dK/dV and dQ kernels. With need_mask_grad (a float mask) it also
// returns dmask = dS, (B, Hq, Lq, Lk) in the mask's dtype, written by the dQ pass; otherwise an empty
// tensor. Built like attn_ops.cpp: for CUDA tensors with nvcc, or, with FASTATTN_EMULATE, for CPU tensors
// run by the emulator (outputs, dmask included, poisoned with NaN first, so an element the kernels miss
// reads NaN). With dropout_p > 0 the kernels regenerate the forward's keep-mask from its philox tensor
// (cuda/dropout.cuh). The fake implementation is registered from Python
// (fastattn/backends/cuda_bwd.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#ifndef FASTATTN_EMULATE
#include <c10/cuda/CUDAGuard.h>
#endif

#include "attn_host.h"
#include "checks.h"
#include "cuda/attn_bwd_params.h"

namespace fastattn {
namespace {

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// One TileSummary (state, count, index) for a block (bq, bk) over (n_rows, n_cols) tiles; returns Bm, Hm.
std::pair<int64_t, int64_t> check_summary(const char* op, const char* which, const at::Tensor& q,
                                          const std::optional<at::Tensor>& state_opt,
                                          const std::optional<at::Tensor>& count_opt,
                                          const std::optional<at::Tensor>& index_opt, int64_t batch, int64_t heads,
                                          int64_t n_rows, int64_t n_cols) {
    TORCH_CHECK(given(state_opt) && given(count_opt) && given(index_opt), op, ": ", which,
                " (state, count, index) come together and are required with a mask, got some of them None");
    const at::Tensor &state = *state_opt, &count = *count_opt, &index = *index_opt;
    for (const at::Tensor* t : {&state, &count, &index}) {
        TORCH_CHECK(t->device() == q.device(), op, ": ", which, " must be on ", q.device(), " like 'q', got ",
                    t->device());
        TORCH_CHECK(t->is_contiguous(), op, ": ", which, " tensors must be contiguous, got strides ", t->strides());
    }
    TORCH_CHECK(state.scalar_type() == at::kChar && count.scalar_type() == at::kInt &&
                    index.scalar_type() == at::kInt,
                op, ": ", which, " must be (int8 state, int32 count, int32 index), got ",
                dtype_name(state.scalar_type()), ", ", dtype_name(count.scalar_type()), ", ",
                dtype_name(index.scalar_type()));
    TORCH_CHECK(state.dim() == 4 && (state.size(0) == 1 || state.size(0) == batch) &&
                    (state.size(1) == 1 || state.size(1) == heads) && state.size(2) == n_rows &&
                    state.size(3) == n_cols,
                op, ": ", which, " state must have shape (1 or ", batch, ", 1 or ", heads, ", ", n_rows, ", ",
                n_cols, "), got ", state.sizes());
    TORCH_CHECK(count.sizes() == state.sizes().slice(0, 3) && index.sizes() == state.sizes(), op, ": ", which,
                " count and index must have shapes ", state.sizes().slice(0, 3), " and ", state.sizes(), ", got ",
                count.sizes(), " and ", index.sizes());
    return {state.size(0), state.size(1)};
}

// The registry's backward op (fastattn/backends/registry.py: OP_BWD_ARGS): summary = [] or the six tensors of
// the dQ pass's TileSummary for (kBlockMdq, kBlockN) and the dK/dV pass's transposed one for (kBlockMkv,
// kBlockN), blocks = [kBlockMdq, kBlockN, kBlockMkv].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_attn_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask_opt, const std::optional<at::Tensor>& alibi_opt,
    at::TensorList summary, const std::optional<at::Tensor>& philox_opt, double scale, double dropout_p,
    at::ArrayRef<double> variant_scalars, at::IntArrayRef blocks, bool need_mask_grad,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k) {
    constexpr const char* op = "fastattn::cuda_attn_bwd";
    TORCH_CHECK(summary.empty() || summary.size() == 6, op,
                ": argument 'summary' must be [] or [kv_state, kv_count, kv_index, q_state, q_count, q_index], got ",
                summary.size(), " tensors");
    TORCH_CHECK(blocks.size() == 3 && blocks[0] == attn_bwd::kBlockMdq && blocks[1] == attn_bwd::kBlockN &&
                    blocks[2] == attn_bwd::kBlockMkv,
                op, ": argument 'blocks' must be [", attn_bwd::kBlockMdq, ", ", attn_bwd::kBlockN, ", ",
                attn_bwd::kBlockMkv, "] (the kernels' tiles), got ", blocks);
    const std::optional<at::Tensor> kv_state_opt = summary_part(summary, 0), kv_count_opt = summary_part(summary, 1),
                                    kv_index_opt = summary_part(summary, 2), q_state_opt = summary_part(summary, 3),
                                    q_count_opt = summary_part(summary, 4), q_index_opt = summary_part(summary, 5);
    CHECK_DEVICE(op, q);
    for (const at::Tensor* t : {&grad_out, &k, &v, &out, &lse})
        TORCH_CHECK(t->device() == q.device(), op, ": every tensor must be on ", q.device(), " like 'q', got ",
                    t->device());
    CHECK_DTYPE(op, q, at::kHalf, at::kBFloat16);
    CHECK_SAME_DTYPE(op, k, q);
    CHECK_SAME_DTYPE(op, v, q);
    CHECK_SAME_DTYPE(op, out, q);
    CHECK_SAME_DTYPE(op, grad_out, q);
    CHECK_DTYPE(op, lse, at::kFloat);
    CHECK_DIM(op, q, 4);
    CHECK_DIM(op, k, 4);
    CHECK_DIM(op, v, 4);
    CHECK_DIM(op, lse, 3);
    const int64_t batch = q.size(0), heads_q = q.size(1), seqlen_q = q.size(2), head_dim = q.size(3);
    const int64_t heads_kv = k.size(1), seqlen_k = k.size(2);
    CHECK_IN_SET(op, "head_dim (q.size(3))", head_dim, 32, 64, 96, 128, 256);
    TORCH_CHECK(k.size(0) == batch && k.size(3) == head_dim, op, ": argument 'k' must have batch ", batch,
                " and head_dim ", head_dim, " like 'q', got ", k.sizes());
    TORCH_CHECK(v.sizes() == k.sizes(), op, ": argument 'v' must have shape ", k.sizes(),
                " like 'k' (this kernel needs head_dim_v == head_dim), got ", v.sizes());
    TORCH_CHECK(out.sizes() == q.sizes() && grad_out.sizes() == q.sizes(), op,
                ": arguments 'out' and 'grad_out' must have q's shape ", q.sizes(), ", got ", out.sizes(), " and ",
                grad_out.sizes());
    TORCH_CHECK(lse.sizes() == q.sizes().slice(0, 3), op, ": argument 'lse' must have shape ",
                q.sizes().slice(0, 3), ", got ", lse.sizes());
    TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, op, ": k's head count must divide q's ", heads_q, ", got ",
                heads_kv);
    TORCH_CHECK(heads_q <= 65535 && batch <= 65535, op, ": batch and heads must be at most 65535 (grid limits), got ",
                batch, " and ", heads_q);
    TORCH_CHECK(seqlen_q < (int64_t(1) << 31) && seqlen_k < (int64_t(1) << 31), op,
                ": sequence lengths must be below 2^31, got ", seqlen_q, " and ", seqlen_k);
    TORCH_CHECK(std::isfinite(scale), op, ": argument 'scale' must be finite, got ", scale);
    const OpLayout layout =
        op_layout(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, given(mask_opt));
    TORCH_CHECK(!layout.packed || summary.empty(), op,
                ": argument 'summary': packed sequences take none, got ", summary.size(), " tensors");
    TORCH_CHECK(layout.batch <= 65535, op, ": at most 65535 packed sequences (grid limit), got ",
                layout.batch);
    // ALiBi slopes have one row per sequence when packed.
    const rules::Variant variant =
        variant_params(op, q, alibi_opt, std::nullopt, variant_scalars, layout.packed ? layout.batch : q.size(0));
    TORCH_CHECK(!need_mask_grad || (given(mask_opt) && mask_opt->is_floating_point()), op,
                ": need_mask_grad=True needs a floating-point argument 'mask' to differentiate, got ",
                given(mask_opt) ? dtype_name(mask_opt->scalar_type()) : "None");
    const DropoutParams dropout = dropout_params(op, philox_opt, dropout_p, q);

#ifndef FASTATTN_EMULATE
    const c10::cuda::OptionalCUDAGuard guard(q.device());
#endif
    const auto alloc = [&](const at::Tensor& like) {
        return poison_outputs() ? at::full(like.sizes(), std::numeric_limits<float>::quiet_NaN(), like.options())
                        : at::empty(like.sizes(), like.options());
    };
    // Packed: gradients token-major (total, H, D) seen as (1, H, total, D), as registry.packed_empty.
    const auto grad = [&](const at::Tensor& like) {
        return layout.packed ? packed_output(like, like.size(1), like.size(2), like.size(3)) : alloc(like);
    };
    at::Tensor dq = grad(q), dk = grad(k), dv = grad(v);
    // dmask: the scores' gradient dS, (B, Hq, Lq, Lk) in the mask's dtype, or empty when not asked for.
    at::Tensor dmask = at::empty({0}, q.options());
    if (need_mask_grad) {
        const std::vector<int64_t> shape{batch, heads_q, seqlen_q, seqlen_k};
        dmask = poison_outputs() ? at::full(shape, std::numeric_limits<float>::quiet_NaN(), mask_opt->options())
                         : at::empty(shape, mask_opt->options());
    }
    if (seqlen_k == 0 || batch == 0 || heads_q == 0 || (layout.packed && layout.max_seqlen_k == 0)) {
        // nothing attended: zero gradients
        dq.zero_();
        dk.zero_();
        dv.zero_();
        dmask.zero_();
        return {dq, dk, dv, dmask};
    }

    const at::Tensor qr = kernel_ready(q), kr = kernel_ready(k), vr = kernel_ready(v);
    const at::Tensor outr = kernel_ready(out), dor = kernel_ready(grad_out);
    const at::Tensor lser = lse.contiguous();
    at::Tensor delta = at::empty({batch, heads_q, seqlen_q}, q.options().dtype(at::kFloat));
    AttnBwdParams p{};
    p.q = qr.data_ptr();
    p.k = kr.data_ptr();
    p.v = vr.data_ptr();
    p.out = outr.data_ptr();
    p.dout = dor.data_ptr();
    p.lse = lser.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = dq.data_ptr();
    p.dk = dk.data_ptr();
    p.dv = dv.data_ptr();
    kernel_strides(qr, p.q_stride);
    kernel_strides(kr, p.k_stride);
    kernel_strides(vr, p.v_stride);
    kernel_strides(outr, p.out_stride);
    kernel_strides(dor, p.dout_stride);
    kernel_strides(dq, p.dq_stride);
    kernel_strides(dk, p.dk_stride);
    kernel_strides(dv, p.dv_stride);
    p.lse_stride[0] = batch == 1 ? 0 : heads_q * seqlen_q;  // lse and delta: contiguous (B, Hq, Lq)
    p.lse_stride[1] = seqlen_q;
    // Packed: the grids and the dropout contract take the sequences and their longest lengths.
    p.batch = int(layout.packed ? layout.batch : batch);
    p.heads_q = int(heads_q);
    p.heads_kv = int(heads_kv);
    p.seqlen_q = int(layout.packed ? layout.max_seqlen_q : seqlen_q);
    p.seqlen_k = int(layout.packed ? layout.max_seqlen_k : seqlen_k);
    p.layout = layout.seq_layout();
    p.head_dim = int(head_dim);
    p.scale = float(scale);
    p.variant = variant;
    p.dtype = q.scalar_type() == at::kHalf ? DType::f16 : DType::bf16;
    p.mask_elem = MaskElem::none;
    p.dmask = need_mask_grad ? dmask.data_ptr() : nullptr;
    p.dropout = dropout;

    if (given(mask_opt)) {
        const at::Tensor& mask = *mask_opt;
        CHECK_SAME_DEVICE(op, mask, q);
        CHECK_DTYPE(op, mask, at::kBool, at::kFloat, at::kHalf, at::kBFloat16, at::kDouble);
        CHECK_DIM(op, mask, 4);
        TORCH_CHECK(mask.size(0) == batch && mask.size(1) == heads_q && mask.size(2) == seqlen_q &&
                        mask.size(3) == seqlen_k,
                    op, ": argument 'mask' must have shape (", batch, ", ", heads_q, ", ", seqlen_q, ", ", seqlen_k,
                    ") (a broadcast view is fine), got ", mask.sizes());
        p.mask = mask.data_ptr();
        p.mask_elem = mask_elem(mask.scalar_type());
        for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask.size(d) == 1 ? 0 : mask.stride(d);
    }
    if (given(mask_opt) || given(kv_state_opt) || given(q_state_opt)) {
        const int64_t nq_dq = (seqlen_q + attn_bwd::kBlockMdq - 1) / attn_bwd::kBlockMdq;
        const int64_t nq_kv = (seqlen_q + attn_bwd::kBlockMkv - 1) / attn_bwd::kBlockMkv;
        const int64_t nk = (seqlen_k + attn_bwd::kBlockN - 1) / attn_bwd::kBlockN;
        const auto dims_kv = check_summary(op, "kv_state/kv_count/kv_index (the TileSummary for block (64, 64))", q,
                                           kv_state_opt, kv_count_opt, kv_index_opt, batch, heads_q, nq_dq, nk);
        const auto dims_q = check_summary(op,
                                          "q_state/q_count/q_index (the transposed TileSummary for block (32, 64))",
                                          q, q_state_opt, q_count_opt, q_index_opt, batch, heads_q, nk, nq_kv);
        TORCH_CHECK(dims_kv == dims_q, op, ": the two tile summaries must broadcast alike, got (", dims_kv.first,
                    ", ", dims_kv.second, ") and (", dims_q.first, ", ", dims_q.second, ")");
        p.kv_state = kv_state_opt->data_ptr<int8_t>();
        p.kv_count = kv_count_opt->data_ptr<int32_t>();
        p.kv_index = kv_index_opt->data_ptr<int32_t>();
        p.q_state = q_state_opt->data_ptr<int8_t>();
        p.q_count = q_count_opt->data_ptr<int32_t>();
        p.q_index = q_index_opt->data_ptr<int32_t>();
        p.summary_batch = int(dims_kv.first);
        p.summary_heads = int(dims_kv.second);
    }

    const char* err = attn_bwd::launch(p, launch_stream());
    TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
    return {dq, dk, dv, dmask};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
    // The registry's op arguments (fastattn/backends/registry.py: OP_BWD_ARGS), as every backend's.
    m.def(
        "cuda_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
        "Tensor? alibi_slopes, Tensor[] summary, Tensor? philox, float scale, float dropout_p, float[] variant, "
        "int[] blocks, bool need_mask_grad, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "int max_seqlen_q=0, int max_seqlen_k=0) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
}

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("cuda_attn_bwd", &fastattn::cuda_attn_bwd); }
TORCH_LIBRARY_IMPL(fastattn, CPU, m) { m.impl("cuda_attn_bwd", &fastattn::cuda_attn_bwd); }

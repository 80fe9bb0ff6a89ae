// Torch ops of the CUDA forward attention kernel (csrc/cuda/attn_fwd.cu): fastattn::cuda_attn_fwd, and of the
// dropout keep-mask it applies (csrc/cuda/dropout_mask.cu): fastattn::cuda_dropout_keep_mask.
//
// Checks every argument (naming it, what was expected and what was received), fills the plain
// params struct and launches. Built like bindings.cpp: for CUDA tensors with nvcc, or, with
// FASTATTN_EMULATE, for CPU tensors run by the emulator; the impl is registered for both dispatch
// keys so a tensor on the wrong device gets the message with the way out. The fake (meta)
// implementation is registered from Python (fastattn/backends/cuda.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#ifndef FASTATTN_EMULATE
#include <c10/cuda/CUDAGuard.h>
#endif

#include "attn_host.h"
#include "checks.h"
#include "cuda/attn_params.h"

namespace fastattn {
namespace {

// The registry's forward op (fastattn/backends/registry.py: OP_FWD_ARGS): summary = [] or the mask's
// [tile_state, kv_count, kv_index] for blocks = [kBlockM, block_n(head_dim)].
std::tuple<at::Tensor, at::Tensor> cuda_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask_opt,
                                                 const std::optional<at::Tensor>& alibi_opt,
                                                 const std::optional<at::Tensor>& sinks_opt, at::TensorList summary,
                                                 const std::optional<at::Tensor>& philox_opt, double scale,
                                                 double dropout_p, at::ArrayRef<double> variant_scalars,
                                                 at::IntArrayRef blocks,
                                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                                 const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                                 int64_t max_seqlen_k) {
    constexpr const char* op = "fastattn::cuda_attn_fwd";
    TORCH_CHECK(summary.empty() || summary.size() == 3, op,
                ": argument 'summary' must be [] or [tile_state, kv_count, kv_index], got ", summary.size(),
                " tensors");
    const std::optional<at::Tensor> tile_state_opt = summary_part(summary, 0), kv_count_opt = summary_part(summary, 1),
                                    kv_index_opt = summary_part(summary, 2);
    CHECK_DEVICE(op, q);
    CHECK_SAME_DEVICE(op, k, q);
    CHECK_SAME_DEVICE(op, v, q);
    CHECK_DTYPE(op, q, at::kHalf, at::kBFloat16);
    CHECK_SAME_DTYPE(op, k, q);
    CHECK_SAME_DTYPE(op, v, q);
    CHECK_DIM(op, q, 4);
    CHECK_DIM(op, k, 4);
    CHECK_DIM(op, v, 4);
    const int64_t batch = q.size(0), heads_q = q.size(1), seqlen_q = q.size(2), head_dim = q.size(3);
    const int64_t heads_kv = k.size(1), seqlen_k = k.size(2);
    CHECK_IN_SET(op, "head_dim (q.size(3))", head_dim, 32, 64, 96, 128, 256);
    TORCH_CHECK(k.size(0) == batch && v.size(0) == batch, op, ": arguments 'k' and 'v' must have batch ", batch,
                " like 'q', got ", k.size(0), " and ", v.size(0));
    TORCH_CHECK(k.size(3) == head_dim && v.size(3) == head_dim, op, ": arguments 'k' and 'v' must have head_dim ",
                head_dim, " like 'q' (this kernel needs head_dim_v == head_dim), got k ", k.sizes(), " and v ",
                v.sizes());
    TORCH_CHECK(v.size(1) == heads_kv && v.size(2) == seqlen_k, op, ": argument 'v' must have shape ",
                k.sizes(), " like 'k', got ", v.sizes());
    TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, op, ": k's head count must divide q's ", heads_q,
                ", got ", heads_kv);
    TORCH_CHECK(heads_q <= 65535 && batch <= 65535, op, ": batch and heads must be at most 65535 (grid limits), got ",
                batch, " and ", heads_q);
    TORCH_CHECK(seqlen_q < (int64_t(1) << 31) && seqlen_k < (int64_t(1) << 31), op,
                ": sequence lengths must be below 2^31, got ", seqlen_q, " and ", seqlen_k);
    TORCH_CHECK(std::isfinite(scale), op, ": argument 'scale' must be finite, got ", scale);
    TORCH_CHECK(blocks.size() == 2 && blocks[0] == attn_fwd::kBlockM && blocks[1] == attn_fwd::block_n(int(head_dim)),
                op, ": argument 'blocks' must be [", attn_fwd::kBlockM, ", ", attn_fwd::block_n(int(head_dim)),
                "] (the kernel's tile at head_dim ", head_dim, "), got ", blocks);
    const OpLayout layout = op_layout(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      mask_opt.has_value() && mask_opt->defined());
    TORCH_CHECK(!layout.packed || summary.empty(), op,
                ": argument 'summary': packed sequences take none, got ", summary.size(), " tensors");
    TORCH_CHECK(layout.batch <= 65535, op, ": at most 65535 packed sequences (grid limit), got ",
                layout.batch);
    const DropoutParams dropout = dropout_params(op, philox_opt, dropout_p, q);
    // ALiBi slopes have one row per sequence when packed.
    const rules::Variant variant =
        variant_params(op, q, alibi_opt, sinks_opt, variant_scalars, layout.packed ? layout.batch : q.size(0));

    const bool has_mask = mask_opt.has_value() && mask_opt->defined();
    const bool has_summary = tile_state_opt.has_value() && tile_state_opt->defined();
    TORCH_CHECK(!has_mask || has_summary, op,
                ": a mask needs its tile summary (tile_state, kv_count, kv_index from MaskSpec.tile_summary(",
                attn_fwd::kBlockM, ", ", attn_fwd::block_n(int(head_dim)), ")), got tile_state=None");
    const int64_t n_q_tiles = (seqlen_q + attn_fwd::kBlockM - 1) / attn_fwd::kBlockM;
    const int64_t n_k_tiles = (seqlen_k + attn_fwd::block_n(int(head_dim)) - 1) / attn_fwd::block_n(int(head_dim));

#ifndef FASTATTN_EMULATE
    const c10::cuda::OptionalCUDAGuard guard(q.device());
#endif
    // Poisoned outputs (emulation, FASTATTN_POISON=1): an element the kernel fails to write reads NaN.
    const auto alloc = [&](at::IntArrayRef shape, at::TensorOptions opts) {
        return poison_outputs() ? at::full(shape, std::numeric_limits<float>::quiet_NaN(), opts) : at::empty(shape, opts);
    };
    // Packed: out token-major (total_q, Hq, D) seen as (1, Hq, total_q, D), lse (1, Hq, total_q).
    at::Tensor out = layout.packed ? packed_output(q, heads_q, seqlen_q, head_dim)
                                   : alloc({batch, heads_q, seqlen_q, head_dim}, q.options());
    at::Tensor lse = alloc({batch, heads_q, seqlen_q}, q.options().dtype(at::kFloat));
    if (seqlen_k == 0 || (layout.packed && layout.max_seqlen_k == 0)) {
        // nothing to attend: zeros, lse -inf (or the sink's logit)
        out.zero_();
        if (variant.sinks != nullptr)
            lse.copy_(sinks_opt->view({1, heads_q, 1}).expand({batch, heads_q, seqlen_q}));
        else
            lse.fill_(-std::numeric_limits<float>::infinity());
        return {out, lse};
    }

    const at::Tensor qr = kernel_ready(q), kr = kernel_ready(k), vr = kernel_ready(v);
    AttnFwdParams p{};
    p.q = qr.data_ptr();
    p.k = kr.data_ptr();
    p.v = vr.data_ptr();
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    kernel_strides(qr, p.q_stride);
    kernel_strides(kr, p.k_stride);
    kernel_strides(vr, p.v_stride);
    kernel_strides(out, p.out_stride);
    p.lse_stride[0] = batch == 1 ? 0 : heads_q * seqlen_q;
    p.lse_stride[1] = seqlen_q;
    // Packed: the grid and the dropout contract take the sequences and their longest lengths.
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
    p.dropout = dropout;

    if (has_mask) {
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
    if (has_summary) {
        TORCH_CHECK(kv_count_opt.has_value() && kv_count_opt->defined() && kv_index_opt.has_value() &&
                        kv_index_opt->defined(),
                    op, ": tile_state, kv_count and kv_index come together (a TileSummary), got some of them None");
        const at::Tensor &tile_state = *tile_state_opt, &kv_count = *kv_count_opt, &kv_index = *kv_index_opt;
        CHECK_SAME_DEVICE(op, tile_state, q);
        CHECK_SAME_DEVICE(op, kv_count, q);
        CHECK_SAME_DEVICE(op, kv_index, q);
        CHECK_DTYPE(op, tile_state, at::kChar);
        CHECK_DTYPE(op, kv_count, at::kInt);
        CHECK_DTYPE(op, kv_index, at::kInt);
        CHECK_DIM(op, tile_state, 4);
        CHECK_CONTIGUOUS(op, tile_state);
        CHECK_CONTIGUOUS(op, kv_count);
        CHECK_CONTIGUOUS(op, kv_index);
        const int64_t bm = tile_state.size(0), hm = tile_state.size(1);
        TORCH_CHECK((bm == 1 || bm == batch) && (hm == 1 || hm == heads_q) && tile_state.size(2) == n_q_tiles &&
                        tile_state.size(3) == n_k_tiles,
                    op, ": argument 'tile_state' must be the TileSummary for block (", attn_fwd::kBlockM, ", ",
                    attn_fwd::block_n(int(head_dim)), "), shape (1 or ", batch, ", 1 or ", heads_q, ", ", n_q_tiles,
                    ", ", n_k_tiles, "), got ", tile_state.sizes());
        TORCH_CHECK(kv_count.sizes() == tile_state.sizes().slice(0, 3) && kv_index.sizes() == tile_state.sizes(), op,
                    ": arguments 'kv_count' and 'kv_index' must have shapes ", tile_state.sizes().slice(0, 3), " and ",
                    tile_state.sizes(), " (tile_state's), got ", kv_count.sizes(), " and ", kv_index.sizes());
        p.tile_state = tile_state.data_ptr<int8_t>();
        p.kv_count = kv_count.data_ptr<int32_t>();
        p.kv_index = kv_index.data_ptr<int32_t>();
        p.summary_batch = int(bm);
        p.summary_heads = int(hm);
    }

    const char* err = attn_fwd::launch(p, launch_stream());
    TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
    return {out, lse};
}

// (B, Hq, Lq, Lk) uint8, 1 where the kernels keep score (b, h, i, j) under dropout rate dropout_p.
at::Tensor cuda_dropout_keep_mask(const at::Tensor& philox, int64_t batch, int64_t heads_q, int64_t seqlen_q,
                                  int64_t seqlen_k, double dropout_p) {
    constexpr const char* op = "fastattn::cuda_dropout_keep_mask";
    CHECK_DEVICE(op, philox);
    TORCH_CHECK(batch >= 0 && heads_q >= 0 && seqlen_q >= 0 && seqlen_k >= 0, op,
                ": batch, heads_q, seqlen_q and seqlen_k must be >= 0, got ", batch, ", ", heads_q, ", ", seqlen_q,
                ", ", seqlen_k);
    TORCH_CHECK(batch <= std::numeric_limits<int>::max() && heads_q <= std::numeric_limits<int>::max() &&
                    seqlen_q < (int64_t(1) << 31) && seqlen_k < (int64_t(1) << 31),
                op, ": sizes must be below 2^31, got ", batch, ", ", heads_q, ", ", seqlen_q, ", ", seqlen_k);
    TORCH_CHECK(dropout_p > 0.0, op, ": argument 'dropout_p' must be in (0, 1), got ", dropout_p);
    const DropoutParams dropout = dropout_params(op, philox, dropout_p, philox);
#ifndef FASTATTN_EMULATE
    const c10::cuda::OptionalCUDAGuard guard(philox.device());
#endif
    // Under emulation poisoned with 0xFF (neither 0 nor 1), so an element the kernel misses shows.
    const auto opts = philox.options().dtype(at::kByte);
    at::Tensor keep = kEmulate ? at::full({batch, heads_q, seqlen_q, seqlen_k}, 0xFF, opts)
                               : at::empty({batch, heads_q, seqlen_q, seqlen_k}, opts);
    DropoutMaskParams p{keep.data_ptr<uint8_t>(), int(batch), int(heads_q), int(seqlen_q), int(seqlen_k), dropout};
    const char* err = dropout_mask::launch(p, launch_stream());
    TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
    return keep;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
    // The registry's op arguments (fastattn/backends/registry.py: OP_FWD_ARGS), as every backend's.
    m.def(
        "cuda_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? alibi_slopes, Tensor? sinks, "
        "Tensor[] summary, Tensor? philox, float scale, float dropout_p, float[] variant, int[] blocks, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0) -> "
        "(Tensor out, Tensor lse)");
    m.def(
        "cuda_dropout_keep_mask(Tensor philox, int batch, int heads_q, int seqlen_q, int seqlen_k, float dropout_p) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
    m.impl("cuda_attn_fwd", &fastattn::cuda_attn_fwd);
    m.impl("cuda_dropout_keep_mask", &fastattn::cuda_dropout_keep_mask);
}
TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
    m.impl("cuda_attn_fwd", &fastattn::cuda_attn_fwd);
    m.impl("cuda_dropout_keep_mask", &fastattn::cuda_dropout_keep_mask);
}

// Torch op of the CUDA decode kernel (csrc/cuda/decode.cu): fastattn::cuda_kvcache_fwd, fastattn.kvcache_attention's
// kernel on the CUDA backend, with the schema of the CPU one (fastattn::cpu_kvcache_fwd).
//
// Checks every argument (naming it, what was expected and what was received), launches the split kernel into fp32
// partials and merges them exactly through their lse, with the sinks' logits added to the denominator once
// (decode::merge, one launch: the formula of fastattn.kvcache.merge_splits). The append into the caches and the
// choice of splits happen in Python (fastattn/backends/cuda.py), in the op that wraps this one. Built like
// attn_ops.cpp: for CUDA tensors with nvcc, or, with FASTATTN_EMULATE, for CPU tensors run by the emulator.
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
#include "cuda/decode_params.h"

namespace fastattn {
namespace {

std::tuple<at::Tensor, at::Tensor> cuda_kvcache_fwd(const at::Tensor& query, const at::Tensor& key_cache,
                                                    const at::Tensor& value_cache, const at::Tensor& cache_seqlens,
                                                    int64_t new_len, const std::optional<at::Tensor>& block_table,
                                                    const std::optional<at::Tensor>& alibi_slopes,
                                                    const std::optional<at::Tensor>& sinks, double scale,
                                                    at::ArrayRef<double> variant_scalars, int64_t num_splits) {
    constexpr const char* op = "fastattn::cuda_kvcache_fwd";
    CHECK_DEVICE(op, query);
    CHECK_SAME_DEVICE(op, key_cache, query);
    CHECK_SAME_DEVICE(op, value_cache, query);
    CHECK_SAME_DEVICE(op, cache_seqlens, query);
    CHECK_DTYPE(op, query, at::kHalf, at::kBFloat16);
    CHECK_SAME_DTYPE(op, key_cache, query);
    CHECK_SAME_DTYPE(op, value_cache, query);
    CHECK_DIM(op, query, 4);
    CHECK_DIM(op, key_cache, 4);
    CHECK_DIM(op, value_cache, 4);
    CHECK_DTYPE(op, cache_seqlens, at::kInt);
    CHECK_DIM(op, cache_seqlens, 1);
    CHECK_CONTIGUOUS(op, cache_seqlens);
    const int64_t batch = query.size(0), heads_q = query.size(1), seqlen_q = query.size(2), head_dim = query.size(3);
    const int64_t heads_kv = key_cache.size(1), page_size = key_cache.size(2), head_dim_v = value_cache.size(3);
    TORCH_CHECK(cache_seqlens.size(0) == batch, op, ": argument 'cache_seqlens' must have shape (", batch,
                ",) (query's batch), got ", cache_seqlens.sizes());
    TORCH_CHECK(key_cache.size(3) == head_dim, op, ": argument 'key_cache' must have head_dim ", head_dim,
                " like 'query', got ", key_cache.sizes());
    TORCH_CHECK(value_cache.size(0) == key_cache.size(0) && value_cache.size(1) == heads_kv &&
                    value_cache.size(2) == page_size,
                op, ": argument 'value_cache' must match 'key_cache' ", key_cache.sizes(), " but its head dim, got ",
                value_cache.sizes());
    TORCH_CHECK(head_dim >= 1 && head_dim <= decode::kMaxHeadDim && head_dim_v >= 1 &&
                    head_dim_v <= decode::kMaxHeadDim,
                op, ": head_dim and head_dim_v must be in [1, ", decode::kMaxHeadDim, "], got ", head_dim, " and ",
                head_dim_v);
    TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, op, ": key_cache's head count must divide query's ",
                heads_q, ", got ", heads_kv);
    TORCH_CHECK(num_splits >= 1 && num_splits <= 65535, op, ": argument 'num_splits' must be in [1, 65535], got ",
                num_splits);
    TORCH_CHECK(new_len >= 0 && new_len < (int64_t(1) << 31), op, ": argument 'new_len' must be in [0, 2^31), got ",
                new_len);
    const int64_t row_tiles = (heads_q / heads_kv * seqlen_q + decode::kRows - 1) / decode::kRows;
    TORCH_CHECK(batch * heads_kv < (int64_t(1) << 31) && row_tiles <= 65535 && page_size < (int64_t(1) << 31), op,
                ": batch * heads_kv must be below 2^31 and the GQA group's query rows (heads_q / heads_kv * seqlen_q) "
                "at most ",
                65535 * decode::kRows, " (grid limits), got ", batch * heads_kv, " and ",
                heads_q / heads_kv * seqlen_q);
    TORCH_CHECK(std::isfinite(scale), op, ": argument 'scale' must be finite, got ", scale);
    const std::optional<at::Tensor> alibi =
        alibi_slopes.has_value() ? std::optional<at::Tensor>(alibi_slopes->to(at::kFloat).contiguous()) : std::nullopt;
    const std::optional<at::Tensor> sink =
        sinks.has_value() ? std::optional<at::Tensor>(sinks->to(at::kFloat).contiguous()) : std::nullopt;
    const rules::Variant variant = variant_params(op, query, alibi, sink, variant_scalars);
    TORCH_CHECK(variant.q_offset == 0 && variant.chunk == 0, op,
                ": argument 'variant' must have q_offset 0 (each sequence is aligned bottom-right) and chunk 0, got ",
                variant.q_offset, " and ", variant.chunk);

    DecodeParams p{};
    at::Tensor table;
    if (block_table.has_value()) {
        table = block_table->contiguous();
        TORCH_CHECK(table.device() == query.device() && table.scalar_type() == at::kInt && table.dim() == 2 &&
                        table.size(0) == batch,
                    op, ": argument 'block_table' must be an int32 (", batch, ", pages_per_seq) tensor on ",
                    query.device(), ", got ", dtype_name(table.scalar_type()), " ", table.sizes(), " on ",
                    table.device());
        p.block_table = table.data_ptr<int32_t>();
        p.bt_stride = table.size(1);
    } else {
        TORCH_CHECK(key_cache.size(0) == batch, op, ": a contiguous 'key_cache' must have batch ", batch,
                    " like 'query', got ", key_cache.sizes());
    }

#ifndef FASTATTN_EMULATE
    const c10::cuda::OptionalCUDAGuard guard(query.device());
#endif
    // Poisoned partials and outputs (emulation, FASTATTN_POISON=1): an element a kernel fails to write reads NaN.
    const auto f32 = query.options().dtype(at::kFloat);
    const auto alloc = [&](at::IntArrayRef shape, const at::TensorOptions& options) {
        return poison_outputs() ? at::full(shape, std::numeric_limits<float>::quiet_NaN(), options)
                                : at::empty(shape, options);
    };
    at::Tensor part_out = alloc({num_splits, batch, heads_q, seqlen_q, head_dim_v}, f32);
    at::Tensor part_lse = alloc({num_splits, batch, heads_q, seqlen_q}, f32);
    p.q = query.data_ptr();
    p.k = key_cache.data_ptr();
    p.v = value_cache.data_ptr();
    for (int d = 0; d < 4; ++d) {
        p.q_s[d] = query.stride(d);
        p.k_s[d] = key_cache.stride(d);
        p.v_s[d] = value_cache.stride(d);
    }
    p.seqlens = cache_seqlens.data_ptr<int32_t>();
    p.new_len = int(new_len);
    p.batch = int(batch);
    p.heads_q = int(heads_q);
    p.heads_kv = int(heads_kv);
    p.seqlen_q = int(seqlen_q);
    p.head_dim = int(head_dim);
    p.head_dim_v = int(head_dim_v);
    p.page_size = int(page_size);
    p.splits = int(num_splits);
    p.scale = float(scale);
    p.variant = variant;
    p.dtype = query.scalar_type() == at::kHalf ? DType::f16 : DType::bf16;
    p.part_out = part_out.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
    const char* err = decode::launch(p, launch_stream());
    TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);

    at::Tensor out = alloc({batch, heads_q, seqlen_q, head_dim_v}, query.options());
    at::Tensor lse = alloc({batch, heads_q, seqlen_q}, f32);
    MergeParams m{};
    m.part_out = part_out.data_ptr<float>();
    m.part_lse = part_lse.data_ptr<float>();
    m.sinks = sink.has_value() ? sink->data_ptr<float>() : nullptr;
    m.out = out.data_ptr();
    m.lse = lse.data_ptr<float>();
    m.rows = batch * heads_q * seqlen_q;
    m.heads_q = int(heads_q);
    m.seqlen_q = int(seqlen_q);
    m.head_dim_v = int(head_dim_v);
    m.splits = int(num_splits);
    m.dtype = p.dtype;
    err = decode::merge(m, launch_stream());
    TORCH_CHECK(err == nullptr, op, ": merge launch failed: ", err);
    return {out, lse};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
    // The schema of fastattn::cpu_kvcache_fwd (csrc/cpu/decode_cpu.cpp).
    m.def(
        "cuda_kvcache_fwd(Tensor query, Tensor key_cache, Tensor value_cache, Tensor cache_seqlens, int new_len, "
        "Tensor? block_table, Tensor? alibi_slopes, Tensor? sinks, float scale, float[] variant, int num_splits) -> "
        "(Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("cuda_kvcache_fwd", &fastattn::cuda_kvcache_fwd); }
TORCH_LIBRARY_IMPL(fastattn, CPU, m) { m.impl("cuda_kvcache_fwd", &fastattn::cuda_kvcache_fwd); }

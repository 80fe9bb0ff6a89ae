// Host-side tensor preparation shared by the attention ops (attn_ops.cpp, attn_bwd_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "checks.h"
#include "cuda/attn_params.h"

namespace fastattn {

// The kernels read 16-byte rows (cp.async): unit last stride, other strides multiples of 8 elements,
// a 16-byte aligned start. Such a tensor is used in place (any other strides, e.g. a (B, L, H, D)
// storage seen as (B, H, L, D)); anything else is copied to a fresh contiguous tensor first (a clone:
// an already contiguous view at an unaligned offset would come back unchanged from .contiguous()).
inline at::Tensor kernel_ready(const at::Tensor& t) {
    bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
    for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) == 1 || t.stride(d) % 8 == 0);
    return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// How the kernels read a mask tensor's elements.
inline MaskElem mask_elem(at::ScalarType d) {
    switch (d) {
        case at::kBool: return MaskElem::boolean;
        case at::kFloat: return MaskElem::f32;
        case at::kHalf: return MaskElem::f16;
        case at::kBFloat16: return MaskElem::bf16;
        default: return MaskElem::f64;
    }
}

// The dropout arguments of an attention op (the contract of fastattn/backends/triton/dropout.py): with
// dropout_p > 0, philox is the int64 [seed, offset] tensor on q's device that the kernels read; with
// dropout_p == 0 it is not read (null in the params, no dropout).
inline DropoutParams dropout_params(const char* op, const std::optional<at::Tensor>& philox_opt, double dropout_p,
                                    const at::Tensor& q) {
    TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": argument 'dropout_p' must be in [0, 1), got ",
                dropout_p);
    DropoutParams d{nullptr, 0.f, 1.f};
    if (dropout_p == 0.0) return d;
    TORCH_CHECK(philox_opt.has_value() && philox_opt->defined(), op,
                ": dropout_p > 0 needs argument 'philox' (the int64 [seed, offset] tensor of philox_seed_offset), "
                "got None");
    const at::Tensor& philox = *philox_opt;
    CHECK_SAME_DEVICE(op, philox, q);
    CHECK_DTYPE(op, philox, at::kLong);
    TORCH_CHECK(philox.dim() == 1 && philox.size(0) == 2, op,
                ": argument 'philox' must have shape (2,) ([seed, offset]), got ", philox.sizes());
    CHECK_CONTIGUOUS(op, philox);
    d.philox = philox.data_ptr<int64_t>();
    d.p = float(dropout_p);
    d.scale = float(1.0 / (1.0 - dropout_p));
    return d;
}

// The variant of an attention op (csrc/attn_rules.h) from its arguments, checked: the scalars of `variant`
// (rules::unpack_variant: the band with causal folded in, q_offset, chunk, softcap), ALiBi slopes ((1|B, Hq)
// float32, contiguous, on q's device) and sinks ((Hq,) float32, contiguous, on q's device). The tensors must
// outlive the launch. `batch`: the ALiBi table's rows, q.size(0) when negative (packed sequences pass their
// count).
inline rules::Variant variant_params(const char* op, const at::Tensor& q,
                                     const std::optional<at::Tensor>& alibi_opt,
                                     const std::optional<at::Tensor>& sinks_opt, at::ArrayRef<double> variant,
                                     int64_t batch = -1) {
    if (batch < 0) batch = q.size(0);
    const int64_t heads_q = q.size(1);
    rules::Variant v{-1, -1, 0, 0, 0.f, nullptr, 0, nullptr};
    const std::string error = rules::unpack_variant(variant.data(), variant.size(), v);
    TORCH_CHECK(error.empty(), op, ": argument 'variant': ", error);
    if (alibi_opt.has_value() && alibi_opt->defined()) {
        const at::Tensor& alibi_slopes = *alibi_opt;
        CHECK_SAME_DEVICE(op, alibi_slopes, q);
        CHECK_DTYPE(op, alibi_slopes, at::kFloat);
        CHECK_CONTIGUOUS(op, alibi_slopes);
        TORCH_CHECK(alibi_slopes.dim() == 2 && (alibi_slopes.size(0) == 1 || alibi_slopes.size(0) == batch) &&
                        alibi_slopes.size(1) == heads_q,
                    op, ": argument 'alibi_slopes' must have shape (1 or ", batch, ", ", heads_q, "), got ",
                    alibi_slopes.sizes());
        v.alibi = alibi_slopes.data_ptr<float>();
        v.alibi_stride_b = alibi_slopes.size(0) == 1 ? 0 : heads_q;
    }
    if (sinks_opt.has_value() && sinks_opt->defined()) {
        const at::Tensor& sinks = *sinks_opt;
        CHECK_SAME_DEVICE(op, sinks, q);
        CHECK_DTYPE(op, sinks, at::kFloat);
        CHECK_CONTIGUOUS(op, sinks);
        TORCH_CHECK(sinks.dim() == 1 && sinks.size(0) == heads_q, op, ": argument 'sinks' must have shape (",
                    heads_q, ",), got ", sinks.sizes());
        v.sinks = sinks.data_ptr<float>();
    }
    return v;
}

// Element `i` of an op's summary list, or none (the list is empty without a mask tensor).
inline std::optional<at::Tensor> summary_part(at::TensorList summary, size_t i) {
    return i < summary.size() ? std::optional<at::Tensor>(summary[i]) : std::nullopt;
}

// The registry's sequence layout (OP_LAYOUT_ARGS) of an attention op, checked (naming the argument, what was
// expected and what was received). Dense: both offsets None and both maxima 0. Packed (varlen_attention): q
// and k are the (1, H, total, D) views of the packed tokens, cu_seqlens_q/k the (B + 1,) int32 or int64
// offsets on q's device, max_seqlen_q/k the longest sequence's lengths, and no mask tensor. The offsets'
// values (0 first, nondecreasing, the token count last, no sequence longer than the maxima) are checked by
// varlen_attention once per tensor (fastattn/_validate.py): reading them here would synchronise with the
// device on every call.
struct OpLayout {
    bool packed = false;
    // int32, contiguous (the kernels' SeqLayout); they must outlive the launch
    at::Tensor cu_seqlens_q, cu_seqlens_k;
    int64_t batch = 0, max_seqlen_q = 0, max_seqlen_k = 0;  // the sequences and their longest lengths
    SeqLayout seq_layout() const {
        if (!packed) return SeqLayout{nullptr, nullptr};
        return SeqLayout{cu_seqlens_q.data_ptr<int32_t>(), cu_seqlens_k.data_ptr<int32_t>()};
    }
};

inline OpLayout op_layout(const char* op, const at::Tensor& q, const at::Tensor& k,
                          const std::optional<at::Tensor>& cu_q_opt,
                          const std::optional<at::Tensor>& cu_k_opt, int64_t max_seqlen_q,
                          int64_t max_seqlen_k, bool has_mask) {
    const bool has_q = cu_q_opt.has_value() && cu_q_opt->defined();
    const bool has_k = cu_k_opt.has_value() && cu_k_opt->defined();
    OpLayout l;
    if (!has_q && !has_k) {
        TORCH_CHECK(
            max_seqlen_q == 0 && max_seqlen_k == 0, op,
            ": arguments 'max_seqlen_q'/'max_seqlen_k' must be 0 for a dense batch (cu_seqlens None), got ",
            max_seqlen_q, " and ", max_seqlen_k);
        return l;
    }
    TORCH_CHECK(has_q && has_k, op, ": arguments 'cu_seqlens_q' and 'cu_seqlens_k' come together, got ",
                has_q ? "cu_seqlens_k=None" : "cu_seqlens_q=None");
    const at::Tensor &cu_seqlens_q = *cu_q_opt, &cu_seqlens_k = *cu_k_opt;  // named for the checks' messages
    CHECK_SAME_DEVICE(op, cu_seqlens_q, q);
    CHECK_SAME_DEVICE(op, cu_seqlens_k, q);
    CHECK_DTYPE(op, cu_seqlens_q, at::kInt, at::kLong);
    CHECK_DTYPE(op, cu_seqlens_k, at::kInt, at::kLong);
    CHECK_DIM(op, cu_seqlens_q, 1);
    CHECK_DIM(op, cu_seqlens_k, 1);
    TORCH_CHECK(
        cu_seqlens_q.size(0) >= 1 && cu_seqlens_k.size(0) == cu_seqlens_q.size(0), op,
        ": arguments 'cu_seqlens_q' and 'cu_seqlens_k' must both have shape (B + 1,) with B >= 0, got ",
        cu_seqlens_q.sizes(), " and ", cu_seqlens_k.sizes());
    TORCH_CHECK(!has_mask, op, ": argument 'mask': packed sequences take no mask tensor, got one");
    TORCH_CHECK(
        q.size(0) == 1 && k.size(0) == 1, op,
        ": arguments 'q'/'k': packed sequences are (1, H, total, D) views of the (total, H, D) tokens, got ",
        q.sizes(), " and ", k.sizes());
    TORCH_CHECK(
        max_seqlen_q >= 0 && max_seqlen_q <= q.size(2) && max_seqlen_k >= 0 && max_seqlen_k <= k.size(2), op,
        ": arguments 'max_seqlen_q'/'max_seqlen_k' must be in [0, total_q = ", q.size(2),
        "] and [0, total_k = ", k.size(2), "], got ", max_seqlen_q, " and ", max_seqlen_k);
    l.packed = true;
    // The kernels read int32 offsets (totals are below 2^31, checked with the lengths): an int64 tensor is
    // converted.
    l.cu_seqlens_q = cu_seqlens_q.to(at::kInt).contiguous();
    l.cu_seqlens_k = cu_seqlens_k.to(at::kInt).contiguous();
    l.batch = cu_seqlens_q.size(0) - 1;
    l.max_seqlen_q = max_seqlen_q;
    l.max_seqlen_k = max_seqlen_k;
    return l;
}

// A kernel's (batch, head, row) strides of t: a batch of one reads batch stride 0, so that packed sequences
// (every sequence in batch 0, at its row offset) and dense batches share the kernels' addressing.
inline void kernel_strides(const at::Tensor& t, int64_t (&stride)[3]) {
    for (int d = 0; d < 3; ++d) stride[d] = t.stride(d);
    if (t.size(0) == 1) stride[0] = 0;
}

// A token-major (total, heads, dim) tensor seen as (1, heads, total, dim) (registry.packed_empty): packed
// outputs and gradients, so that the caller's (total, H, D) results are contiguous; poisoned with NaN under
// FASTATTN_POISON.
inline at::Tensor packed_output(const at::Tensor& like, int64_t heads, int64_t total, int64_t dim) {
    // (total, heads, dim) -> (heads, total, dim) -> (1, heads, total, dim)
    at::Tensor t = poison_outputs() ? at::full({total, heads, dim}, std::numeric_limits<float>::quiet_NaN(),
                                               like.options())
                                    : at::empty({total, heads, dim}, like.options());
    return t.permute({1, 0, 2}).unsqueeze(0);
}

}  // namespace fastattn

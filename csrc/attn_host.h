// Host-side tensor preparation shared by the attention ops (attn_ops.cpp, attn_bwd_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
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

}  // namespace fastattn

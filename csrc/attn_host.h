// Host-side tensor preparation shared by the attention ops (attn_ops.cpp, attn_bwd_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

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

}  // namespace fastattn

// Argument checks shared by the torch-facing files (csrc/*.cpp): each error names the op, the
// argument, what was expected and what was received. Moved verbatim out of bindings.cpp so that every
// op family (bindings.cpp, attn_ops.cpp, ...) reports bad input the same way.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <initializer_list>
#include <sstream>
#include <string>

#ifndef FASTATTN_EMULATE
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastattn {
namespace {

#ifdef FASTATTN_EMULATE
constexpr bool kEmulate = true;
constexpr const char* kDeviceHint =
    " (this is the emulation build, FASTATTN_CUDA_EMULATE=1: it runs the CUDA kernel source on CPU "
    "tensors; unset FASTATTN_CUDA_EMULATE for CUDA tensors)";
#else
constexpr bool kEmulate = false;
constexpr const char* kDeviceHint =
    " (the CUDA backend runs on CUDA tensors; set FASTATTN_CUDA_EMULATE=1 to run its kernel source "
    "on CPU tensors, slowly, for testing)";
#endif

inline bool on_backend_device(const at::Tensor& t) { return kEmulate ? t.device().is_cpu() : t.is_cuda(); }

// Outputs start as NaN under emulation, and on a GPU with FASTATTN_POISON=1 (the GPU test suite), so an
// element a kernel never writes fails the comparison instead of passing on stale memory.
inline bool poison_outputs() {
    if (kEmulate) return true;
    const char* env = std::getenv("FASTATTN_POISON");
    return env != nullptr && env[0] == '1' && env[1] == '\0';
}

// torch's Python names (float16, not Half), as users write them.
inline std::string dtype_name(at::ScalarType d) {
    switch (d) {
        case at::kHalf: return "torch.float16";
        case at::kBFloat16: return "torch.bfloat16";
        case at::kFloat: return "torch.float32";
        case at::kDouble: return "torch.float64";
        case at::kLong: return "torch.int64";
        case at::kInt: return "torch.int32";
        case at::kShort: return "torch.int16";
        case at::kChar: return "torch.int8";
        case at::kByte: return "torch.uint8";
        case at::kBool: return "torch.bool";
        default: return std::string("torch.") + c10::toString(d);
    }
}

inline std::string dtype_list(std::initializer_list<at::ScalarType> allowed) {
    std::ostringstream s;
    size_t i = 0;
    for (at::ScalarType d : allowed) {
        s << (i == 0 ? "" : (i + 1 == allowed.size() ? " or " : ", ")) << dtype_name(d);
        ++i;
    }
    return s.str();
}

inline std::string int_list(std::initializer_list<int64_t> allowed) {
    std::ostringstream s;
    size_t i = 0;
    for (int64_t v : allowed) s << (i++ ? ", " : "") << v;
    return s.str();
}

inline bool contains(std::initializer_list<at::ScalarType> set, at::ScalarType v) {
    for (auto x : set)
        if (x == v) return true;
    return false;
}
inline bool contains(std::initializer_list<int64_t> set, int64_t v) {
    for (auto x : set)
        if (x == v) return true;
    return false;
}

// Stream to launch on: the current CUDA stream of the tensor's device (none under emulation).
inline void* launch_stream() {
#ifdef FASTATTN_EMULATE
    return nullptr;
#else
    return c10::cuda::getCurrentCUDAStream().stream();
#endif
}

}  // namespace
}  // namespace fastattn

// Argument checks. Each names the op, the argument, what was expected and what was received.
#define CHECK_DEVICE(op, t)                                                                            \
    TORCH_CHECK(::fastattn::on_backend_device(t), op, ": argument '" #t "' must be a ",                \
                ::fastattn::kEmulate ? "CPU" : "CUDA", " tensor, got a tensor on ", (t).device(),       \
                ::fastattn::kDeviceHint)
#define CHECK_SAME_DEVICE(op, t, ref)                                                                  \
    TORCH_CHECK((t).device() == (ref).device(), op, ": argument '" #t "' must be on ", (ref).device(), \
                " like '" #ref "', got ", (t).device())
#define CHECK_DTYPE(op, t, ...)                                                                        \
    TORCH_CHECK(::fastattn::contains({__VA_ARGS__}, (t).scalar_type()), op, ": argument '" #t         \
                "' must have dtype ", ::fastattn::dtype_list({__VA_ARGS__}), ", got ",                        \
                ::fastattn::dtype_name((t).scalar_type()))
#define CHECK_SAME_DTYPE(op, t, ref)                                                                   \
    TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), op, ": argument '" #t "' must have dtype ",  \
                ::fastattn::dtype_name((ref).scalar_type()), " like '" #ref "', got ",                  \
                ::fastattn::dtype_name((t).scalar_type()))
#define CHECK_DIM(op, t, n)                                                                            \
    TORCH_CHECK((t).dim() == (n), op, ": argument '" #t "' must have ", n, " dimensions, got shape ",  \
                (t).sizes())
#define CHECK_CONTIGUOUS(op, t)                                                                        \
    TORCH_CHECK((t).is_contiguous(), op, ": argument '" #t "' must be contiguous, got strides ",       \
                (t).strides(), " for shape ", (t).sizes())
#define CHECK_MULTIPLE(op, what, value, m)                                                             \
    TORCH_CHECK((value) % (m) == 0, op, ": ", what, " must be a multiple of ", m, ", got ", value)
// For sizes the kernels are compiled for, e.g. CHECK_IN_SET(op, "head dim", d, 64, 128).
#define CHECK_IN_SET(op, what, value, ...)                                                             \
    TORCH_CHECK(::fastattn::contains({__VA_ARGS__}, int64_t(value)), op, ": ", what,                  \
                " must be one of ", ::fastattn::int_list({__VA_ARGS__}), " (the sizes this backend is " \
                "compiled for), got ", value)

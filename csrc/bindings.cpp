// Torch bindings of the CUDA backend: op schemas, argument checks, device guard, stream.
//
// The only file of the extension that includes torch headers; kernels take plain params structs
// (cuda/params.h). Built two ways (see fastattn/_ext):
//  * with nvcc's host compiler next to the .cu kernels: impls for CUDA tensors, launched on the
//    current stream under a device guard;
//  * with FASTATTN_EMULATE, next to the same kernel sources compiled as host C++: impls for CPU
//    tensors, run by the emulator (csrc/emulate).
// In each build the impl is registered for both the CPU and the CUDA dispatch keys, so that a
// tensor on the wrong device gets fastattn's own error (with the way out) instead of the
// dispatcher's "could not run ... with arguments from the 'CPU' backend".
//
// TORCH_LIBRARY_FRAGMENT, not TORCH_LIBRARY: the "fastattn" namespace is shared with the ops that
// Python (torch.library.custom_op) and the CPU backend's library define.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>

#ifndef FASTATTN_EMULATE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "cuda/params.h"

#include "checks.h"

namespace fastattn {
namespace {

// C = A @ B through the test GEMM kernel (every primitive of primitives.cuh); C is fp32.
at::Tensor cuda_test_gemm(const at::Tensor& a, const at::Tensor& b) {
    constexpr const char* op = "fastattn::cuda_test_gemm";
    CHECK_DEVICE(op, a);
    CHECK_SAME_DEVICE(op, b, a);
    CHECK_DTYPE(op, a, at::kHalf, at::kBFloat16);
    CHECK_SAME_DTYPE(op, b, a);
    CHECK_DIM(op, a, 2);
    CHECK_DIM(op, b, 2);
    TORCH_CHECK(a.size(1) == b.size(0), op, ": a (m, k) @ b (k, n) needs a.size(1) == b.size(0), got shapes ",
                a.sizes(), " and ", b.sizes());
    CHECK_CONTIGUOUS(op, a);
    CHECK_CONTIGUOUS(op, b);
    const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
    CHECK_MULTIPLE(op, "m (a.size(0))", m, test_gemm::kBlockM);
    CHECK_MULTIPLE(op, "n (b.size(1))", n, test_gemm::kBlockN);
    CHECK_MULTIPLE(op, "k (a.size(1))", k, test_gemm::kBlockK);
    TORCH_CHECK(m > 0 && n > 0 && k > 0, op, ": empty operands, shapes ", a.sizes(), " and ", b.sizes());

#ifndef FASTATTN_EMULATE
    const c10::cuda::OptionalCUDAGuard guard(a.device());
#endif
    // Poisoned, so that an element the kernel fails to write reads NaN.
    at::Tensor c = at::full({m, n}, std::numeric_limits<float>::quiet_NaN(), a.options().dtype(at::kFloat));
    TestGemmParams p{a.data_ptr(), b.data_ptr(), c.data_ptr<float>(), int(m), int(n), int(k),
                     k, n, n, a.scalar_type() == at::kHalf ? DType::f16 : DType::bf16};
    const char* err = test_gemm::launch(p, launch_stream());
    TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
    return c;
}

std::string cuda_ext_info() { return kEmulate ? "emulate" : "cuda"; }

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
    m.def("cuda_test_gemm(Tensor a, Tensor b) -> Tensor");
    // "cuda" or "emulate": which build of the CUDA backend's library is loaded.
    m.def("cuda_ext_info() -> str", &fastattn::cuda_ext_info);
}

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("cuda_test_gemm", &fastattn::cuda_test_gemm); }
TORCH_LIBRARY_IMPL(fastattn, CPU, m) { m.impl("cuda_test_gemm", &fastattn::cuda_test_gemm); }

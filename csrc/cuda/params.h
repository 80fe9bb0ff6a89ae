// Plain parameter structs and launcher declarations shared by csrc/bindings.cpp and the kernels.
//
// No torch (and no CUDA) headers here: kernel sources (.cu) include only this and primitives.cuh,
// so they compile fast with nvcc and compile as host C++ for the emulator. Launchers take the
// stream as void* (a cudaStream_t on a GPU, ignored by the emulator) and return nullptr on success
// or a static error string (a launch error on a GPU); the emulator throws fa_emu::Fault instead.
#pragma once

#include <stdint.h>

namespace fastattn {

enum class DType : int { f16 = 0, bf16 = 1 };

// C (m x n, fp32) = A (m x k, row-major) @ B (k x n, row-major), A and B in `dtype`.
// The test kernel of the extension groundwork: it exercises every primitive together.
struct TestGemmParams {
    const void* a;
    const void* b;
    float* c;
    int m, n, k;
    int64_t lda, ldb, ldc;  // row strides in elements
    DType dtype;
};

namespace test_gemm {
constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 32;  // m, n, k must be multiples
const char* launch(const TestGemmParams& p, void* stream);
}  // namespace test_gemm

}  // namespace fastattn

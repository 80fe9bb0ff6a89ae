// Must FAIL under AddressSanitizer: proves that the emulator exposes out-of-bounds shared and global
// accesses of kernel code to ASan (make test-ext-emulate runs it and expects the ASan report).
// argv[1]: "dynamic" (one element past the dynamic shared buffer), "static" (past a __shared__
// array) or "global" (one element past a global buffer, through cp.async).
#include <stdio.h>
#include <string.h>

#include "../cuda/primitives.cuh"

__global__ void oob_dynamic(int n) {
    FA_DYNAMIC_SMEM(float, s);
    s[threadIdx.x] = 1.f;
    __syncthreads();
    if (threadIdx.x == 0) s[n] = 2.f;  // n == number of floats: one past the end
}

__global__ void oob_static() {
    __shared__ float s[64];
    s[threadIdx.x + 1] = 1.f;  // thread 63 writes s[64]
    __syncthreads();
    if (threadIdx.x == 0 && s[1] != 1.f) printf("unreachable\n");
}

__global__ void oob_global(const float* g) {
    __shared__ __align__(16) float s[4 * 33];
    fa::cp_async_16(&s[4 * threadIdx.x], &g[4 * threadIdx.x + 4]);  // the last lane reads past g
    fa::cp_async_commit();
    fa::cp_async_wait<0>();
}

int main(int argc, char** argv) {
    const char* what = argc > 1 ? argv[1] : "dynamic";
    if (!strcmp(what, "dynamic")) FA_LAUNCH_KERNEL(oob_dynamic, dim3(1), dim3(64), 64 * sizeof(float), nullptr, 64);
    if (!strcmp(what, "static")) FA_LAUNCH_KERNEL(oob_static, dim3(1), dim3(64), 0, nullptr);
    if (!strcmp(what, "global")) {
        float* g = new float[4 * 32];
        FA_LAUNCH_KERNEL(oob_global, dim3(1), dim3(32), 0, nullptr, g);
        delete[] g;
    }
    printf("no error detected (%s)\n", what);
    return 0;
}

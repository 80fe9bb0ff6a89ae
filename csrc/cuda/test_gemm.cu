// Test kernel: a double-buffered tiled matrix multiply through every primitive of primitives.cuh.
//
// C (m x n, fp32) = A (m x k) @ B (k x n), fp16 or bf16 inputs, row-major.
// Design: a 64x64 output tile per block of 128 threads (4 warps in 2x2, 32x32 per warp:
// 2 m16 x 4 n8 mma tiles). k advances in 32-wide tiles held in two shared-memory stages:
//   global --cp.async 16B--> shared (stage s^1, while stage s is consumed)
//   shared --ldmatrix.x4--> A fragments,  --ldmatrix.x2.trans--> B fragments (B is k-major in
//   shared memory; .trans yields the "col" fragment mma wants)
//   mma.m16n8k16 (fp32 accumulate) -> shfl.xor epilogue that gives each lane 4 consecutive
//   columns, stored with one 16-byte write.
// Shared rows are padded by 8 elements (16 bytes) so the 8 row addresses of an ldmatrix fall in
// different banks. Shared memory: 2 stages x (64x40 + 32x72) x 2 bytes = 19456 bytes.
// FLOPs 2mnk; it is a test of the primitives and the emulator, not a fast GEMM.
//
// FASTATTN_TEST_BREAK (compile-time, for the emulator's own tests) removes a synchronisation:
//   1: the __syncthreads() between the copies' wait and the ldmatrix reads,
//   2: the cp_async_wait before the reads,
//   3: the __syncthreads() that ends an iteration (next stage overwritten while still read).
// Each broken variant lives in its own namespace so all of them can link into one test binary.
#include "params.h"
#include "primitives.cuh"

#ifndef FASTATTN_TEST_BREAK
#define FASTATTN_TEST_BREAK 0
#endif
#if FASTATTN_TEST_BREAK == 0
#define FA_GEMM_NS test_gemm
#elif FASTATTN_TEST_BREAK == 1
#define FA_GEMM_NS test_gemm_nosync
#elif FASTATTN_TEST_BREAK == 2
#define FA_GEMM_NS test_gemm_nowait
#elif FASTATTN_TEST_BREAK == 3
#define FA_GEMM_NS test_gemm_nosync_end
#else
#error "FASTATTN_TEST_BREAK must be 0, 1, 2 or 3"
#endif

namespace fastattn {
namespace FA_GEMM_NS {

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
constexpr int kLdA = kBK + 8;  // padded shared row strides, in elements
constexpr int kLdB = kBN + 8;
constexpr int kStageA = kBM * kLdA, kStageB = kBK * kLdB;
constexpr int kSmemBytes = 2 * (kStageA + kStageB) * 2;

template <class T>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ c, int k,
                int64_t lda, int64_t ldb, int64_t ldc) {
    FA_DYNAMIC_SMEM(T, smem);
    T* sa = smem;                // [2][kBM][kLdA]
    T* sb = smem + 2 * kStageA;  // [2][kBK][kLdB]
    const int tid = int(threadIdx.x), lane = tid % 32, warp = tid / 32;
    const int wm = warp / 2, wn = warp % 2;  // the warp's 32x32 quadrant
    const int64_t row0 = int64_t(blockIdx.y) * kBM, col0 = int64_t(blockIdx.x) * kBN;

    // One k-tile: A 64x32 = 256 chunks of 8 elements (4 per row), B 32x64 = 256 chunks (8 per row).
    auto load_tile = [&](int kt, int stage) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int chunk = tid + i * kThreads;
            const int ar = chunk / 4, ac = (chunk % 4) * 8;
            fa::cp_async_16(sa + stage * kStageA + ar * kLdA + ac,
                            a + (row0 + ar) * lda + int64_t(kt) * kBK + ac);
            const int br = chunk / 8, bc = (chunk % 8) * 8;
            fa::cp_async_16(sb + stage * kStageB + br * kLdB + bc,
                            b + (int64_t(kt) * kBK + br) * ldb + col0 + bc);
        }
    };

    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.f;

    const int ktiles = k / kBK;
    load_tile(0, 0);
    fa::cp_async_commit();
    for (int kt = 0; kt < ktiles; ++kt) {
        const int stage = kt & 1;
        if (kt + 1 < ktiles) {
            load_tile(kt + 1, stage ^ 1);
            fa::cp_async_commit();
#if FASTATTN_TEST_BREAK != 2
            fa::cp_async_wait<1>();  // tile kt landed; tile kt+1 may still be in flight
#endif
        } else {
#if FASTATTN_TEST_BREAK != 2
            fa::cp_async_wait<0>();
#endif
        }
#if FASTATTN_TEST_BREAK != 1
        __syncthreads();  // every thread's copies of tile kt are visible
#endif
        const T* ta = sa + stage * kStageA;
        const T* tb = sb + stage * kStageB;
#pragma unroll
        for (int kk = 0; kk < kBK; kk += 16) {
            uint32_t af[2][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                // lanes 0-15: rows 0-15 at column kk; lanes 16-31: rows 0-15 at column kk + 8
                // -> registers (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (8-15, 8-15)
                const int r = wm * 32 + mi * 16 + lane % 16;
                fa::ldmatrix_x4(af[mi], ta + r * kLdA + kk + (lane / 16) * 8);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                // lanes 0-15 give rows kk..kk+15 of B (k) at column n0; .trans hands each lane
                // B[k = 2(lane%4) + {0,1} (+8)][n = lane/4], the mma "col" fragment.
                const int n0 = wn * 32 + ni * 8;
                fa::ldmatrix_x2<true>(bfr[ni], tb + (kk + lane % 16) * kLdB + n0);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
                    fa::mma_m16n8k16<T>(acc[mi][ni], af[mi], bfr[ni], acc[mi][ni]);
        }
#if FASTATTN_TEST_BREAK != 3
        __syncthreads();  // everyone is done reading this stage before it is refilled
#endif
    }

    // Epilogue: lane (g = lane/4, t = lane%4) holds rows g and g+8, columns 2t and 2t+1. Swap half
    // of that with lane^1 so that even t holds row g, columns 2t..2t+3 and odd t holds row g+8,
    // columns 2t-2..2t+1, then write 16 bytes.
    const int g = lane / 4, t = lane % 4;
    const bool even = (t % 2) == 0;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const float* v = acc[mi][ni];
            const float s0 = even ? v[2] : v[0], s1 = even ? v[3] : v[1];
            const float r0 = fa::shfl_xor(s0, 1), r1 = fa::shfl_xor(s1, 1);
            const int row = wm * 32 + mi * 16 + g + (even ? 0 : 8);
            const int col = wn * 32 + ni * 8 + (even ? 2 * t : 2 * t - 2);
            float4 out = even ? float4{v[0], v[1], r0, r1} : float4{r0, r1, v[2], v[3]};
            *reinterpret_cast<float4*>(c + (row0 + row) * ldc + col0 + col) = out;
        }
}

template <class T>
const char* launch_typed(const TestGemmParams& p, void* stream) {
    const dim3 grid(unsigned(p.n / kBN), unsigned(p.m / kBM));
    FA_LAUNCH_KERNEL(gemm_kernel<T>, grid, dim3(kThreads), kSmemBytes, stream,
                     static_cast<const T*>(p.a), static_cast<const T*>(p.b), p.c, p.k, p.lda, p.ldb,
                     p.ldc);
    return fa_launch_status();
}

const char* launch(const TestGemmParams& p, void* stream) {
    if (p.m % kBM || p.n % kBN || p.k % kBK || p.m <= 0 || p.n <= 0 || p.k <= 0)
        return "test_gemm: m, n, k must be positive multiples of 64, 64, 32";
    if (p.dtype == DType::f16) return launch_typed<fa::half_t>(p, stream);
    return launch_typed<fa::bf16_t>(p, stream);
}

}  // namespace FA_GEMM_NS
}  // namespace fastattn

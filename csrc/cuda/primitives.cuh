// Warp-level primitives for fastattn's CUDA kernels, and nothing else.
//
// Every kernel reaches the tensor cores, shared-memory matrix loads, asynchronous copies and warp
// shuffles through this header only. Compiled by nvcc it emits the PTX instructions; compiled as
// host C++ with FASTATTN_EMULATE defined it forwards to the CPU emulator (csrc/emulate/), which
// implements each instruction after the PTX ISA's fragment layouts. Keeping the kernels on this one
// interface is what lets the emulator run their unmodified source.
//
// Register conventions are PTX's: a 32-bit register holds two 16-bit elements, the element with the
// lower index in the low half.
//   mma_m16n8k16:  A 16x16 row-major in a[4], B 16x8 (K x N) "col" in b[2], C/D 16x8 fp32 in c[4]/d[4].
//   ldmatrix:      8x8 matrices of 16-bit elements, one 16-byte row address per lane.
//   cp_async_16:   16 bytes global -> shared, completed by cp_async_wait<N>().
#pragma once

#include <stdint.h>

#ifdef FASTATTN_EMULATE
#include "../emulate/emulate.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#ifndef FA_DEVICE
#define FA_DEVICE __device__ __forceinline__
#endif

// Launch a kernel on a stream: the emulator has no <<<>>> syntax, so kernels launch through this.
#ifdef FASTATTN_EMULATE
#define FA_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...)              \
    do {                                                                               \
        (void)(stream); /* the emulator runs synchronously, on the calling thread */   \
        ::fa_emu::launch((grid), (block), (smem_bytes), [&]() { kernel(__VA_ARGS__); }); \
    } while (0)
// Dynamic shared memory: one fresh buffer per block, poisoned with 0xFF bytes (NaN in fp16/bf16/fp32).
#define FA_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::fa_emu::dynamic_smem())
#else
#define FA_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...) \
    kernel<<<(grid), (block), (smem_bytes), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#define FA_DYNAMIC_SMEM(type, name) \
    extern __shared__ __align__(16) unsigned char fa_dynamic_smem_[]; \
    type* name = reinterpret_cast<type*>(fa_dynamic_smem_)
#endif

// What a launcher returns after its launches: nullptr, or the CUDA error of the last one. The emulator
// runs kernels synchronously and reports its errors itself, so there it is always nullptr.
inline const char* fa_launch_status() {
#ifdef FASTATTN_EMULATE
    return nullptr;
#else
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
#endif
}

namespace fa {

#ifdef FASTATTN_EMULATE
using half_t = ::fa_emu::half_t;
using bf16_t = ::fa_emu::bf16_t;
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
#endif

// ---------------------------------------------------------------------------------------------
// Conversions (round to nearest even, as cvt.rn does)
// ---------------------------------------------------------------------------------------------
FA_DEVICE float to_float(half_t x) {
#ifdef FASTATTN_EMULATE
    return ::fa_emu::f16_bits_to_f32(x.bits);
#else
    return __half2float(x);
#endif
}
FA_DEVICE float to_float(bf16_t x) {
#ifdef FASTATTN_EMULATE
    return ::fa_emu::bf16_bits_to_f32(x.bits);
#else
    return __bfloat162float(x);
#endif
}

// Two floats -> one register of two 16-bit elements (lo in the low half), rounded to nearest even.
template <class T>
FA_DEVICE uint32_t pack2(float lo, float hi);
template <>
FA_DEVICE uint32_t pack2<half_t>(float lo, float hi) {
#ifdef FASTATTN_EMULATE
    return uint32_t(::fa_emu::f32_to_f16_bits(lo)) | (uint32_t(::fa_emu::f32_to_f16_bits(hi)) << 16);
#else
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
#endif
}
template <>
FA_DEVICE uint32_t pack2<bf16_t>(float lo, float hi) {
#ifdef FASTATTN_EMULATE
    return uint32_t(::fa_emu::f32_to_bf16_bits(lo)) | (uint32_t(::fa_emu::f32_to_bf16_bits(hi)) << 16);
#else
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
#endif
}

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32:  D = A * B + C
// ---------------------------------------------------------------------------------------------
template <class T>
FA_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                            const float (&c)[4]);

template <>
FA_DEVICE void mma_m16n8k16<half_t>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                    const float (&c)[4]) {
#ifdef FASTATTN_EMULATE
    ::fa_emu::mma_m16n8k16(::fa_emu::Elem::f16, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
#endif
}

template <>
FA_DEVICE void mma_m16n8k16<bf16_t>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                    const float (&c)[4]) {
#ifdef FASTATTN_EMULATE
    ::fa_emu::mma_m16n8k16(::fa_emu::Elem::bf16, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
#endif
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16
// Lanes 0-7 give the row addresses of matrix 0, 8-15 of matrix 1, ... (x1 reads lanes 0-7 only,
// x2 lanes 0-15). Each address must be 16-byte aligned and point into shared memory.
// ---------------------------------------------------------------------------------------------
#ifndef FASTATTN_EMULATE
FA_DEVICE uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

template <bool Trans = false>
FA_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
#ifdef FASTATTN_EMULATE
    ::fa_emu::ldmatrix(1, Trans, r, smem_row);
#else
    if constexpr (Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                     : "=r"(r[0]) : "r"(smem_u32(smem_row)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                     : "=r"(r[0]) : "r"(smem_u32(smem_row)));
#endif
}

template <bool Trans = false>
FA_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
#ifdef FASTATTN_EMULATE
    ::fa_emu::ldmatrix(2, Trans, r, smem_row);
#else
    if constexpr (Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(smem_row)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(smem_row)));
#endif
}

template <bool Trans = false>
FA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef FASTATTN_EMULATE
    ::fa_emu::ldmatrix(4, Trans, r, smem_row);
#else
    if constexpr (Trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(smem_row)));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(smem_row)));
#endif
}

// ---------------------------------------------------------------------------------------------
// cp.async.cg.shared.global (16 bytes) with commit_group / wait_group
// ---------------------------------------------------------------------------------------------
// Copies 16 bytes; the destination must not be read before a cp_async_wait that covers its group.
FA_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src) {
#ifdef FASTATTN_EMULATE
    ::fa_emu::cp_async(smem_dst, gmem_src, 16, 16);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem_dst)),
                 "l"(gmem_src));
#endif
}

// As cp_async_16, but when !valid it reads nothing and writes 16 zero bytes (for tile edges).
FA_DEVICE void cp_async_16_zfill(void* smem_dst, const void* gmem_src, bool valid) {
#ifdef FASTATTN_EMULATE
    ::fa_emu::cp_async(smem_dst, gmem_src, 16, valid ? 16 : 0);
#else
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
                 "l"(gmem_src), "r"(src_bytes));
#endif
}

FA_DEVICE void cp_async_commit() {
#ifdef FASTATTN_EMULATE
    ::fa_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed groups are still pending.
template <int N>
FA_DEVICE void cp_async_wait() {
#ifdef FASTATTN_EMULATE
    ::fa_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---------------------------------------------------------------------------------------------
// Warp shuffles over the full warp (mask 0xffffffff), 32-bit values.
// ---------------------------------------------------------------------------------------------
template <class T>
FA_DEVICE T shfl_xor(T v, int lane_mask, int width = 32) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
}
template <class T>
FA_DEVICE T shfl_down(T v, unsigned delta, int width = 32) {
    return __shfl_down_sync(0xffffffffu, v, delta, width);
}
template <class T>
FA_DEVICE T shfl_up(T v, unsigned delta, int width = 32) {
    return __shfl_up_sync(0xffffffffu, v, delta, width);
}
template <class T>
FA_DEVICE T shfl_idx(T v, int src_lane, int width = 32) {
    return __shfl_sync(0xffffffffu, v, src_lane, width);
}

}  // namespace fa

// CPU emulation of the CUDA execution model, for running fastattn's kernel sources without a GPU.
//
// Included (through csrc/cuda/primitives.cuh) when a .cu kernel source is compiled as host C++
// with FASTATTN_EMULATE defined. It supplies the CUDA language surface the kernels use
// (__global__, __shared__, threadIdx, __syncthreads, __shfl_*_sync, fp16/bf16 storage types) and
// the warp-level primitives of primitives.cuh, implemented in emulate.cpp:
//
// * A launch runs its blocks one after another. Each block's threads are cooperative fibers
//   (a register-swapping switch on x86-64, ucontext elsewhere) on the calling OS thread; a fiber
//   runs until it reaches a __syncthreads() or a warp collective (mma, ldmatrix, shuffle,
//   __syncwarp), then the next runnable fiber runs.
//   __syncthreads() releases when every live thread of the block has reached it. A deadlock
//   (divergent barrier, a lane that exited before a collective) is reported as an error.
// * The order in which runnable fibers (and blocks) are picked is forward, reversed or random
//   (FASTATTN_EMULATE_ORDER=forward|reversed|random[:seed], or set_order()). Code that misses a
//   __syncthreads() reads another thread's data before it is written in at least one order.
// * Warp collectives stage each lane's operands in a per-warp area; the last lane to arrive
//   computes every lane's result after the PTX ISA's layouts; each lane then reads its own.
// * cp.async fills its destination with 0xFF bytes (NaN in fp16, bf16 and fp32) when issued and
//   writes the data only at the cp_async_wait that covers its group, so a missing wait reads NaN.
// * __shared__ variables are function-local statics (blocks run one at a time, so they are per
//   block); dynamic shared memory is a fresh heap buffer per block, poisoned with 0xFF, so
//   AddressSanitizer sees out-of-bounds accesses to it. (Clang's ASan also checks the statics;
//   GCC's does not instrument function-local statics. Kernels therefore keep their shared memory
//   dynamic, through FA_DYNAMIC_SMEM.)
//
// Errors inside a kernel (misaligned ldmatrix address, partial shuffle mask, deadlock) throw
// fa_emu::Fault out of launch(); the torch bindings turn it into a Python RuntimeError.
#pragma once

#ifndef FASTATTN_EMULATE
#error "emulate.h is for the host-C++ build of the kernel sources (define FASTATTN_EMULATE)"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace fa_emu {

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// 16-bit storage types: the bits only; arithmetic happens in float, as in the kernels.
struct half_t {
    uint16_t bits;
};
struct bf16_t {
    uint16_t bits;
};
enum class Elem { f16, bf16 };
enum class Order { forward, reversed, random };

// An error of the emulated program (what would be a fault or undefined behaviour on a GPU).
struct Fault : std::runtime_error {
    using std::runtime_error::runtime_error;
};
[[noreturn]] void fail(const std::string& msg);

// ---- fp16 / bf16 conversions, round to nearest even, as cvt.rn.{f16,bf16}.f32 ----
inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline uint16_t f32_to_f16_bits(float f) {
    uint32_t u = f32_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    if (u >= 0x7f800000u) return uint16_t(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));  // NaN/inf
    if (u >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (u < 0x38800000u) {
        // Below the smallest normal half (2^-14): the result is a multiple of 2^-24. Adding 0.5
        // (2^-1) puts that multiple in the low mantissa bits of the float sum, rounded by the FPU
        // to nearest even (the sum stays in [0.5, 1), where the float ulp is 2^-24).
        const float t = bits_f32(u) + 0.5f;
        return uint16_t(sign | (f32_bits(t) - 0x3f000000u));
    }
    // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
    const uint32_t odd = (u >> 13) & 1u;
    u += 0xc8000fffu + odd;  // -(112 << 23) + 0xfff + odd, modulo 2^32
    return uint16_t(sign | (u >> 13));
}
inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
        const float v = float(man) * 5.9604644775390625e-08f;
        return bits_f32(f32_bits(v) | sign);
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}
inline uint16_t f32_to_bf16_bits(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) { return bits_f32(uint32_t(b) << 16); }

// ---- the running thread ----
struct ThreadIds {
    dim3 thread_idx, block_idx, block_dim, grid_dim;
};
const ThreadIds& ids();  // of the fiber now running; fails outside a kernel
void syncthreads();
void syncwarp(unsigned mask);
void* dynamic_smem();

// ---- launching ----
// Runs body once per thread of every block; synchronous. Throws Fault on an emulated fault.
void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body);
// Override the fiber order for launches from this OS thread (else FASTATTN_EMULATE_ORDER, else forward).
void set_order(Order order, uint64_t seed = 0);
void clear_order();

// ---- primitives (see csrc/cuda/primitives.cuh) ----
void mma_m16n8k16(Elem elem, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]);
void ldmatrix(int num, bool trans, uint32_t* regs, const void* smem_row);
void cp_async(void* smem_dst, const void* gmem_src, int cp_bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_allowed);
// shfl.sync.{up,down,bfly,idx}.b32 with PTX's b and c operands.
enum class ShflMode { up, down, bfly, idx };
uint32_t shfl(ShflMode mode, unsigned mask, uint32_t value, int b, int c);

template <class T>
inline T shfl_any(ShflMode mode, unsigned mask, T v, int b, int c) {
    static_assert(std::is_trivially_copyable<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                  "emulated shuffles move 4- or 8-byte values");
    uint32_t w[2] = {0, 0};
    memcpy(w, &v, sizeof(T));
    w[0] = shfl(mode, mask, w[0], b, c);
    if (sizeof(T) == 8) w[1] = shfl(mode, mask, w[1], b, c);
    T out;
    memcpy(&out, w, sizeof(T));
    return out;
}

}  // namespace fa_emu

// ---- the CUDA language surface used by kernel sources ----
using fa_emu::dim3;
typedef void* cudaStream_t;
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define threadIdx (::fa_emu::ids().thread_idx)
#define blockIdx (::fa_emu::ids().block_idx)
#define blockDim (::fa_emu::ids().block_dim)
#define gridDim (::fa_emu::ids().grid_dim)
#define warpSize 32

inline void __syncthreads() { ::fa_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::fa_emu::syncwarp(mask); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return ::fa_emu::shfl_any(::fa_emu::ShflMode::idx, mask, v, src_lane, ((32 - width) << 8) | 0x1f);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::fa_emu::shfl_any(::fa_emu::ShflMode::up, mask, v, int(delta), (32 - width) << 8);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::fa_emu::shfl_any(::fa_emu::ShflMode::down, mask, v, int(delta), ((32 - width) << 8) | 0x1f);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return ::fa_emu::shfl_any(::fa_emu::ShflMode::bfly, mask, v, lane_mask, ((32 - width) << 8) | 0x1f);
}

// Fibers never run concurrently, so atomics are plain read-modify-writes.
template <class T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int i) { return ::fa_emu::bits_f32(uint32_t(i)); }
inline int __float_as_int(float f) { return int(::fa_emu::f32_bits(f)); }
inline float __uint_as_float(unsigned u) { return ::fa_emu::bits_f32(u); }
inline unsigned __float_as_uint(float f) { return ::fa_emu::f32_bits(f); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

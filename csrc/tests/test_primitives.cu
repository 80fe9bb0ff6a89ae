// Tests of the warp-level primitives (csrc/cuda/primitives.cuh), and of the emulator that runs them.
//
// One source, two builds:
//  * host C++ with -DFASTATTN_EMULATE (make test-ext-native, under AddressSanitizer): checks the
//    emulator's primitives, the test GEMM in forward/reversed/random fiber orders, and that the
//    broken GEMM variants fail;
//  * nvcc (make test-ext-cuda-prims, needs a GPU to run): the same primitive checks on hardware, which
//    confirms that the emulator's layouts are the hardware's.
// Every primitive is checked against an independent statement of its layout: CuTe's thread-value
// layouts (cute/atom/mma_traits_sm80.hpp, copy_traits_sm75.hpp), written here as (shape, stride)
// pairs and evaluated generically, on random data, for fp16 and bf16.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "../cuda/params.h"
#include "../cuda/primitives.cuh"

#ifdef FASTATTN_EMULATE
namespace fastattn {
namespace test_gemm_nosync {
const char* launch(const TestGemmParams& p, void* stream);
}
namespace test_gemm_nowait {
const char* launch(const TestGemmParams& p, void* stream);
}
namespace test_gemm_nosync_end {
const char* launch(const TestGemmParams& p, void* stream);
}
}  // namespace fastattn
#endif

// ------------------------------------------------------------------------------------------------
// Device memory, portable between the two builds.
// ------------------------------------------------------------------------------------------------
template <class T>
struct DevBuf {
    T* ptr = nullptr;
    size_t n = 0;
    explicit DevBuf(size_t n_) : n(n_) {
#ifdef FASTATTN_EMULATE
        ptr = new T[n];
#else
        if (cudaMalloc(&ptr, n * sizeof(T)) != cudaSuccess) {
            fprintf(stderr, "cudaMalloc failed\n");
            exit(2);
        }
#endif
    }
    ~DevBuf() {
#ifdef FASTATTN_EMULATE
        delete[] ptr;
#else
        cudaFree(ptr);
#endif
    }
    void upload(const std::vector<T>& h) {
#ifdef FASTATTN_EMULATE
        memcpy(ptr, h.data(), n * sizeof(T));
#else
        cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice);
#endif
    }
    std::vector<T> download() const {
        std::vector<T> h(n);
#ifdef FASTATTN_EMULATE
        memcpy(h.data(), ptr, n * sizeof(T));
#else
        cudaDeviceSynchronize();
        cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost);
#endif
        return h;
    }
    void poison() {  // 0xFF bytes: NaN in every float format
#ifdef FASTATTN_EMULATE
        memset(ptr, 0xff, n * sizeof(T));
#else
        cudaMemset(ptr, 0xff, n * sizeof(T));
#endif
    }
};

static int g_failures = 0;
static void check(bool ok, const std::string& name, const std::string& detail = "") {
    printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
    if (!ok) ++g_failures;
}

static void sync_and_check_launch(const char* what) {
#ifndef FASTATTN_EMULATE
    const cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) {
        fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
        exit(2);
    }
#else
    (void)what;
#endif
}

// ------------------------------------------------------------------------------------------------
// The independent statement: CuTe layouts. A layout maps a 1-D index through a (shape, stride)
// pair: the index is split colexicographically (first mode fastest) over the shape, and the
// coordinates are dotted with the strides.
// ------------------------------------------------------------------------------------------------
struct Layout {
    int rank;
    int shape[4];
    int stride[4];
};
__host__ __device__ inline int eval(const Layout& l, int idx) {
    int off = 0;
    for (int i = 0; i < l.rank; ++i) {
        off += (idx % l.shape[i]) * l.stride[i];
        idx /= l.shape[i];
    }
    return off;
}
// SM80_16x8x16_F32{F16F16,BF16BF16}F32_TN: (thread, value) -> column-major offset in the operand.
//   A: (T32, V8) -> (M16, K16), offset m + 16k    B: (T32, V4) -> (N8, K16), offset n + 8k
//   C: (T32, V4) -> (M16, N8), offset m + 16n
__host__ __device__ inline int mma_a_offset(int lane, int v) {
    const Layout thr = {2, {4, 8}, {32, 1}}, val = {3, {2, 2, 2}, {16, 8, 128}};
    return eval(thr, lane) + eval(val, v);
}
__host__ __device__ inline int mma_b_offset(int lane, int v) {
    const Layout thr = {2, {4, 8}, {16, 1}}, val = {2, {2, 2}, {8, 64}};
    return eval(thr, lane) + eval(val, v);
}
__host__ __device__ inline int mma_c_offset(int lane, int v) {
    const Layout thr = {2, {4, 8}, {32, 1}}, val = {2, {2, 2}, {16, 8}};
    return eval(thr, lane) + eval(val, v);
}
// ldmatrix (SM75_U32x{1,2,4}_LDSM_N / SM75_U16x{2,4,8}_LDSM_T): (thread, value bit) -> bit offset
// in the reference space of `num` 8x8 row-major 16-bit matrices (1024 bits each). Value index
// = bit + 32 * register.
inline int ldsm_bit_offset(bool trans, int num, int lane, int value_bit) {
    if (!trans) {
        const Layout thr = {1, {32}, {32}}, val = {2, {32, num}, {1, 1024}};
        return eval(thr, lane) + eval(val, value_bit);
    }
    const Layout thr = {2, {4, 8}, {256, 16}}, val = {3, {16, 2, num}, {1, 128, 1024}};
    return eval(thr, lane) + eval(val, value_bit);
}

// ------------------------------------------------------------------------------------------------
// Kernels (each one warp unless said otherwise)
// ------------------------------------------------------------------------------------------------
// D = A @ B + C with fragments gathered and scattered through the CuTe layouts.
// a: 16x16 row-major bits, b: 16x8 (k x n) row-major bits, c, d: 16x8 row-major fp32.
template <class T>
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
    const int lane = int(threadIdx.x);
    uint32_t ra[4] = {0, 0, 0, 0}, rb[2] = {0, 0};
    float rc[4], rd[4];
    for (int v = 0; v < 8; ++v) {
        const int off = mma_a_offset(lane, v), m = off % 16, k = off / 16;
        ra[v / 2] |= uint32_t(a[m * 16 + k]) << (16 * (v % 2));
    }
    for (int v = 0; v < 4; ++v) {
        const int off = mma_b_offset(lane, v), n = off % 8, k = off / 8;
        rb[v / 2] |= uint32_t(b[k * 8 + n]) << (16 * (v % 2));
    }
    for (int v = 0; v < 4; ++v) {
        const int off = mma_c_offset(lane, v), m = off % 16, n = off / 16;
        rc[v] = c[m * 8 + n];
    }
    fa::mma_m16n8k16<T>(rd, ra, rb, rc);
    for (int v = 0; v < 4; ++v) {
        const int off = mma_c_offset(lane, v), m = off % 16, n = off / 16;
        d[m * 8 + n] = rd[v];
    }
}

// Rows of `num` 8x8 matrices are staged in shared memory at a 24-element stride; rows 32..39 hold
// decoy data that lanes whose address ldmatrix ignores point at. out[lane * num + j] = register j.
constexpr int kLdsmStride = 24;
template <int Num, bool Trans>
__global__ void ldmatrix_kernel(const uint16_t* src, uint32_t* out) {
    __shared__ __align__(16) uint16_t s[40 * kLdsmStride];
    const int lane = int(threadIdx.x);
    for (int r = lane; r < 40; r += 32)
        for (int c = 0; c < 8; ++c) s[r * kLdsmStride + c] = src[r * 8 + c];
    __syncthreads();
    const int row = lane < 8 * Num ? lane : 32 + lane % 8;  // ignored lanes point at decoys
    uint32_t r[Num];
    if constexpr (Num == 1) fa::ldmatrix_x1<Trans>(r, s + row * kLdsmStride);
    if constexpr (Num == 2) fa::ldmatrix_x2<Trans>(r, s + row * kLdsmStride);
    if constexpr (Num == 4) fa::ldmatrix_x4<Trans>(r, s + row * kLdsmStride);
    for (int j = 0; j < Num; ++j) out[lane * Num + j] = r[j];
}

// Shuffle cases: (mode, operand, width); idx uses a lane-dependent source.
enum { kUp, kDown, kXor, kIdx };
struct ShflCase {
    int mode, operand, width;
};
constexpr ShflCase kShflCases[] = {{kXor, 1, 32},  {kXor, 2, 32},  {kXor, 16, 32}, {kXor, 3, 4},
                                   {kXor, 5, 8},   {kDown, 1, 32}, {kDown, 7, 32}, {kDown, 3, 8},
                                   {kUp, 1, 32},   {kUp, 9, 32},   {kUp, 2, 4},    {kIdx, 0, 32},
                                   {kIdx, 0, 16},  {kIdx, 0, 4}};
constexpr int kNumShfl = int(sizeof(kShflCases) / sizeof(kShflCases[0]));
__host__ __device__ inline int idx_src(int lane) { return (lane * 7 + 3) % 32; }

__global__ void shfl_kernel(const float* in, float* out, const ShflCase* cases, int num_cases) {
    const int lane = int(threadIdx.x);
    const float v = in[lane];
    for (int i = 0; i < num_cases; ++i) {
        const ShflCase sc = cases[i];
        float r = 0.f;
        if (sc.mode == kXor) r = fa::shfl_xor(v, sc.operand, sc.width);
        if (sc.mode == kDown) r = fa::shfl_down(v, unsigned(sc.operand), sc.width);
        if (sc.mode == kUp) r = fa::shfl_up(v, unsigned(sc.operand), sc.width);
        if (sc.mode == kIdx) r = fa::shfl_idx(v, idx_src(lane), sc.width);
        out[i * 32 + lane] = r;
    }
}

// 64 threads copy 2 groups of 64 x 16 bytes; lane-dependent zero-fill in group 1.
// out0: group 0 read after wait<1> (must have landed), out: both groups after wait<0>.
// emulate-only: early[] is group 1 read before any wait (the emulator must show 0xFF bytes).
__global__ void cp_async_kernel(const uint4* src, uint4* out0, uint4* out, uint4* early) {
    __shared__ __align__(16) uint4 s[128];
    const int t = int(threadIdx.x);
    fa::cp_async_16(&s[t], &src[t]);
    fa::cp_async_commit();
    fa::cp_async_16_zfill(&s[64 + t], &src[64 + t], t % 3 != 0);
    fa::cp_async_commit();
#ifdef FASTATTN_EMULATE
    early[t] = s[64 + t];
#else
    (void)early;
#endif
    fa::cp_async_wait<1>();
    out0[t] = s[t];
    fa::cp_async_wait<0>();
    __syncthreads();
    out[t] = s[(t + 17) % 64];  // read another thread's copy: needs the barrier
    out[64 + t] = s[64 + t];
}

// float -> packed 16-bit pairs, rounding to nearest even (cvt.rn): out[i] = pack2(in[2i], in[2i+1]).
template <class T>
__global__ void pack_kernel(const float* in, uint32_t* out, int n) {
    for (int i = int(threadIdx.x); i < n; i += 32) out[i] = fa::pack2<T>(in[2 * i], in[2 * i + 1]);
}

// ------------------------------------------------------------------------------------------------
// Host references
// ------------------------------------------------------------------------------------------------
static uint16_t host_f32_to_16(float f, bool bf16) {
    // Independent of the emulator's bit tricks: pick the nearer of the two neighbouring 16-bit
    // values by exact double arithmetic, ties to the even one.
    if (std::isnan(f)) return bf16 ? 0x7fc0 : 0x7e00;
    auto to_double = [bf16](uint16_t h) -> double {
        if (bf16) {
            uint32_t u = uint32_t(h) << 16;
            float x;
            memcpy(&x, &u, 4);
            return x;
        }
        const int e = (h >> 10) & 31, m = h & 1023;
        const double s = (h & 0x8000) ? -1.0 : 1.0;
        if (e == 0) return s * m * std::ldexp(1.0, -24);
        if (e == 31) return s * INFINITY;
        return s * (1024 + m) * std::ldexp(1.0, e - 25);
    };
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double a = std::fabs(double(f));
    const uint16_t inf = bf16 ? 0x7f80 : 0x7c00;
    // the largest magnitude code with value <= a (binary search over the monotone positive codes)
    uint16_t lo = 0, hi = inf;
    while (lo < hi) {
        const uint16_t mid = uint16_t((lo + hi + 1) / 2);
        if (to_double(mid) <= a) lo = mid;
        else hi = uint16_t(mid - 1);
    }
    if (lo == inf) return sign | inf;
    // Past the largest finite value, the next value is the power of two that inf stands for:
    // IEEE rounds to inf from max + half an ulp on.
    const double below = to_double(lo);
    const double above = uint16_t(lo + 1) == inf ? std::ldexp(1.0, bf16 ? 128 : 16) : to_double(uint16_t(lo + 1));
    uint16_t pick;
    if (a - below < above - a) pick = lo;
    else if (a - below > above - a) pick = uint16_t(lo + 1);
    else pick = (lo % 2 == 0) ? lo : uint16_t(lo + 1);
    return sign | pick;
}
static float host_16_to_f32(uint16_t h, bool bf16) {
    if (bf16) {
        uint32_t u = uint32_t(h) << 16;
        float x;
        memcpy(&x, &u, 4);
        return x;
    }
    const int e = (h >> 10) & 31, m = h & 1023;
    const float s = (h & 0x8000) ? -1.f : 1.f;
    if (e == 0) return s * float(m) * std::ldexp(1.f, -24);
    if (e == 31) return m ? NAN : s * INFINITY;
    return s * float(1024 + m) * std::ldexp(1.f, e - 25);
}

static std::mt19937_64 g_rng(20261125);
static float uniform(float lo, float hi) {
    return std::uniform_real_distribution<float>(lo, hi)(g_rng);
}

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------
template <class T>
static void test_mma(bool bf16, int trials) {
    const char* name = bf16 ? "mma.m16n8k16 bf16" : "mma.m16n8k16 f16";
    double worst = 0;
    bool ok = true;
    for (int trial = 0; trial < trials && ok; ++trial) {
        std::vector<uint16_t> a(256), b(128);
        std::vector<float> c(128);
        for (auto& x : a) x = host_f32_to_16(uniform(-2, 2), bf16);
        for (auto& x : b) x = host_f32_to_16(uniform(-2, 2), bf16);
        for (auto& x : c) x = uniform(-4, 4);
        DevBuf<uint16_t> da(256), db(128);
        DevBuf<float> dc(128), dd(128);
        da.upload(a), db.upload(b), dc.upload(c), dd.poison();
        FA_LAUNCH_KERNEL(mma_kernel<T>, dim3(1), dim3(32), 0, nullptr, da.ptr, db.ptr, dc.ptr, dd.ptr);
        sync_and_check_launch(name);
        const std::vector<float> d = dd.download();
        for (int m = 0; m < 16; ++m)
            for (int n = 0; n < 8; ++n) {
                double ref = c[m * 8 + n], mag = std::fabs(ref);
                for (int k = 0; k < 16; ++k) {
                    const double p = double(host_16_to_f32(a[m * 16 + k], bf16)) *
                                     host_16_to_f32(b[k * 8 + n], bf16);
                    ref += p, mag += std::fabs(p);
                }
                const double err = std::fabs(d[m * 8 + n] - ref) / (mag + 1e-30);
                worst = std::max(worst, std::isnan(d[m * 8 + n]) ? 1e30 : err);
                // Tensor cores may align/truncate intermediate sums: allow ~100 fp32 ulps of the terms'
                // magnitude (a layout error is O(1)). The emulator itself stays near 1e-7.
                if (!(err <= 1e-5)) ok = false;
            }
    }
    char buf[96];
    snprintf(buf, sizeof buf, "%d random trials, worst error %.2e of sum|terms|", trials, worst);
    check(ok, name, buf);
}

template <int Num, bool Trans>
static void test_ldmatrix() {
    std::string name = "ldmatrix.x" + std::to_string(Num) + (Trans ? ".trans" : "");
    std::vector<uint16_t> src(40 * 8);
    for (auto& x : src) x = uint16_t(g_rng());
    DevBuf<uint16_t> ds(src.size());
    DevBuf<uint32_t> dout(32 * Num);
    ds.upload(src), dout.poison();
    FA_LAUNCH_KERNEL((ldmatrix_kernel<Num, Trans>), dim3(1), dim3(32), 0, nullptr, ds.ptr, dout.ptr);
    sync_and_check_launch(name.c_str());
    const std::vector<uint32_t> out = dout.download();
    int bad = 0;
    for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < Num; ++j)
            for (int h = 0; h < 2; ++h) {
                const int bit = ldsm_bit_offset(Trans, Num, lane, h * 16 + 32 * j);
                const int mat = bit / 1024, row = bit % 1024 / 128, col = bit % 128 / 16;
                const uint16_t want = src[size_t((mat * 8 + row) * 8 + col)];
                const uint16_t got = uint16_t(out[size_t(lane * Num + j)] >> (16 * h));
                bad += want != got;
            }
    check(bad == 0, name, std::to_string(bad) + " of " + std::to_string(64 * Num) + " elements wrong");
}

static void test_shfl() {
    std::vector<float> in(32);
    for (auto& x : in) x = uniform(-100, 100);
    DevBuf<float> din(32), dout(32 * kNumShfl);
    DevBuf<ShflCase> dcases(kNumShfl);
    din.upload(in), dout.poison();
    dcases.upload(std::vector<ShflCase>(kShflCases, kShflCases + kNumShfl));
    FA_LAUNCH_KERNEL(shfl_kernel, dim3(1), dim3(32), 0, nullptr, din.ptr, dout.ptr, dcases.ptr, kNumShfl);
    sync_and_check_launch("shfl");
    const std::vector<float> out = dout.download();
    // CUDA Programming Guide, "Warp Shuffle Functions": the warp splits into segments of `width`
    // lanes; idx reads lane (src % width) of the caller's segment; up/down read lane -/+ delta when it
    // stays inside the segment, else return the caller's own value; xor reads lane ^ mask.
    for (int i = 0; i < kNumShfl; ++i) {
        const ShflCase sc = kShflCases[i];
        int bad = 0;
        for (int lane = 0; lane < 32; ++lane) {
            const int seg = lane / sc.width * sc.width;
            int src = lane;
            if (sc.mode == kXor) src = lane ^ sc.operand;
            if (sc.mode == kIdx) src = seg + idx_src(lane) % sc.width;
            if (sc.mode == kDown) src = (lane + sc.operand < seg + sc.width) ? lane + sc.operand : lane;
            if (sc.mode == kUp) src = (lane - sc.operand >= seg) ? lane - sc.operand : lane;
            bad += out[size_t(i * 32 + lane)] != in[size_t(src)];
        }
        const char* modes[] = {"up", "down", "xor", "idx"};
        check(bad == 0,
              std::string("shfl.") + modes[sc.mode] + " operand " + std::to_string(sc.operand) +
                  " width " + std::to_string(sc.width),
              std::to_string(bad) + " lanes wrong");
    }
}

static void test_cp_async() {
    std::vector<uint4> src(128);
    for (auto& x : src) x = uint4{unsigned(g_rng()), unsigned(g_rng()), unsigned(g_rng()), unsigned(g_rng())};
    DevBuf<uint4> ds(128), out0(64), out(128), early(64);
    ds.upload(src), out0.poison(), out.poison(), early.poison();
    FA_LAUNCH_KERNEL(cp_async_kernel, dim3(1), dim3(64), 0, nullptr, ds.ptr, out0.ptr, out.ptr, early.ptr);
    sync_and_check_launch("cp.async");
    auto eq = [](const uint4& a, const uint4& b) { return !memcmp(&a, &b, sizeof a); };
    const uint4 zero = {0, 0, 0, 0};
    const std::vector<uint4> o0 = out0.download(), o = out.download();
    int bad0 = 0, bad = 0;
    for (int t = 0; t < 64; ++t) {
        bad0 += !eq(o0[size_t(t)], src[size_t(t)]);
        bad += !eq(o[size_t(t)], src[size_t((t + 17) % 64)]);
        bad += !eq(o[size_t(64 + t)], t % 3 != 0 ? src[size_t(64 + t)] : zero);
    }
    check(bad0 == 0, "cp.async wait_group 1 completes the older group", std::to_string(bad0) + " wrong");
    check(bad == 0, "cp.async 16B + zero-fill after wait_group 0", std::to_string(bad) + " wrong");
#ifdef FASTATTN_EMULATE
    const std::vector<uint4> e = early.download();
    const uint4 ones = {~0u, ~0u, ~0u, ~0u};
    int not_poisoned = 0;
    for (const uint4& x : e) not_poisoned += !eq(x, ones);
    check(not_poisoned == 0, "emulator: cp.async destination reads 0xFF (NaN) before its wait",
          std::to_string(not_poisoned) + " not poisoned");
#endif
}

template <class T>
static void test_pack(bool bf16) {
    // random magnitudes over the whole range, plus ties, subnormals and overflow
    std::vector<float> in;
    for (int i = 0; i < 4000; ++i) in.push_back(std::ldexp(uniform(-1, 1), int(g_rng() % 60) - 30));
    const float specials[] = {0.f, -0.f, 1.f, 65504.f, 65519.f, 65520.f, 1e30f, -1e30f, INFINITY,
                              -INFINITY, 5.9604644775390625e-08f, 2.98023223876953125e-08f,
                              2.98023223876953126e-08f, 6.1035156e-05f, 1.00048828125f,
                              1.00146484375f, 1.0078125f, 1.01171875f, 3.0e-39f, 1.17549435e-38f};
    for (float s : specials) in.push_back(s);
    if (in.size() % 2) in.push_back(0.5f);
    const int n = int(in.size() / 2);
    DevBuf<float> din(in.size());
    DevBuf<uint32_t> dout{size_t(n)};
    din.upload(in), dout.poison();
    FA_LAUNCH_KERNEL(pack_kernel<T>, dim3(1), dim3(32), 0, nullptr, din.ptr, dout.ptr, n);
    sync_and_check_launch("pack2");
    const std::vector<uint32_t> out = dout.download();
    int bad = 0;
    for (int i = 0; i < n; ++i) {
        const uint32_t want = uint32_t(host_f32_to_16(in[size_t(2 * i)], bf16)) |
                              (uint32_t(host_f32_to_16(in[size_t(2 * i + 1)], bf16)) << 16);
        if (out[size_t(i)] != want && bad++ < 3)
            printf("  pack2 %g %g: got %08x want %08x\n", in[size_t(2 * i)], in[size_t(2 * i + 1)],
                   out[size_t(i)], want);
    }
    check(bad == 0, bf16 ? "pack2 bf16 (cvt.rn)" : "pack2 f16 (cvt.rn)",
          std::to_string(bad) + " of " + std::to_string(n) + " pairs wrong");
}

// The GEMM: returns the worst error relative to sum |a||b| (or +inf when any output is NaN).
typedef const char* (*GemmLaunch)(const fastattn::TestGemmParams&, void*);
static double run_gemm(GemmLaunch launch, bool bf16, int m, int n, int k, std::string* error) {
    std::vector<uint16_t> a(size_t(m) * k), b(size_t(k) * n);
    for (auto& x : a) x = host_f32_to_16(uniform(-1, 1), bf16);
    for (auto& x : b) x = host_f32_to_16(uniform(-1, 1), bf16);
    DevBuf<uint16_t> da(a.size()), db(b.size());
    DevBuf<float> dc(size_t(m) * n);
    da.upload(a), db.upload(b), dc.poison();
    fastattn::TestGemmParams p{da.ptr, db.ptr, dc.ptr, m, n, k, k, n, n,
                               bf16 ? fastattn::DType::bf16 : fastattn::DType::f16};
    try {
        const char* err = launch(p, nullptr);
        if (err) {
            *error = err;
            return INFINITY;
        }
    } catch (const std::exception& e) {
        *error = e.what();
        return INFINITY;
    }
    sync_and_check_launch("gemm");
    const std::vector<float> c = dc.download();
    std::vector<float> af(a.size()), bfv(b.size());
    for (size_t i = 0; i < a.size(); ++i) af[i] = host_16_to_f32(a[i], bf16);
    for (size_t i = 0; i < b.size(); ++i) bfv[i] = host_16_to_f32(b[i], bf16);
    double worst = 0;
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
            double ref = 0, mag = 0;
            for (int q = 0; q < k; ++q) {
                const double t = double(af[size_t(i) * k + q]) * bfv[size_t(q) * n + j];
                ref += t, mag += std::fabs(t);
            }
            const float got = c[size_t(i) * n + j];
            if (std::isnan(got)) return INFINITY;
            worst = std::max(worst, std::fabs(got - ref) / (mag + 1e-30));
        }
    return worst;
}

static void test_gemm(const char* order_name) {
    for (int bf16 = 0; bf16 < 2; ++bf16) {
        std::string error;
        // 2x2 blocks and 3 k-tiles: both stages, both wait_group depths, inter-warp sharing.
        const double err = run_gemm(fastattn::test_gemm::launch, bf16, 128, 128, 96, &error);
        char buf[160];
        snprintf(buf, sizeof buf, "worst error %.2e of sum|a||b| %s", err, error.c_str());
        check(err < 1e-5, std::string("gemm ") + (bf16 ? "bf16" : "f16") + " (" + order_name + " order)", buf);
    }
}

int main(int argc, char** argv) {
    (void)argc, (void)argv;
    test_mma<fa::half_t>(false, 200);
    test_mma<fa::bf16_t>(true, 200);
    test_ldmatrix<1, false>();
    test_ldmatrix<2, false>();
    test_ldmatrix<4, false>();
    test_ldmatrix<1, true>();
    test_ldmatrix<2, true>();
    test_ldmatrix<4, true>();
    test_shfl();
    test_cp_async();
    test_pack<fa::half_t>(false);
    test_pack<fa::bf16_t>(true);
#ifdef FASTATTN_EMULATE
    struct OrderCase {
        const char* name;
        fa_emu::Order order;
        uint64_t seed;
    };
    const OrderCase orders[] = {{"forward", fa_emu::Order::forward, 0},
                                {"reversed", fa_emu::Order::reversed, 0},
                                {"random seed 1", fa_emu::Order::random, 1},
                                {"random seed 2", fa_emu::Order::random, 2}};
    for (const OrderCase& oc : orders) {
        fa_emu::set_order(oc.order, oc.seed);
        test_gemm(oc.name);
    }
    // The broken variants must fail in every order: the emulator catches the missing barrier /
    // wait whichever thread happens to run first.
    struct Broken {
        const char* name;
        GemmLaunch launch;
    };
    const Broken broken[] = {{"missing __syncthreads before ldmatrix", fastattn::test_gemm_nosync::launch},
                             {"missing cp_async_wait", fastattn::test_gemm_nowait::launch},
                             {"missing __syncthreads at end of k-loop", fastattn::test_gemm_nosync_end::launch}};
    for (const Broken& br : broken)
        for (const OrderCase& oc : orders) {
            fa_emu::set_order(oc.order, oc.seed);
            std::string error;
            const double err = run_gemm(br.launch, false, 128, 128, 96, &error);
            char buf[96];
            snprintf(buf, sizeof buf, "error %.2e (must be large or NaN)", err);
            check(!(err < 1e-5), std::string("broken gemm detected: ") + br.name + " (" + oc.name + " order)", buf);
        }
    fa_emu::clear_order();
    // An emulated fault is reported, not silently run: misaligned ldmatrix address.
    {
        bool thrown = false;
        std::string what;
        try {
            fa_emu::launch(dim3(1), dim3(32), 64, [] {
                uint32_t r[1];
                char* smem = static_cast<char*>(fa_emu::dynamic_smem());
                fa::ldmatrix_x1(r, smem + 2);
            });
        } catch (const fa_emu::Fault& e) {
            thrown = true;
            what = e.what();
        }
        check(thrown && what.find("not 16-byte aligned") != std::string::npos,
              "emulator: misaligned ldmatrix address is a fault", what);
    }
    {
        bool thrown = false;
        std::string what;
        try {
            fa_emu::launch(dim3(1), dim3(64), 0, [] {
                if (threadIdx.x < 32) __syncthreads();
            });
        } catch (const fa_emu::Fault& e) {
            thrown = true;
            what = e.what();
        }
        // Threads 32..63 exit, so the barrier releases with the live threads (as on sm_70+).
        check(!thrown, "emulator: barrier counts only live threads", what);
        thrown = false;
        try {
            fa_emu::launch(dim3(1), dim3(32), 0, [] {
                if (threadIdx.x < 16) (void)fa::shfl_xor(1.0f, 1);
            });
        } catch (const fa_emu::Fault& e) {
            thrown = true;
            what = e.what();
        }
        check(thrown && what.find("deadlock") != std::string::npos,
              "emulator: a shuffle not reached by all lanes is a deadlock", what);
    }
#else
    test_gemm("hardware");
#endif
    printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "OK", g_failures);
    return g_failures ? 1 : 0;
}

// Split-KV decoding over a contiguous or paged key/value cache (fastattn.kvcache_attention on the CUDA backend):
// kernel decode_kernel, launcher decode::launch, op fastattn::cuda_kvcache_fwd (csrc/decode_ops.cpp), which merges
// the splits' partial results with merge_kernel (decode::merge). The append into the cache happens before, in Python
// (backends/cuda.py).
//
// Grid (B * Hkv, splits, row tiles), 128 threads. A block serves one (sequence b, kv head h, split s) and kRows = 16
// of the R = group * Lq query rows of h's GQA group (query head h * group + g, query i: row g * Lq + i), so each
// K/V row it loads serves every query head of the group: the cache is read once per call while R <= 16 (a group
// of 8 decoding 2 tokens), once per 16 rows beyond. Warp w owns rows 4w..4w+3 from the scores to the output.
//
// Per tile of kBlockN = 32 keys: threads 0..31 look each key's (page, slot) up in the block table once
// (page = block_table[b, j / page_size], slot = j % page_size; a contiguous cache is page b with page_size = Lmax)
// into shared offsets; the block copies the K and V rows to shared memory (coalesced along the head dim, any
// strides); lane n of every warp forms key n's scores against its warp's 4 rows (fp32 FMAs over the head dim,
// exp2 domain, the rules of attn_rules.h: softcap, ALiBi, the band from each row's bottom-right position
// total_b - Lq + i), warp shuffles give the rows' running max and sum (online softmax in fp32), and each lane
// accumulates head-dim columns lane + 32c of its rows' P·V from shared memory. No tensor cores: at R <= 16 rows
// an mma tile would be mostly padding, and the kernel is bound by reading the cache, not by arithmetic.
//
// Cost: 4 * B * Hq * Lq * total * D FLOPs (D = Dv) against minimum bytes of every attended key's K and V row once,
// 2 * B * Hkv * total * D * sizeof(T) (plus q and the fp32 partials): group * Lq FLOPs per byte, 4 at a group of
// 4 decoding one token, far below any GPU's ratio, so it is memory-bound and should approach HBM bandwidth for long
// caches. The splits (chosen in Python so that B * Hkv * splits fills the SMs) write (S, B, Hq, Lq, Dv) fp32
// partials that the op merges exactly through their lse.
#include "decode_params.h"
#include "primitives.cuh"

namespace fastattn {
namespace decode {
namespace {

constexpr int kThreads = kWarps * 32;
constexpr float kLn2 = 0.6931471805599453f;

// Shared memory: key and value row offsets (int64, kBlockN each), P (kRows x kBlockN fp32), q (kRows x D),
// K (kBlockN x (D + 2): the padding puts consecutive keys in different banks for the lane-per-key reads), V.
size_t smem_bytes(int head_dim, int head_dim_v) {
    return sizeof(int64_t) * 2 * kBlockN + sizeof(float) * kRows * kBlockN +
           2 * (size_t(kRows) * head_dim + size_t(kBlockN) * (head_dim + 2) + size_t(kBlockN) * head_dim_v);
}

FA_DEVICE float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, fa::shfl_xor(x, o));
    return x;
}

FA_DEVICE float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += fa::shfl_xor(x, o);
    return x;
}

// kChunks: head_dim_v in 32-column chunks (1, 2, 4 or 8), so that the accumulator stays in registers.
template <class T, int kChunks>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
    FA_DYNAMIC_SMEM(unsigned char, smem);
    int64_t* k_off = reinterpret_cast<int64_t*>(smem);
    int64_t* v_off = k_off + kBlockN;
    float* p_s = reinterpret_cast<float*>(v_off + kBlockN);
    const int D = p.head_dim, Dv = p.head_dim_v, k_row = D + 2;
    T* q_s = reinterpret_cast<T*>(p_s + kRows * kBlockN);
    T* k_s = q_s + kRows * D;
    T* v_s = k_s + kBlockN * k_row;
    const T* Q = static_cast<const T*>(p.q);
    const T* K = static_cast<const T*>(p.k);
    const T* V = static_cast<const T*>(p.v);

    const int b = int(blockIdx.x) / p.heads_kv, h = int(blockIdx.x) % p.heads_kv;
    const int split = int(blockIdx.y), row0 = int(blockIdx.z) * kRows;
    const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
    const int group = p.heads_q / p.heads_kv, Lq = p.seqlen_q, rows = group * Lq;
    const int64_t total = int64_t(p.seqlens[b]) + p.new_len;

    // The group's query rows; a row past R repeats the last one (finite values; its scores are masked).
    for (int idx = tid; idx < kRows * D; idx += kThreads) {
        const int r = idx / D, d = idx % D, row = min(row0 + r, rows - 1);
        const int hq = h * group + row / Lq, i = row % Lq;
        q_s[idx] = Q[b * p.q_s[0] + hq * p.q_s[1] + i * p.q_s[2] + d * p.q_s[3]];
    }

    // This thread's rows (warp's 4): position, attended keys [lo, hi], ALiBi slope (exp2 unit).
    int64_t pos[kRowsPerWarp], lo[kRowsPerWarp], hi[kRowsPerWarp];
    float slope[kRowsPerWarp];
    bool row_ok[kRowsPerWarp];
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
        const int row = row0 + warp * kRowsPerWarp + k;
        row_ok[k] = row < rows;
        const int rr = min(row, rows - 1);
        pos[k] = total - Lq + rr % Lq;
        rules::row_bounds(p.variant, pos[k], total, lo[k], hi[k]);
        slope[k] = rules::alibi_slope(p.variant, b, h * group + rr / Lq, rules::kLog2e);
    }

    // The keys any query attends, [first query's lo, last query's hi] (the bounds never decrease with the query),
    // cut into splits of whole tiles; this block walks the split-th.
    int64_t key_lo, key_hi, unused;
    rules::row_bounds(p.variant, total - Lq, total, key_lo, unused);
    rules::row_bounds(p.variant, total - 1, total, unused, key_hi);
    const int64_t span = key_hi + 1 > key_lo ? key_hi + 1 - key_lo : 0;
    const int64_t part = ((span + p.splits - 1) / p.splits + kBlockN - 1) / kBlockN * kBlockN;
    const int64_t k_start = key_lo + split * part;
    const int64_t k_end = rules::min64(k_start + part, key_hi + 1);

    const rules::ScoreScale ss = rules::score_scale(p.scale, p.variant, rules::kLog2e);
    float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kChunks];
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
        m[k] = -INFINITY;
        l[k] = 0.f;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) acc[k][c] = 0.f;
    }

    for (int64_t start = k_start; start < k_end; start += kBlockN) {
        if (tid < kBlockN) {
            // A key past the split reads the split's first (finite values; its probability is 0).
            const int j = int(start + tid < k_end ? start + tid : start);
            const int64_t page = p.block_table != nullptr ? p.block_table[b * p.bt_stride + j / p.page_size] : b;
            const int slot = j % p.page_size;
            k_off[tid] = page * p.k_s[0] + h * p.k_s[1] + slot * p.k_s[2];
            v_off[tid] = page * p.v_s[0] + h * p.v_s[1] + slot * p.v_s[2];
        }
        __syncthreads();
        for (int idx = tid; idx < kBlockN * D; idx += kThreads) {
            const int n = idx / D, d = idx % D;
            k_s[n * k_row + d] = K[k_off[n] + d * p.k_s[3]];
        }
        for (int idx = tid; idx < kBlockN * Dv; idx += kThreads) {
            const int n = idx / Dv, d = idx % Dv;
            v_s[n * Dv + d] = V[v_off[n] + d * p.v_s[3]];
        }
        __syncthreads();

        // Lane n: key start + n against the warp's rows.
        float dot[kRowsPerWarp] = {};
        const T* q_w = q_s + warp * kRowsPerWarp * D;
        for (int d = 0; d < D; ++d) {
            const float kf = fa::to_float(k_s[lane * k_row + d]);
#pragma unroll
            for (int k = 0; k < kRowsPerWarp; ++k) dot[k] += fa::to_float(q_w[k * D + d]) * kf;
        }
        const int64_t j = start + lane;
        float* p_w = p_s + warp * kRowsPerWarp * kBlockN;
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
            float t;
            float s = rules::scaled_score(dot[k], ss, t);
            if (p.variant.alibi != nullptr) s += rules::alibi_bias(slope[k], pos[k], j);
            const bool ok = row_ok[k] && j < k_end && j >= lo[k] && j <= hi[k];
            s = ok ? s : -INFINITY;
            const float m_new = fmaxf(m[k], warp_max(s));
            const float m_safe = m_new == -INFINITY ? 0.f : m_new;
            const float pr = exp2f(s - m_safe);
            const float alpha = exp2f(m[k] - m_safe);
            l[k] = l[k] * alpha + warp_sum(pr);
            m[k] = m_new;
            p_w[k * kBlockN + lane] = pr;
#pragma unroll
            for (int c = 0; c < kChunks; ++c) acc[k][c] *= alpha;
        }
        __syncwarp();
        for (int n = 0; n < kBlockN; ++n) {
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
                const int dv = lane + 32 * c;
                if (dv < Dv) {
                    const float vf = fa::to_float(v_s[n * Dv + dv]);
#pragma unroll
                    for (int k = 0; k < kRowsPerWarp; ++k) acc[k][c] += p_w[k * kBlockN + n] * vf;
                }
            }
        }
        __syncthreads();  // the next tile overwrites the offsets, K, V and P
    }

    // Normalised partials and natural-log lse; a row with no key in this split: zeros and -inf.
    const int64_t batch = int64_t(gridDim.x) / p.heads_kv;
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
        if (!row_ok[k]) continue;
        const int row = row0 + warp * kRowsPerWarp + k;
        const int64_t index = ((int64_t(split) * batch + b) * p.heads_q + h * group + row / Lq) * Lq + row % Lq;
        const bool has = l[k] > 0.f;
        const float inv = has ? 1.f / l[k] : 0.f;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
            const int dv = lane + 32 * c;
            if (dv < Dv) p.part_out[index * Dv + dv] = acc[k][c] * inv;
        }
        if (lane == 0) p.part_lse[index] = has ? (m[k] + log2f(l[k])) * kLn2 : -INFINITY;
    }
}

// Row r = blockIdx.x of (B, Hq, Lq): out[r] = sum_s exp(lse_s - lse) part_out[s, r] in T and lse[r] =
// log(sum_s exp(lse_s) + exp(sink)), zeros and -inf for a row that attended nothing (a split without keys has
// lse_s = -inf: weight 0), the formula of fastattn.kvcache.merge_splits. Every thread forms the row's max and
// total from the S lse values (the same few cached words), then its columns dv = tid + kMergeThreads * c.
// Cost per row: 2 * S * Dv FLOPs against S * (Dv + 1) * 4 bytes read and Dv elements written, a few percent of
// the cache the decode kernel read: bound by its launch, which is why it is one kernel rather than the ten ATen
// ops it replaces (a few microseconds each on a GPU, when a B = 1 cache of 32k tokens takes about 30 us).
template <class T>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const MergeParams p) {
    const int64_t r = blockIdx.x;
    float top = -INFINITY;
    for (int s = 0; s < p.splits; ++s) top = fmaxf(top, p.part_lse[s * p.rows + r]);
    const float sink = p.sinks != nullptr ? p.sinks[(r / p.seqlen_q) % p.heads_q] : -INFINITY;
    top = fmaxf(top, sink);
    const float safe = top == -INFINITY ? 0.f : top;
    float total = p.sinks != nullptr ? expf(sink - safe) : 0.f;
    for (int s = 0; s < p.splits; ++s) total += expf(p.part_lse[s * p.rows + r] - safe);
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int dv = threadIdx.x; dv < p.head_dim_v; dv += kMergeThreads) {
        float acc = 0.f;
        for (int s = 0; s < p.splits; ++s) {
            const int64_t part = s * p.rows + r;
            acc += expf(p.part_lse[part] - safe) * p.part_out[part * p.head_dim_v + dv];
        }
        static_cast<uint16_t*>(p.out)[r * p.head_dim_v + dv] = uint16_t(fa::pack2<T>(acc * inv, 0.f));
    }
    if (threadIdx.x == 0) p.lse[r] = total > 0.f ? safe + logf(total) : -INFINITY;
}

template <class T, int kChunks>
const char* launch_typed(const DecodeParams& p, void* stream) {
    const dim3 grid(unsigned(p.batch * p.heads_kv), unsigned(p.splits),
                    unsigned((p.heads_q / p.heads_kv * p.seqlen_q + kRows - 1) / kRows));
    auto* kernel = &decode_kernel<T, kChunks>;
    FA_LAUNCH_KERNEL(kernel, grid, dim3(kThreads), smem_bytes(p.head_dim, p.head_dim_v), stream, p);
    return fa_launch_status();
}

template <class T>
const char* launch_dtype(const DecodeParams& p, void* stream) {
    if (p.head_dim_v <= 32) return launch_typed<T, 1>(p, stream);
    if (p.head_dim_v <= 64) return launch_typed<T, 2>(p, stream);
    if (p.head_dim_v <= 128) return launch_typed<T, 4>(p, stream);
    return launch_typed<T, 8>(p, stream);
}

}  // namespace

const char* merge(const MergeParams& p, void* stream) {
    if (p.rows == 0) return nullptr;
    if (p.rows > 0x7fffffff) return "decode: more than 2^31 output rows to merge";
    auto* kernel = p.dtype == DType::f16 ? &merge_kernel<fa::half_t> : &merge_kernel<fa::bf16_t>;
    FA_LAUNCH_KERNEL(kernel, dim3(unsigned(p.rows)), dim3(kMergeThreads), 0, stream, p);
    return fa_launch_status();
}

const char* launch(const DecodeParams& p, void* stream) {
    if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) return nullptr;
    if (p.head_dim > kMaxHeadDim || p.head_dim_v > kMaxHeadDim) return "decode: head dims above 256";
    return p.dtype == DType::f16 ? launch_dtype<fa::half_t>(p, stream) : launch_dtype<fa::bf16_t>(p, stream);
}

}  // namespace decode
}  // namespace fastattn

// Plain parameter struct of the CPU decode kernel (fastattn.kvcache_attention), shared by the dispatcher
// (decode_cpu.cpp) and the per-ISA kernel files (decode_cpu_{avx512,avx2,default}.cpp). No torch headers.
#pragma once

#include <cstdint>

#include "../attn_rules.h"

namespace fastattn_cpu {

enum DecodeDtype : int { kDecodeF32 = 0, kDecodeBF16 = 1, kDecodeF16 = 2 };

struct DecodeParams {
  // query (B, Hq, Lq, D); caches addressed as (page, head, slot, dim): a paged cache's pages, or a contiguous
  // (B, Hkv, Lmax, D) cache as B pages of page_size = Lmax (block_table null: page b).
  int64_t B, Hq, Hkv, Lq, D, Dv;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_s[4], k_s[4], v_s[4];  // element strides
  int64_t page_size;
  const int32_t* block_table;  // (B, pages_per_seq) with row stride bt_stride, or null
  int64_t bt_stride;
  const int32_t* seqlens;  // (B,) keys cached before the call; sequence b attends seqlens[b] + new_len keys
  int64_t new_len;
  int dtype;  // DecodeDtype of q, k, v and out
  float scale;
  // The band with causal folded in (left, right; -1 unbounded), softcap, ALiBi slopes, sinks; q_offset and chunk
  // are unused (each sequence is aligned bottom-right: q_offset = total_b - Lq).
  fastattn::rules::Variant variant;
  int64_t splits;  // parts of each sequence's keys, one task each
  // The CPU has AVX512_BF16: the AVX512 kernel scores and accumulates bf16 caches with VDPBF16PS.
  bool bf16_dot;
  // Scratch: per task (b, kv head, split) the normalised partial output (R, Dv) and its lse (R) over R = group*Lq
  // rows; layout (B, Hkv, splits, R, Dv) and (B, Hkv, splits, R), fp32.
  float* part_out;
  float* part_lse;
  // Outputs: out (B, Hq, Lq, Dv) contiguous in the input dtype, lse (B, Hq, Lq) fp32.
  void* out;
  float* lse;
};

struct DecodeKernels {
  const char* isa;
  void (*decode)(const DecodeParams&);
};

const DecodeKernels* decode_kernels_avx512();
const DecodeKernels* decode_kernels_avx2();
const DecodeKernels* decode_kernels_default();

}  // namespace fastattn_cpu

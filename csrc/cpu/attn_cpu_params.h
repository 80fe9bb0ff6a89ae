// Plain parameter struct shared by the dispatcher (attn_cpu.cpp) and the per-ISA kernel files.
// No torch headers here: the kernel files are compiled for several instruction sets, and only
// plain data crosses between them.
#pragma once

#include <cstdint>

#include "../attn_rules.h"

namespace fastattn_cpu {

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskFloat = 2 };
enum TileState : int8_t { kEmpty = 0, kPartial = 1, kFull = 2 };

struct AttnParams {
  // Sizes: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv).
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  // Inputs and their element strides in (batch, head, seq, dim) order.
  const void* q;
  const void* k;
  const void* v;
  int64_t q_s[4], k_s[4], v_s[4];
  bool bf16;  // inputs are bfloat16
  bool f16;   // inputs are float16 (neither: float32)

  // Mask tensor (B, Hq, Lq, Lk) read through its strides (0 on broadcast dims), or none.
  const void* mask;
  int mask_kind;
  int64_t m_s[4];
  // Optional tile summary for (BQ, BK): state int8 (Bm, Hm, nQ, nK); strides are 0 on broadcast dims.
  const int8_t* state;
  int64_t st_s[4];

  int64_t BQ, BK;
  float scale;
  // The variant (band, chunk, softcap, ALiBi, sinks): csrc/attn_rules.h's rules apply it.
  fastattn::rules::Variant variant;
  // Dropout (attn_cpu_dropout.h): the philox tensor's [seed, offset] and the drop rate; p = 0 means none.
  int64_t philox_seed, philox_offset;
  float dropout_p;
  // The lengths of the contract's element index (bh·drop_Lq + i)·drop_Lk + j: Lq and Lk for a dense batch; for a
  // packed sequence, called alone, the call's maxima (with philox_offset advanced to its batch row).
  int64_t drop_Lq, drop_Lk;
  bool bf16_brgemm;  // bf16 inputs: bf16 GEMMs (VNNI-packed B) through brgemm (else fp32 tiles, converted)

  // Forward outputs: out (B, Hq, Lq, Dv) contiguous in the input dtype, lse (B, Hq, Lq) fp32.
  void* out;
  float* lse;
  // Scratch for packed K/V tiles (forward): Kernels::fwd_pack_elems elements, bf16 where bf16_brgemm, else fp32.
  void* kv_pack;

  // Backward inputs: grad_out and out (strided), lse (contiguous fp32).
  const void* dout;
  int64_t do_s[4];
  const void* o;
  int64_t o_s[4];
  const float* lse_in;
  // Backward outputs (contiguous): dq, dk, dv in the input dtype; dmask fp32 (B, Hq, Lq, Lk) or null.
  void* dq;
  void* dk;
  void* dv;
  float* dmask;
  // Backward scratch: delta (B, Hq, Lq) fp32 and per-chunk dq partials (n_chunks, B, Hq, Lq, D) fp32.
  float* delta;
  float* dq_part;
  int64_t n_chunks;
};

// The kernels of one instruction set.
struct Kernels {
  const char* isa;
  void (*fwd)(const AttnParams&);
  void (*bwd)(const AttnParams&);
  int64_t (*fwd_pack_elems)(const AttnParams&);
  // Whether this build has the native-bf16 (brgemm, VNNI) path and it passed its self-test here.
  bool (*bf16_brgemm_ok)();
};

// Each returns nullptr when that instruction set was not compiled in (non-GCC or non-x86).
const Kernels* kernels_avx512();
const Kernels* kernels_avx2();
const Kernels* kernels_default();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_even(int64_t a) { return (a + 1) / 2 * 2; }

}  // namespace fastattn_cpu

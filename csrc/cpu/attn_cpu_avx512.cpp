// The attention kernels compiled for AVX512 (chosen at run time by attn_cpu.cpp from
// at::get_cpu_capability(), as torch chooses its own kernels; never -march=native).
#include "cpu_target_avx512.h"  // first: its target pragma must precede every include
#if defined(FASTATTN_CPU_TARGET)
#include "attn_cpu_kernel.h"

namespace fastattn_cpu {
const Kernels* kernels_avx512() {
  static const Kernels k{"avx512", AVX512::fwd_entry, AVX512::bwd_entry, AVX512::fwd_pack_elems,
                         AVX512::bf16_brgemm_ok};
  return &k;
}
}  // namespace fastattn_cpu
#else
#include "attn_cpu_params.h"

namespace fastattn_cpu {
const Kernels* kernels_avx512() { return nullptr; }
}  // namespace fastattn_cpu
#endif

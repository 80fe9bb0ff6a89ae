// The attention kernels compiled for AVX2 (chosen at run time by attn_cpu.cpp from
// at::get_cpu_capability(), as torch chooses its own kernels; never -march=native).
#include "cpu_target_avx2.h"  // first: its target pragma must precede every include
#if defined(FASTATTN_CPU_TARGET)
#include "attn_cpu_kernel.h"

namespace fastattn_cpu {
const Kernels* kernels_avx2() {
  static const Kernels k{"avx2", AVX2::fwd_entry, AVX2::bwd_entry, AVX2::fwd_pack_elems,
                         AVX2::bf16_brgemm_ok};
  return &k;
}
}  // namespace fastattn_cpu
#else
#include "attn_cpu_params.h"

namespace fastattn_cpu {
const Kernels* kernels_avx2() { return nullptr; }
}  // namespace fastattn_cpu
#endif

// The attention kernels compiled for the baseline instruction set: the portable fallback that
// runs on any CPU torch runs on (at::vec's generic code).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "attn_cpu_kernel.h"

namespace fastattn_cpu {
const Kernels* kernels_default() {
  static const Kernels k{"default", DEFAULT::fwd_entry, DEFAULT::bwd_entry, DEFAULT::fwd_pack_elems,
                         DEFAULT::bf16_brgemm_ok};
  return &k;
}
}  // namespace fastattn_cpu

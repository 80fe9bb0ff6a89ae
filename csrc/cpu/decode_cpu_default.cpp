// The decode kernel compiled for the baseline instruction set: the portable fallback that runs on any CPU
// torch runs on (at::vec's generic code).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "decode_cpu_kernel.h"

namespace fastattn_cpu {
const DecodeKernels* decode_kernels_default() {
  static const DecodeKernels k{"default", DEFAULT::decode_entry};
  return &k;
}
}  // namespace fastattn_cpu

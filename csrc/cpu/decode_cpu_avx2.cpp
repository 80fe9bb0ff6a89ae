// The decode kernels compiled for AVX2 (chosen at run time by decode_cpu.cpp from
// at::get_cpu_capability(), as torch chooses its own kernels; never -march=native).
#include "cpu_target_avx2.h"  // first: its target pragma must precede every include
#if defined(FASTATTN_CPU_TARGET)
#include "decode_cpu_kernel.h"

namespace fastattn_cpu {
const DecodeKernels* decode_kernels_avx2() {
  static const DecodeKernels k{"avx2", AVX2::decode_entry};
  return &k;
}
}  // namespace fastattn_cpu
#else
#include "decode_cpu.h"

namespace fastattn_cpu {
const DecodeKernels* decode_kernels_avx2() { return nullptr; }
}  // namespace fastattn_cpu
#endif

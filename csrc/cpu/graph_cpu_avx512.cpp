// The graph-attention kernels compiled for AVX512 (chosen at run time by graph_cpu.cpp from
// at::get_cpu_capability(), as torch chooses its own kernels; never -march=native).
#include "cpu_target_avx512.h"  // first: its target pragma must precede every include
#if defined(FASTATTN_CPU_TARGET)
#include "graph_cpu_kernel.h"

namespace fastattn_cpu {
namespace graph {
const GraphKernels* graph_kernels_avx512() {
  static const GraphKernels k{"avx512", AVX512::fwd_entry, AVX512::bwd_entry};
  return &k;
}
}  // namespace graph
}  // namespace fastattn_cpu
#else
#include "graph_cpu_params.h"

namespace fastattn_cpu {
namespace graph {
const GraphKernels* graph_kernels_avx512() { return nullptr; }
}  // namespace graph
}  // namespace fastattn_cpu
#endif

// The graph-attention kernels compiled for AVX2 (chosen at run time by graph_cpu.cpp from
// at::get_cpu_capability(), as torch chooses its own kernels; never -march=native).
#include "cpu_target_avx2.h"  // first: its target pragma must precede every include
#if defined(FASTATTN_CPU_TARGET)
#include "graph_cpu_kernel.h"

namespace fastattn_cpu {
namespace graph {
const GraphKernels* graph_kernels_avx2() {
  static const GraphKernels k{"avx2", AVX2::fwd_entry, AVX2::bwd_entry};
  return &k;
}
}  // namespace graph
}  // namespace fastattn_cpu
#else
#include "graph_cpu_params.h"

namespace fastattn_cpu {
namespace graph {
const GraphKernels* graph_kernels_avx2() { return nullptr; }
}  // namespace graph
}  // namespace fastattn_cpu
#endif

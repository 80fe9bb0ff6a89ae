// The graph-attention kernels compiled for the baseline instruction set: the portable fallback that
// runs on any CPU torch runs on.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "graph_cpu_kernel.h"

namespace fastattn_cpu {
namespace graph {
const GraphKernels* graph_kernels_default() {
  static const GraphKernels k{"default", DEFAULT::fwd_entry, DEFAULT::bwd_entry};
  return &k;
}
}  // namespace graph
}  // namespace fastattn_cpu

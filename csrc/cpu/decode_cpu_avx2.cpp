// The decode kernels compiled for AVX2 (chosen at run time by decode_cpu.cpp from
// at::get_cpu_capability(), as torch chooses its own kernels; never -march=native).
// GCC's target pragma must precede every include, and GCC does not define the ISA macros
// for it, so they are defined here too: at::vec and sleef.h select their code from them, picking AVX2 code.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
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

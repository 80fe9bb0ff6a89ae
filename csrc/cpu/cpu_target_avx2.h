// The AVX2 build's target: included first by every *_avx2.cpp (attention, decode, graph kernels), so that the
// three families compile for one feature list, the one cpu_isa.h checks the CPU for at run time.
// GCC's target pragma must precede every include (it applies to the rest of the translation unit), and GCC
// does not define the ISA macros for it, so they are defined here too: at::vec and sleef.h select their code
// from them. FASTATTN_CPU_TARGET is defined where the pragma applies (GCC on x86-64); elsewhere a build's
// .cpp compiles its stub, which reports the build as absent.
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
#define FASTATTN_CPU_TARGET 1
#endif

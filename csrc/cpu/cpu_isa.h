// Which instruction-set build of the CPU kernels runs: one rule for the attention, decode and graph kernels.
//
//   FASTATTN_CPU_ISA=avx512|avx2|default   that build, checked: a known name, supported by this CPU and
//                                          its OS, and compiled into the library; anything else is an
//                                          error naming the variable, what it accepts and what it got.
//                                          So the lower builds are tested and timed on any machine.
//   unset or empty                         the best build the CPU supports, capped by torch's own choice
//                                          (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY),
//                                          as torch chooses its own kernels.
//
// The variable is read at every call (a getenv and a few compares next to milliseconds of work), so a
// test can switch builds within one process. FASTATTN_CPU_HIDE_FEATURES=avx512f,... (tests only) makes
// the named CPU features count as absent, so the "this CPU lacks it" path is tested on any machine. CPU support is read from CPUID and XGETBV directly (the
// feature lists of cpu_target_avx2.h / cpu_target_avx512.h's target pragmas, and the OS saving the
// registers), not from the compiler's __builtin_cpu_supports, whose feature names vary by version.
#pragma once

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define FASTATTN_X86_CPUID 1
#endif

namespace fastattn_cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumIsa = 3;

// One kernel family's table for `isa`: its AVX512, AVX2 or default build's (nullptr for a build this compiler left
// out). The attention, decode and graph selectors all map an Isa through this.
template <typename Table>
const Table* build_for(Isa isa, const Table* (*avx512)(), const Table* (*avx2)(), const Table* (*fallback)()) {
  switch (isa) {
    case Isa::kAvx512: return avx512();
    case Isa::kAvx2: return avx2();
    default: return fallback();
  }
}

inline const char* isa_name(Isa isa) {
  static const char* const names[kNumIsa] = {"default", "avx2", "avx512"};
  return names[static_cast<int>(isa)];
}

struct CpuFeature {
  const char* name;
  bool present;
};

// The features each build was compiled for, and whether this CPU (and OS) has them.
inline const std::vector<CpuFeature>& isa_features(Isa isa) {
  static const std::vector<CpuFeature> none;
#if defined(FASTATTN_X86_CPUID)
  static const auto table = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    unsigned ecx1 = 0, ebx7 = 0, ecx_ext = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) ecx1 = c;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) ebx7 = b;
    if (__get_cpuid(0x80000001u, &a, &b, &c, &d)) ecx_ext = c;
    uint64_t xcr0 = 0;
    if (ecx1 & (1u << 27)) {  // OSXSAVE: XGETBV is usable
      unsigned lo = 0, hi = 0;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
    }
    const bool os_avx = (xcr0 & 0x6) == 0x6;        // XMM and YMM state saved
    const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;   // and opmask, ZMM_Hi256, Hi16_ZMM
    auto bit = [](unsigned r, int i) { return ((r >> i) & 1u) != 0; };
    std::vector<CpuFeature> avx2 = {
        {"avx (with OS support)", bit(ecx1, 28) && os_avx},
        {"avx2", bit(ebx7, 5)},
        {"fma", bit(ecx1, 12)},
        {"f16c", bit(ecx1, 29)},
        {"bmi", bit(ebx7, 3)},
        {"bmi2", bit(ebx7, 8)},
        {"lzcnt", bit(ecx_ext, 5)},
        {"popcnt", bit(ecx1, 23)},
    };
    std::vector<CpuFeature> avx512 = avx2;
    avx512.push_back({"avx512f (with OS support)", bit(ebx7, 16) && os_avx512});
    avx512.push_back({"avx512bw", bit(ebx7, 30)});
    avx512.push_back({"avx512vl", bit(ebx7, 31)});
    avx512.push_back({"avx512dq", bit(ebx7, 17)});
    return std::vector<std::vector<CpuFeature>>{{}, avx2, avx512};
  }();
  return table[static_cast<int>(isa)];
#else
  (void)isa;
  return none;
#endif
}

// Whether FASTATTN_CPU_HIDE_FEATURES (comma-separated) names this feature (its first word).
inline bool feature_hidden(const char* name) {
  const char* env = std::getenv("FASTATTN_CPU_HIDE_FEATURES");
  if (env == nullptr || *env == '\0') return false;
  std::string key(name);
  key = key.substr(0, key.find(' '));
  const std::string list = "," + std::string(env) + ",";
  return list.find("," + key + ",") != std::string::npos;
}

inline bool feature_present(const CpuFeature& f) { return f.present && !feature_hidden(f.name); }

inline bool cpu_supports(Isa isa) {
#if !defined(FASTATTN_X86_CPUID)
  if (isa != Isa::kDefault) return false;
#endif
  for (const CpuFeature& f : isa_features(isa))
    if (!feature_present(f)) return false;
  return true;
}

// Whether the CPU has AVX512_BF16 (CPUID leaf 7 subleaf 1, EAX bit 5): not part of any build's feature list, the
// AVX512 decode kernel checks it at run time and uses VDPBF16PS for bf16 caches when present. Hidden by
// FASTATTN_CPU_HIDE_FEATURES=avx512_bf16 (tests: the fp32 path of the same build).
inline bool cpu_has_avx512_bf16() {
#if defined(FASTATTN_X86_CPUID)
  static const bool present = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u) != 0;
  }();
  return present && cpu_supports(Isa::kAvx512) && !feature_hidden("avx512_bf16");
#else
  return false;
#endif
}

// The best build this CPU supports, whatever is compiled or forced (for messages and `fastattn info`).
inline Isa cpu_best_isa() {
  for (int i = kNumIsa - 1; i > 0; --i)
    if (cpu_supports(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kDefault;
}

// The value of FASTATTN_CPU_ISA, or "" when unset.
inline std::string forced_isa_value() {
  const char* env = std::getenv("FASTATTN_CPU_ISA");
  return env == nullptr ? std::string() : std::string(env);
}

// The build to run. `compiled(isa)` says whether the library has that build's kernels.
template <typename Compiled>
Isa resolve_isa(const Compiled& compiled) {
  const std::string raw = forced_isa_value();
  if (!raw.empty()) {
    std::string v;
    for (char ch : raw) v += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    int found = -1;
    for (int i = 0; i < kNumIsa; ++i)
      if (v == isa_name(static_cast<Isa>(i))) found = i;
    TORCH_CHECK(found >= 0,
                "FASTATTN_CPU_ISA: expected one of avx512, avx2, default (or unset: the best this CPU supports), "
                "got '",
                raw, "'");
    const Isa want = static_cast<Isa>(found);
    if (!cpu_supports(want)) {
      std::string missing, supported;
      for (const CpuFeature& f : isa_features(want))
        if (!feature_present(f)) missing += (missing.empty() ? "" : ", ") + std::string(f.name);
      for (int i = kNumIsa - 1; i >= 0; --i)
        if (cpu_supports(static_cast<Isa>(i)))
          supported += (supported.empty() ? "" : ", ") + std::string(isa_name(static_cast<Isa>(i)));
      TORCH_CHECK(false, "FASTATTN_CPU_ISA=", raw, ": this CPU cannot run the ", isa_name(want), " kernels (it lacks ",
                  missing.empty() ? std::string("x86-64") : missing, "); expected one it supports: ", supported);
    }
    if (!compiled(want)) {
      std::string built;
      for (int i = kNumIsa - 1; i >= 0; --i)
        if (compiled(static_cast<Isa>(i)))
          built += (built.empty() ? "" : ", ") + std::string(isa_name(static_cast<Isa>(i)));
      TORCH_CHECK(false, "FASTATTN_CPU_ISA=", raw, ": this build of fastattn's CPU library has no ", isa_name(want),
                  " kernels (they need GCC on x86-64); expected one it has: ", built);
    }
    return want;
  }
  const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
  const int cap_i = cap == "AVX512" ? 2 : (cap == "AVX2" ? 1 : 0);
  for (int i = cap_i; i > 0; --i)
    if (cpu_supports(static_cast<Isa>(i)) && compiled(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kDefault;
}

// The builds this CPU can run and the library has, best first.
template <typename Compiled>
std::vector<std::string> runnable_isas(const Compiled& compiled) {
  std::vector<std::string> out;
  for (int i = kNumIsa - 1; i >= 0; --i)
    if (cpu_supports(static_cast<Isa>(i)) && compiled(static_cast<Isa>(i))) out.push_back(isa_name(static_cast<Isa>(i)));
  return out;
}

// One line for `fastattn info`-style reports: "avx2 (forced by FASTATTN_CPU_ISA=avx2; this CPU: avx512)".
template <typename Compiled>
std::string describe_isa(const Compiled& compiled) {
  const Isa isa = resolve_isa(compiled);
  const std::string raw = forced_isa_value();
  std::string s = isa_name(isa);
  if (!raw.empty())
    s += std::string(" (forced by FASTATTN_CPU_ISA=") + raw + "; this CPU: " + isa_name(cpu_best_isa()) + ")";
  else if (isa != cpu_best_isa())
    s += std::string(" (capped by torch's CPU capability ") + at::get_cpu_capability() + "; this CPU: " +
         isa_name(cpu_best_isa()) + ")";
  return s;
}

}  // namespace fastattn_cpu

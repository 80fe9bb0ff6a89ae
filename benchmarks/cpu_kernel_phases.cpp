// Where the CPU attention forward's time goes, phase by phase, for one instruction-set build.
//
// Built and run by benchmarks/cpu_kernel_phases.py (g++ against torch's headers and libraries, with
// -DPHASES_ISA=AVX2|AVX512|DEFAULT including the same target header as csrc/cpu/attn_cpu_<isa>.cpp), it
// includes csrc/cpu/attn_cpu_kernel.h and times its real pieces on the dense forward's tile shape
// (BQ = 64 queries, BK = 256 keys, head dim 64) in CPU time of one thread, so that other processes on a
// shared machine do not inflate the figures:
//   fma peak      12 independent FMA chains of Vec: the core's fp32 FMA rate for this vector width
//   gemm S        scale·Q·Kᵀ with the row maxima (Out::kScaleMax), B in packed panels
//   gemm PV       acc·alpha + P·V (Out::kScaleAdd)
//   brgemm S/PV   the same products through oneDNN's brgemm (plain B, ldb = BK / Dv), as the kernels ran
//                 before; oneDNN JITs for the CPU it finds unless ONEDNN_MAX_CPU_ISA caps it
//   max pass      max_of over a score row (what kScaleMax's epilogue replaced)
//   exp pass      exp_store: 2^x with exp2_vec, the row sum, P stored (fp32)
//   exp_u20 pass  the same with at::vec's exp_u20 (the previous exponential)
//   pack K/V      one key tile's Kᵀ and V panels from fp32, bf16 and fp16 sources (converted tiles)
// and prints one line per phase: GFLOP/s or ns per element, and the share of a modelled tile
// (S + exp pass + PV + the tile's K/V pack amortised over the query tiles that reuse it).
#if defined(PHASES_ISA_AVX512)
#include "cpu_target_avx512.h"
#define PHASES_ISA_NAME "avx512"
#elif defined(PHASES_ISA_AVX2)
#include "cpu_target_avx2.h"
#define PHASES_ISA_NAME "avx2"
#else
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define PHASES_ISA_NAME "default"
#endif
#include "attn_cpu_kernel.h"

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>

namespace fk = fastattn_cpu::CPU_CAPABILITY;
using fk::Vec;

namespace {

double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Best of `rounds` timings of `reps` calls, in seconds per call.
template <typename F>
double best_time(int rounds, int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const double t0 = cpu_now();
    for (int i = 0; i < reps; ++i) f();
    best = std::min(best, (cpu_now() - t0) / reps);
  }
  return best;
}

std::vector<float> randn(int64_t n, unsigned seed) {
  std::vector<float> v(n);
  srand(seed);
  for (auto& x : v) x = static_cast<float>(rand() % 2001 - 1000) / 1000.f;
  return v;
}

volatile float g_sink;

}  // namespace

int main(int argc, char** argv) {
  const int64_t BQ = 64, BK = 256, D = 64, Dv = 64, nQ = argc > 1 ? atoi(argv[1]) : 32;
  const int rounds = 5;
  const double tile_flops = 2.0 * BQ * BK * D;  // one of the two GEMMs of a tile

  // FMA peak: 12 independent chains.
  const long iters = 20000000;
  const double t_fma = best_time(3, 1, [&] {
    Vec a[12];
    for (int i = 0; i < 12; ++i) a[i] = Vec(1.f + i * 1e-3f);
    const Vec m(0.99999f), c(1e-5f);
    for (long k = 0; k < iters; ++k)
      for (int i = 0; i < 12; ++i) a[i] = at::vec::fmadd(a[i], m, c);
    Vec s(0.f);
    for (int i = 0; i < 12; ++i) s = s + a[i];
    float out[64];
    s.store(out);
    g_sink = out[0];
  });
  const double fma_gflops = 12.0 * 2 * Vec::size() * iters / t_fma / 1e9;

  auto Q = randn(BQ * D, 1), Kt = randn(D * BK, 2), V = randn(BK * Dv, 3);
  std::vector<float> Kp(fk::panel_elems(D, BK)), Vp(fk::panel_elems(BK, Dv)), S(BQ * BK), acc(BQ * Dv, 0.f);
  std::vector<float> rmax(BQ * Vec::size()), alpha(BQ, 0.999f);
  fk::pack_panels(Kt.data(), BK, 1, D, BK, Kp.data());  // Kᵀ rows: B[k][n] = Kt[k·BK + n]
  fk::pack_panels(V.data(), Dv, 1, BK, Dv, Vp.data());
  const float scale = 0.125f;

  const double t_s = best_time(rounds, 200, [&] {
    std::fill(rmax.begin(), rmax.end(), -INFINITY);
    fk::gemm_f32<fk::Out::kScaleMax>(BQ, BK, D, Q.data(), D, Kp.data(), fk::kNR, D * fk::kNR, S.data(), BK, nullptr,
                                     scale, rmax.data());
  });
  for (auto& x : S) x = x * 0.01f;  // scores of a plausible size for the passes below
  const double t_pv = best_time(rounds, 200, [&] {
    fk::gemm_f32<fk::Out::kScaleAdd>(BQ, Dv, BK, S.data(), BK, Vp.data(), fk::kNR, BK * fk::kNR, acc.data(), Dv,
                                     alpha.data());
  });
  double t_bs = 0, t_bpv = 0;
  bool brgemm_ok = true;
  try {
    t_bs = best_time(rounds, 200, [&] {
      at::native::cpublas::brgemm(BQ, BK, D, D, BK, BK, false, Q.data(), Kt.data(), S.data(), false);
    });
    t_bpv = best_time(rounds, 200, [&] {
      at::native::cpublas::brgemm(BQ, Dv, BK, BK, Dv, Dv, true, S.data(), V.data(), acc.data(), false);
    });
    at::native::cpublas::brgemm_release(false);
  } catch (...) {
    brgemm_ok = false;
  }
  for (auto& x : S) x = static_cast<float>(rand() % 1000) / 100.f;
  std::vector<float> P(BQ * BK);
  const double t_max = best_time(rounds, 200, [&] {
    float m = 0;
    for (int64_t r = 0; r < BQ; ++r) m += fk::max_of(S.data() + r * BK, BK);
    g_sink = m;
  });
  const double t_exp = best_time(rounds, 200, [&] {
    float l = 0;
    for (int64_t r = 0; r < BQ; ++r) l += fk::exp_store(S.data() + r * BK, BK, 1.f, 9.f, P.data() + r * BK);
    g_sink = l;
  });
  const double t_expu20 = best_time(rounds, 200, [&] {
    Vec l(0.f);
    for (int64_t r = 0; r < BQ; ++r)
      for (int64_t j = 0; j < BK; j += Vec::size()) {
        const Vec e = (Vec::loadu(S.data() + r * BK + j) - Vec(9.f)).exp_u20();
        l = l + e;
        e.store(P.data() + r * BK + j);
      }
    float out[64];
    l.store(out);
    g_sink = out[0];
  });

  // One key tile's K and V from row-major (BK × D) sources of each dtype.
  auto Kr = randn(BK * D, 4), Vr = randn(BK * Dv, 5);
  std::vector<c10::BFloat16> Kb(Kr.begin(), Kr.end()), Vb(Vr.begin(), Vr.end());
  std::vector<c10::Half> Kh(Kr.begin(), Kr.end()), Vh(Vr.begin(), Vr.end());
  auto pack_time = [&](const auto* k, const auto* v) {
    return best_time(rounds, 200, [&] {
      fk::pack_panels(k, 1, D, D, BK, Kp.data());
      fk::pack_panels(v, Dv, 1, BK, Dv, Vp.data());
    });
  };
  const double t_pack32 = pack_time(Kr.data(), Vr.data());
  const double t_pack16b = pack_time(Kb.data(), Vb.data());
  const double t_pack16h = pack_time(Kh.data(), Vh.data());

  // A tile of the dense forward: S, the exp pass, PV; the K/V pack is shared by the nQ query tiles.
  const double tile = t_s + t_exp + t_pv + t_pack32 / nQ;
  const double el = static_cast<double>(BQ * BK);
  printf("isa %s: Vec %d floats, micro-kernel %d x %lld\n", PHASES_ISA_NAME, static_cast<int>(Vec::size()), fk::kMR,
         static_cast<long long>(fk::kNR));
  printf("fma peak          %8.1f GFLOP/s per core (12 chains)\n", fma_gflops);
  printf("gemm S  (kScaleMax, packed)   %8.1f GFLOP/s  %5.1f%% of fma peak  %5.1f%% of a tile\n",
         tile_flops / t_s / 1e9, 100 * tile_flops / t_s / 1e9 / fma_gflops, 100 * t_s / tile);
  printf("gemm PV (kScaleAdd, packed)   %8.1f GFLOP/s  %5.1f%% of fma peak  %5.1f%% of a tile\n",
         tile_flops / t_pv / 1e9, 100 * tile_flops / t_pv / 1e9 / fma_gflops, 100 * t_pv / tile);
  if (brgemm_ok) {
    printf("brgemm S  (plain, ldb=%lld)    %8.1f GFLOP/s  %5.1f%% of fma peak\n", static_cast<long long>(BK),
           tile_flops / t_bs / 1e9, 100 * tile_flops / t_bs / 1e9 / fma_gflops);
    printf("brgemm PV (plain, ldb=%lld)     %8.1f GFLOP/s  %5.1f%% of fma peak\n", static_cast<long long>(Dv),
           tile_flops / t_bpv / 1e9, 100 * tile_flops / t_bpv / 1e9 / fma_gflops);
  } else {
    printf("brgemm: unavailable here\n");
  }
  printf("max pass          %8.3f ns/score  (%.1f%% of a tile if it were separate)\n", t_max / el * 1e9,
         100 * t_max / tile);
  printf("exp pass (exp2)   %8.3f ns/score  %5.1f%% of a tile\n", t_exp / el * 1e9, 100 * t_exp / tile);
  printf("exp pass (exp_u20)%8.3f ns/score\n", t_expu20 / el * 1e9);
  printf("pack K+V fp32     %8.3f ns/element  %5.2f%% of a tile (shared by %lld query tiles)\n",
         t_pack32 / (2.0 * BK * D) * 1e9, 100 * t_pack32 / nQ / tile, static_cast<long long>(nQ));
  printf("pack K+V bf16     %8.3f ns/element\n", t_pack16b / (2.0 * BK * D) * 1e9);
  printf("pack K+V fp16     %8.3f ns/element\n", t_pack16h / (2.0 * BK * D) * 1e9);
  printf("tile model        %8.1f GFLOP/s = %.1f%% of fma peak (S + exp + PV + pack/%lld)\n",
         2 * tile_flops / tile / 1e9, 100 * 2 * tile_flops / tile / 1e9 / fma_gflops, static_cast<long long>(nQ));
  return 0;
}

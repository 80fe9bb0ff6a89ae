// fastattn's CPU attention ops: schemas, input checks, allocation, and the run-time choice of
// instruction set and GEMM path. The kernels themselves live in attn_cpu_kernel.h (compiled
// once per instruction set by attn_cpu_{avx512,avx2,default}.cpp).
//
// This is its own TORCH_LIBRARY_FRAGMENT so that the CPU library builds and loads with a plain
// C++ compiler, where no CUDA toolkit exists.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "attn_cpu_dropout.h"
#include "attn_cpu_params.h"

namespace fastattn_cpu {
namespace {

const Kernels* select_kernels() {
  static const Kernels* chosen = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    const Kernels* k = nullptr;
    if (cap == "AVX512") k = kernels_avx512();
    if (k == nullptr && (cap == "AVX512" || cap == "AVX2")) k = kernels_avx2();
    if (k == nullptr) k = kernels_default();
    return k;
  }();
  return chosen;
}

bool portable_forced() {
  const char* env = std::getenv("FASTATTN_CPU_GEMM");
  return env != nullptr && std::strcmp(env, "portable") == 0;
}

// FASTATTN_POISON=1 (tests): outputs and scratch start as NaN, so an element never written shows.
bool poison() {
  const char* env = std::getenv("FASTATTN_POISON");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

void maybe_poison(std::initializer_list<at::Tensor*> ts) {
  if (!poison()) return;
  for (at::Tensor* t : ts)
    if (t->numel()) t->fill_(std::numeric_limits<float>::quiet_NaN());
}

// brgemm (oneDNN's micro-kernel inside torch) is used only where a self-test passes.
bool brgemm_ok(bool bf16) {
  static const bool f32 = select_kernels()->brgemm_selftest(false);
  static const bool b16 = select_kernels()->brgemm_selftest(true);
  if (portable_forced()) return false;
  return bf16 ? b16 : f32;
}

std::string describe(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + ")";
}

void set_strides(const at::Tensor& t, int64_t* s) {
  for (int d = 0; d < 4; ++d) s[d] = t.size(d) == 1 ? 0 : t.stride(d);
}

struct Shapes {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
};

Shapes check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "fastattn cpu op: expected CPU tensors, got ", t->device());
    TORCH_CHECK(t->dim() == 4, "fastattn cpu op: expected 4-D (B, H, L, D) q, k, v, got ", t->dim(), "-D");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "fastattn cpu op: q: expected float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fastattn cpu op: k, v: expected dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ",
              v.scalar_type());
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, "fastattn cpu op: k, v: expected batch ", s.B, ", got k ",
              describe(k), " v ", describe(v));
  TORCH_CHECK(k.size(3) == s.D, "fastattn cpu op: k: expected head_dim ", s.D, ", got ", describe(k));
  TORCH_CHECK(v.size(1) == s.Hkv && v.size(2) == s.Lk, "fastattn cpu op: v: expected (", s.B, ", ", s.Hkv, ", ",
              s.Lk, ", Dv), got ", describe(v));
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, "fastattn cpu op: k: expected a head count dividing ", s.Hq,
              ", got ", s.Hkv);
  return s;
}

void fill_common(AttnParams& p, const Shapes& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& tile_state, int64_t block_q,
                 int64_t block_k, double scale, int64_t window_left, int64_t window_right, int64_t q_offset) {
  TORCH_CHECK(block_q >= 2 && block_q % 2 == 0 && block_k >= 2 && block_k % 2 == 0,
              "fastattn cpu op: block_q, block_k: expected even sizes >= 2, got ", block_q, ", ", block_k);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fastattn cpu op: window: expected integers >= -1, got (",
              window_left, ", ", window_right, ")");
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Lq = s.Lq, p.Lk = s.Lk, p.D = s.D, p.Dv = s.Dv;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  for (int d = 0; d < 4; ++d) p.q_s[d] = q.stride(d), p.k_s[d] = k.stride(d), p.v_s[d] = v.stride(d);
  p.bf16 = q.scalar_type() == at::kBFloat16;
  p.BQ = block_q, p.BK = block_k;
  p.scale = static_cast<float>(scale);
  p.left = window_left, p.right = window_right, p.q_offset = q_offset;
  p.use_brgemm = brgemm_ok(false);
  p.bf16_brgemm = p.bf16 && brgemm_ok(true);
  p.mask = nullptr, p.mask_kind = kMaskNone, p.state = nullptr;
  for (int d = 0; d < 4; ++d) p.m_s[d] = 0, p.st_s[d] = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), "fastattn cpu op: mask: expected a CPU tensor, got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat,
                "fastattn cpu op: mask: expected bool or float32, got ", m.scalar_type());
    const int64_t want[4] = {s.B, s.Hq, s.Lq, s.Lk};
    bool ok = m.dim() == 4;
    for (int d = 0; ok && d < 4; ++d) ok = m.size(d) == want[d] || m.size(d) == 1;
    TORCH_CHECK(ok, "fastattn cpu op: mask: expected a 4-D shape broadcastable to (", s.B, ", ", s.Hq, ", ", s.Lq,
                ", ", s.Lk, "), got ", describe(m));
    p.mask = m.data_ptr();
    p.mask_kind = m.scalar_type() == at::kBool ? kMaskBool : kMaskFloat;
    set_strides(m, p.m_s);
    if (tile_state.has_value()) {
      const at::Tensor& st = *tile_state;
      const int64_t nq = ceil_div(s.Lq, block_q), nk = ceil_div(s.Lk, block_k);
      TORCH_CHECK(st.scalar_type() == at::kChar && st.dim() == 4 && (st.size(0) == 1 || st.size(0) == s.B) &&
                      (st.size(1) == 1 || st.size(1) == s.Hq) && st.size(2) == nq && st.size(3) == nk,
                  "fastattn cpu op: tile_state: expected int8 (1|", s.B, ", 1|", s.Hq, ", ", nq, ", ", nk,
                  ") for blocks (", block_q, ", ", block_k, "), got ", st.scalar_type(), " ", describe(st));
      p.state = st.data_ptr<int8_t>();
      set_strides(st, p.st_s);
    }
  }
}

// Dropout arguments: philox = int64 [seed, offset] on the CPU (the GPU backends' contract), 0 <= p < 1.
void check_dropout_p(double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastattn cpu op: dropout_p: expected 0 <= p < 1, got ",
              dropout_p);
}

std::pair<int64_t, int64_t> read_philox(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.numel() == 2,
              "fastattn cpu op: philox: expected a CPU int64 tensor of 2 elements [seed, offset], got ",
              t.scalar_type(), " ", describe(t), " on ", t.device());
  const at::Tensor c = t.contiguous();
  return {c.data_ptr<int64_t>()[0], c.data_ptr<int64_t>()[1]};
}

void fill_dropout(AttnParams& p, const std::optional<at::Tensor>& philox, double dropout_p) {
  check_dropout_p(dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  p.philox_seed = p.philox_offset = 0;
  if (dropout_p == 0.0) return;
  TORCH_CHECK(philox.has_value(),
              "fastattn cpu op: philox: expected the int64 [seed, offset] tensor when dropout_p > 0, got None");
  std::tie(p.philox_seed, p.philox_offset) = read_philox(*philox);
}

std::tuple<at::Tensor, at::Tensor> cpu_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& mask,
                                                const std::optional<at::Tensor>& tile_state, int64_t block_q,
                                                int64_t block_k, double scale, int64_t window_left,
                                                int64_t window_right, int64_t q_offset,
                                                const std::optional<at::Tensor>& philox, double dropout_p) {
  const Shapes s = check_qkv(q, k, v);
  at::Tensor out = at::empty({s.B, s.Hq, s.Lq, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.Lk == 0 || s.Dv == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  AttnParams p{};
  fill_common(p, s, q, k, v, mask, tile_state, block_q, block_k, scale, window_left, window_right, q_offset);
  fill_dropout(p, philox, dropout_p);
  const bool vnni = p.bf16_brgemm;
  const int64_t Dp = vnni ? round_even(s.D) : s.D, nK = ceil_div(s.Lk, block_k);
  at::Tensor kv_pack = at::empty({s.B * s.Hkv * nK * block_k * (Dp + s.Dv)},
                                 q.options().dtype(vnni ? at::kBFloat16 : at::kFloat));
  maybe_poison({&out, &lse, &kv_pack});
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.kv_pack = kv_pack.data_ptr();
  select_kernels()->fwd(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_attn_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& tile_state,
    int64_t block_q, int64_t block_k, double scale, int64_t window_left, int64_t window_right, int64_t q_offset,
    bool need_mask_grad, const std::optional<at::Tensor>& philox, double dropout_p) {
  const Shapes s = check_qkv(q, k, v);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == s.B && out.size(1) == s.Hq &&
                  out.size(2) == s.Lq && out.size(3) == s.Dv,
              "fastattn cpu op: grad_out, out: expected (", s.B, ", ", s.Hq, ", ", s.Lq, ", ", s.Dv, "), got ",
              describe(grad_out), " and ", describe(out));
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "fastattn cpu op: grad_out, out: expected dtype ", q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.Hq &&
                  lse.size(2) == s.Lq,
              "fastattn cpu op: lse: expected float32 (", s.B, ", ", s.Hq, ", ", s.Lq, "), got ", lse.scalar_type(),
              " ", describe(lse));
  at::Tensor dq = at::empty({s.B, s.Hq, s.Lq, s.D}, q.options());
  at::Tensor dk = at::empty({s.B, s.Hkv, s.Lk, s.D}, q.options());
  at::Tensor dv = at::empty({s.B, s.Hkv, s.Lk, s.Dv}, q.options());
  at::Tensor dmask = need_mask_grad ? at::zeros({s.B, s.Hq, s.Lq, s.Lk}, q.options().dtype(at::kFloat))
                                    : at::empty({0}, q.options().dtype(at::kFloat));
  if (s.Lq == 0 || s.Lk == 0 || s.B == 0 || s.Hq == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv, dmask};
  }
  AttnParams p{};
  fill_common(p, s, q, k, v, mask, tile_state, block_q, block_k, scale, window_left, window_right, q_offset);
  fill_dropout(p, philox, dropout_p);
  const at::Tensor lse_c = lse.contiguous();
  const int64_t nK = ceil_div(s.Lk, block_k);
  // Chunks of key tiles per kv head: enough tasks to share out, fixed by the problem alone.
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(nK, ceil_div(16, s.B * s.Hkv)));
  at::Tensor delta = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(at::kFloat));
  at::Tensor dq_part = at::empty({n_chunks, s.B, s.Hq, s.Lq, s.D}, q.options().dtype(at::kFloat));
  maybe_poison({&dq, &dk, &dv, &delta, &dq_part});
  p.dout = grad_out.data_ptr(), p.o = out.data_ptr();
  for (int d = 0; d < 4; ++d) p.do_s[d] = grad_out.stride(d), p.o_s[d] = out.stride(d);
  p.lse_in = lse_c.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.dmask = need_mask_grad ? dmask.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq_part = dq_part.data_ptr<float>();
  p.n_chunks = n_chunks;
  select_kernels()->bwd(p);
  return {dq, dk, dv, dmask};
}

// The keep-mask the kernels apply, (B, Hq, Lq, Lk) uint8 (tests, and replaying a forward elsewhere).
at::Tensor cpu_dropout_keep_mask(const at::Tensor& philox, int64_t batch, int64_t heads_q, int64_t seqlen_q,
                                 int64_t seqlen_k, double dropout_p) {
  TORCH_CHECK(batch >= 0 && heads_q >= 0 && seqlen_q >= 0 && seqlen_k >= 0,
              "fastattn cpu op: batch, heads_q, seqlen_q, seqlen_k: expected sizes >= 0, got ", batch, ", ", heads_q,
              ", ", seqlen_q, ", ", seqlen_k);
  check_dropout_p(dropout_p);
  const auto [seed, offset] = read_philox(philox);
  at::Tensor out = at::empty({batch, heads_q, seqlen_q, seqlen_k}, philox.options().dtype(at::kByte));
  const philox::Rng rng = philox::make_rng(seed, offset, seqlen_q, seqlen_k, static_cast<float>(dropout_p));
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, batch * heads_q * seqlen_q, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> keep(static_cast<size_t>(std::max<int64_t>(seqlen_k, 1)));
    for (int64_t row = begin; row < end; ++row) {
      philox::keep_scale(rng, philox::element(rng, row / seqlen_q, row % seqlen_q, 0), 1, seqlen_k, 1.f, keep.data());
      for (int64_t j = 0; j < seqlen_k; ++j) o[row * seqlen_k + j] = keep[j] != 0.f;
    }
  });
  return out;
}

std::string cpu_attn_info() {
  const Kernels* k = select_kernels();
  return std::string("isa=") + k->isa + " brgemm_f32=" + (brgemm_ok(false) ? "1" : "0") +
         " brgemm_bf16=" + (brgemm_ok(true) ? "1" : "0");
}

}  // namespace
}  // namespace fastattn_cpu

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def(
      "cpu_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? tile_state, int block_q, int block_k, "
      "float scale, int window_left, int window_right, int q_offset, Tensor? philox=None, float dropout_p=0.0) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "cpu_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
      "Tensor? tile_state, int block_q, int block_k, float scale, int window_left, int window_right, int q_offset, "
      "bool need_mask_grad, Tensor? philox=None, float dropout_p=0.0) -> (Tensor dq, Tensor dk, Tensor dv, "
      "Tensor dmask)");
  m.def(
      "cpu_dropout_keep_mask(Tensor philox, int batch, int heads_q, int seqlen_q, int seqlen_k, float dropout_p) -> "
      "Tensor");
  m.def("cpu_attn_info() -> str", &fastattn_cpu::cpu_attn_info);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_attn_fwd", &fastattn_cpu::cpu_attn_fwd);
  m.impl("cpu_attn_bwd", &fastattn_cpu::cpu_attn_bwd);
  m.impl("cpu_dropout_keep_mask", &fastattn_cpu::cpu_dropout_keep_mask);
}

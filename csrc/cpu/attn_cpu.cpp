// fastattn's CPU attention ops: schemas, input checks, allocation, and the run-time choice of
// instruction set (cpu_isa.h: FASTATTN_CPU_ISA, else the best the CPU supports) and GEMM path. The
// kernels themselves live in attn_cpu_kernel.h (compiled once per instruction set by
// attn_cpu_{avx512,avx2,default}.cpp).
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
#include <atomic>
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
#include "cpu_isa.h"

namespace fastattn_cpu {
namespace {

const Kernels* kernels_for(Isa isa) { return build_for(isa, kernels_avx512, kernels_avx2, kernels_default); }

bool compiled(Isa isa) { return kernels_for(isa) != nullptr; }

// The kernels this call runs (cpu_isa.h's rule; raises on a bad FASTATTN_CPU_ISA).
Isa select_isa() { return resolve_isa(compiled); }

// Calls per (instruction set, direction), so tests can see which build ran (cpu_attn_dispatch_counts).
std::atomic<int64_t> g_dispatched[kNumIsa][2];

const Kernels* dispatch(Isa isa, int direction) {
  g_dispatched[static_cast<int>(isa)][direction].fetch_add(1, std::memory_order_relaxed);
  return kernels_for(isa);
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

// bf16 GEMMs go through brgemm (oneDNN's micro-kernel inside torch, VNNI pairs) only in a build that
// has that path and where its self-test passes (a native bf16 dot); FASTATTN_CPU_GEMM=portable turns it
// off, so the converted-tile bf16 path can be tested on such a machine too.
bool bf16_brgemm(const Kernels* k) {
  const char* env = std::getenv("FASTATTN_CPU_GEMM");
  const bool portable = env != nullptr && std::strcmp(env, "portable") == 0;
  return !portable && k->bf16_brgemm_ok();
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
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "fastattn cpu op: q: expected float32, bfloat16 or float16, got ", q.scalar_type());
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

// A float32 tensor of `want` elements in CPU memory, contiguous, or none (the variants' slopes and sinks).
const float* float_vector(const std::optional<at::Tensor>& t, int64_t rows_max, int64_t heads, const char* name,
                          int64_t* rows) {
  if (!t.has_value()) return nullptr;
  const at::Tensor& x = *t;
  const bool rows_ok = x.dim() == 2 ? (x.size(0) == 1 || x.size(0) == rows_max) && x.size(1) == heads
                                    : x.dim() == 1 && x.size(0) == heads;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && rows_ok,
              "fastattn cpu op: ", name, ": expected a contiguous CPU float32 tensor of ",
              rows_max > 0 ? "(1 or " + std::to_string(rows_max) + ", " : "(", heads, rows_max > 0 ? ")" : ",)",
              ", got ", x.scalar_type(), " ", describe(x), " on ", x.device());
  if (rows != nullptr) *rows = x.dim() == 2 ? x.size(0) : 1;
  return x.data_ptr<float>();
}

using fastattn::rules::Variant;

// The scalars of the ops' variant argument (fastattn/params.py: VariantScalars), checked; no tensors yet.
Variant read_variant(at::ArrayRef<double> variant_scalars) {
  Variant v{-1, -1, 0, 0, 0.f, nullptr, 0, nullptr};
  const std::string error = fastattn::rules::unpack_variant(variant_scalars.data(), variant_scalars.size(), v);
  TORCH_CHECK(error.empty(), "fastattn cpu op: variant: ", error);
  return v;
}

void fill_common(AttnParams& p, const Kernels* kern, const Shapes& s, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, const std::optional<at::Tensor>& mask,
                 const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                 at::TensorList summary, at::IntArrayRef blocks, double scale, const Variant& variant) {
  TORCH_CHECK(blocks.size() == 2, "fastattn cpu op: blocks: expected [block_q, block_k], got ", blocks.size(),
              " values");
  const int64_t block_q = blocks[0], block_k = blocks[1];
  TORCH_CHECK(block_q >= 2 && block_q % 2 == 0 && block_k >= 2 && block_k % 2 == 0,
              "fastattn cpu op: block_q, block_k: expected even sizes >= 2, got ", block_q, ", ", block_k);
  TORCH_CHECK(summary.size() <= 1, "fastattn cpu op: summary: expected [] or [tile_state], got ", summary.size(),
              " tensors");
  const std::optional<at::Tensor> tile_state =
      summary.empty() ? std::optional<at::Tensor>() : std::optional<at::Tensor>(summary[0]);
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Lq = s.Lq, p.Lk = s.Lk, p.D = s.D, p.Dv = s.Dv;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  for (int d = 0; d < 4; ++d) p.q_s[d] = q.stride(d), p.k_s[d] = k.stride(d), p.v_s[d] = v.stride(d);
  p.bf16 = q.scalar_type() == at::kBFloat16;
  p.f16 = q.scalar_type() == at::kHalf;
  p.BQ = block_q, p.BK = block_k;
  p.scale = static_cast<float>(scale);
  int64_t alibi_rows = 1;
  p.variant = variant;
  p.variant.alibi = float_vector(alibi_slopes, s.B, s.Hq, "alibi_slopes", &alibi_rows);
  p.variant.alibi_stride_b = alibi_rows > 1 ? s.Hq : 0;
  p.variant.sinks = float_vector(sinks, 0, s.Hq, "sinks", nullptr);
  p.bf16_brgemm = p.bf16 && bf16_brgemm(kern);
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

// A packed sequence's heads run alone through the dense kernels draw the dropout numbers of the batch padded to
// the maxima Lq, Lk (fastattn/backends/_philox.py): the call's query head 0 is the contract's row `row` (sequence
// b, head h: b·Hq + h); Lq < 0 marks a dense call.
struct SeqDropout {
  int64_t row = 0, Lq = -1, Lk = -1;
};

void fill_dropout(AttnParams& p, const std::optional<at::Tensor>& philox, double dropout_p,
                  const SeqDropout& sd = SeqDropout()) {
  check_dropout_p(dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  p.philox_seed = p.philox_offset = 0;
  p.drop_Lq = sd.Lq < 0 ? p.Lq : sd.Lq;
  p.drop_Lk = sd.Lk < 0 ? p.Lk : sd.Lk;
  if (dropout_p == 0.0) return;
  TORCH_CHECK(philox.has_value(),
              "fastattn cpu op: philox: expected the int64 [seed, offset] tensor when dropout_p > 0, got None");
  std::tie(p.philox_seed, p.philox_offset) = read_philox(*philox);
  // The contract's index wraps in 64 bits: advance in unsigned arithmetic to row `row`'s first element.
  const uint64_t row =
      static_cast<uint64_t>(sd.row) * static_cast<uint64_t>(p.drop_Lq) * static_cast<uint64_t>(p.drop_Lk);
  p.philox_offset = static_cast<int64_t>(static_cast<uint64_t>(p.philox_offset) + row);
}

// The dense forward: summary = [] or [tile_state] for blocks = [block_q, block_k].
std::tuple<at::Tensor, at::Tensor> dense_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask,
                                             const std::optional<at::Tensor>& alibi_slopes,
                                             const std::optional<at::Tensor>& sinks, at::TensorList summary,
                                             const std::optional<at::Tensor>& philox, double scale, double dropout_p,
                                             const Variant& variant, at::IntArrayRef blocks,
                                             const SeqDropout& seq_dropout) {
  const Shapes s = check_qkv(q, k, v);
  at::Tensor out = at::empty({s.B, s.Hq, s.Lq, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const Isa isa = select_isa();
  const Kernels* kern = kernels_for(isa);
  AttnParams p{};
  fill_common(p, kern, s, q, k, v, mask, alibi_slopes, sinks, summary, blocks, scale, variant);
  if (s.Lk == 0 || s.Dv == 0) {  // nothing to attend: zeros, lse -inf (or the sink's logit)
    out.zero_();
    if (sinks.has_value())
      lse.copy_(sinks->view({1, s.Hq, 1}).expand({s.B, s.Hq, s.Lq}));
    else
      lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  fill_dropout(p, philox, dropout_p, seq_dropout);
  at::Tensor kv_pack =
      at::empty({kern->fwd_pack_elems(p)}, q.options().dtype(p.bf16_brgemm ? at::kBFloat16 : at::kFloat));
  maybe_poison({&out, &lse, &kv_pack});
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.kv_pack = kv_pack.data_ptr();
  dispatch(isa, 0)->fwd(p);
  return {out, lse};
}

// The dense backward; dmask is (B, Hq, Lq, Lk) in the mask's dtype (float32 here) when need_mask_grad, else an
// empty tensor of q's dtype (the shared fake's).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
    at::TensorList summary, const std::optional<at::Tensor>& philox, double scale, double dropout_p,
    const Variant& variant, at::IntArrayRef blocks, bool need_mask_grad, const SeqDropout& seq_dropout) {
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
  TORCH_CHECK(!need_mask_grad || (mask.has_value() && mask->scalar_type() == at::kFloat),
              "fastattn cpu op: need_mask_grad: expected a float32 mask to differentiate");
  at::Tensor dmask = need_mask_grad ? at::zeros({s.B, s.Hq, s.Lq, s.Lk}, q.options().dtype(at::kFloat))
                                    : at::empty({0}, q.options());
  if (s.Lq == 0 || s.Lk == 0 || s.B == 0 || s.Hq == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv, dmask};
  }
  const Kernels* kern = dispatch(select_isa(), 1);
  AttnParams p{};
  fill_common(p, kern, s, q, k, v, mask, alibi_slopes, std::nullopt, summary, blocks, scale, variant);
  fill_dropout(p, philox, dropout_p, seq_dropout);
  const at::Tensor lse_c = lse.contiguous();
  const int64_t nK = ceil_div(s.Lk, p.BK);
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
  kern->bwd(p);
  return {dq, dk, dv, dmask};
}

// ---------------------------------------------------------------------------------------------- packed sequences
//
// varlen_attention's layout: q (1, Hq, total_q, D), k/v (1, Hkv, total_k, D|Dv) views of the packed (total, H, D)
// tensors, and cu_seqlens_q/k (B + 1,) offsets. The work items are (sequence, kv head): each runs alone through the
// dense kernels above on views of its rows and of its group's heads (pointer offsets and its lengths; no copy of
// the inputs, no padding, no (total, total) mask), aligned bottom-right (q_offset = Lk_b - Lq_b). The threads take
// items largest first from a shared counter (the kernels' own parallel loops run inline inside a parallel
// region), so one long document and many short ones keep every thread busy and cost no fork/join per document.
// Outputs are token-major (registry.packed_empty); each item's contiguous result is copied into its rows.

std::vector<int64_t> read_offsets(const at::Tensor& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu.device().is_cpu() && cu.dim() == 1 && cu.size(0) >= 1 &&
                  (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              "fastattn cpu op: ", name, ": expected a CPU int32 or int64 (B + 1,) tensor, got ", cu.scalar_type(),
              " ", describe(cu), " on ", cu.device());
  const at::Tensor c = cu.to(at::kLong).contiguous();
  std::vector<int64_t> o(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  bool ok = o.front() == 0 && o.back() == total;
  for (size_t i = 1; ok && i < o.size(); ++i) ok = o[i] >= o[i - 1];
  TORCH_CHECK(ok, "fastattn cpu op: ", name, ": expected non-decreasing offsets from 0 to ", total, ", got ",
              o.front(), " .. ", o.back());
  return o;
}

struct Packed {
  std::vector<int64_t> q, k;  // the offsets
  int64_t max_q, max_k;
  int64_t lq(size_t b) const { return q[b + 1] - q[b]; }
  int64_t lk(size_t b) const { return k[b + 1] - k[b]; }
  size_t batch() const { return q.size() - 1; }
};

Packed read_packed(const Shapes& s, const std::optional<at::Tensor>& mask, at::TensorList summary,
                   const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                   int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK(cu_seqlens_k.has_value(), "fastattn cpu op: cu_seqlens_k: expected offsets with cu_seqlens_q, got None");
  TORCH_CHECK(!mask.has_value() && summary.empty(),
              "fastattn cpu op: mask: packed sequences take no mask tensor or summary");
  TORCH_CHECK(s.B == 1, "fastattn cpu op: q: expected the (1, H, total, D) view of packed tokens, got batch ", s.B);
  Packed pk{read_offsets(*cu_seqlens_q, "cu_seqlens_q", s.Lq), read_offsets(*cu_seqlens_k, "cu_seqlens_k", s.Lk),
            max_seqlen_q, max_seqlen_k};
  TORCH_CHECK(pk.q.size() == pk.k.size(), "fastattn cpu op: cu_seqlens_k: expected ", pk.q.size(),
              " offsets (as cu_seqlens_q), got ", pk.k.size());
  for (size_t b = 0; b < pk.batch(); ++b)
    TORCH_CHECK(pk.lq(b) <= max_seqlen_q && pk.lk(b) <= max_seqlen_k, "fastattn cpu op: max_seqlen_q, max_seqlen_k: ",
                "expected at least every sequence's lengths, got ", max_seqlen_q, ", ", max_seqlen_k,
                " for sequence ", b, " of lengths ", pk.lq(b), ", ", pk.lk(b));
  return pk;
}

// Sequence b's slopes of query heads [h0, h0 + n): from its row of a (B, Hq) table or the shared (Hq,) / (1, Hq).
std::optional<at::Tensor> alibi_heads(const std::optional<at::Tensor>& alibi, size_t b, int64_t h0, int64_t n) {
  if (!alibi.has_value()) return alibi;
  if (alibi->dim() == 1) return alibi->narrow(0, h0, n);
  return alibi->narrow(0, alibi->size(0) == 1 ? 0 : static_cast<int64_t>(b), 1).narrow(1, h0, n);
}

std::optional<at::Tensor> heads_of(const std::optional<at::Tensor>& t, int64_t h0, int64_t n) {
  return t.has_value() ? std::optional<at::Tensor>(t->narrow(0, h0, n)) : t;
}

// Runs item(b, g) for every (sequence, kv head) with both lengths > 0, largest Lq_b·Lk_b first, each on one thread.
template <typename F>
void for_each_item(const Packed& pk, int64_t heads_kv, const F& item) {
  std::vector<std::pair<int64_t, int64_t>> order;  // (cost, b)
  for (size_t b = 0; b < pk.batch(); ++b)
    if (pk.lq(b) > 0 && pk.lk(b) > 0) order.emplace_back(pk.lq(b) * pk.lk(b), static_cast<int64_t>(b));
  std::stable_sort(order.begin(), order.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  const int64_t n_items = static_cast<int64_t>(order.size()) * heads_kv;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n_items), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w)
      for (int64_t i = next++; i < n_items; i = next++)
        item(static_cast<size_t>(order[i / heads_kv].second), i % heads_kv);
  });
}

// A (1, H, total, dim) view of an uninitialised token-major (total, H, dim) tensor (registry.packed_empty).
at::Tensor packed_empty(const at::Tensor& like, int64_t heads, int64_t total, int64_t dim) {
  return at::empty({total, heads, dim}, like.options()).permute({1, 0, 2}).unsqueeze(0);
}

std::tuple<at::Tensor, at::Tensor> packed_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const Packed& pk, const std::optional<at::Tensor>& alibi_slopes,
                                              const std::optional<at::Tensor>& sinks,
                                              const std::optional<at::Tensor>& philox, double scale, double dropout_p,
                                              const Variant& variant, at::IntArrayRef blocks) {
  const int64_t Hq = q.size(1), total_q = q.size(2), Dv = v.size(3);
  at::Tensor out = packed_empty(q, Hq, total_q, Dv);
  at::Tensor lse = at::empty({1, Hq, total_q}, q.options().dtype(at::kFloat));
  maybe_poison({&out, &lse});
  const int64_t Hkv = k.size(1), group = Hq / Hkv;
  for (size_t b = 0; b < pk.batch(); ++b)  // no keys: zeros, lse -inf (or the sink's logit)
    if (pk.lq(b) > 0 && pk.lk(b) == 0) {
      out.narrow(2, pk.q[b], pk.lq(b)).zero_();
      at::Tensor lse_b = lse.narrow(2, pk.q[b], pk.lq(b));
      if (sinks.has_value())
        lse_b.copy_(sinks->view({1, Hq, 1}).expand_as(lse_b));
      else
        lse_b.fill_(-std::numeric_limits<float>::infinity());
    }
  for_each_item(pk, Hkv, [&](size_t b, int64_t g) {
    const int64_t lq = pk.lq(b), lk = pk.lk(b), h0 = g * group;
    Variant seq_variant = variant;  // each sequence aligned bottom-right
    seq_variant.q_offset = lk - lq;
    auto [o, l] = dense_fwd(q.narrow(2, pk.q[b], lq).narrow(1, h0, group), k.narrow(2, pk.k[b], lk).narrow(1, g, 1),
                            v.narrow(2, pk.k[b], lk).narrow(1, g, 1), std::nullopt,
                            alibi_heads(alibi_slopes, b, h0, group), heads_of(sinks, h0, group), {}, philox, scale,
                            dropout_p, seq_variant, blocks,
                            SeqDropout{static_cast<int64_t>(b) * Hq + h0, pk.max_q, pk.max_k});
    out.narrow(2, pk.q[b], lq).narrow(1, h0, group).copy_(o);
    lse.narrow(2, pk.q[b], lq).narrow(1, h0, group).copy_(l);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> packed_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const Packed& pk, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& philox, double scale, double dropout_p, const Variant& variant,
    at::IntArrayRef blocks) {
  at::Tensor dq = packed_empty(q, q.size(1), q.size(2), q.size(3));
  at::Tensor dk = packed_empty(k, k.size(1), k.size(2), k.size(3));
  at::Tensor dv = packed_empty(v, v.size(1), v.size(2), v.size(3));
  maybe_poison({&dq, &dk, &dv});
  const int64_t Hq = q.size(1), Hkv = k.size(1), group = Hq / Hkv;
  for (size_t b = 0; b < pk.batch(); ++b)  // nothing attended: zero gradients
    if (pk.lq(b) == 0 || pk.lk(b) == 0) {
      dq.narrow(2, pk.q[b], pk.lq(b)).zero_();
      dk.narrow(2, pk.k[b], pk.lk(b)).zero_();
      dv.narrow(2, pk.k[b], pk.lk(b)).zero_();
    }
  for_each_item(pk, Hkv, [&](size_t b, int64_t g) {
    const int64_t lq = pk.lq(b), lk = pk.lk(b), h0 = g * group;
    auto qrows = [&](const at::Tensor& t) { return t.narrow(2, pk.q[b], lq).narrow(1, h0, group); };
    auto krows = [&](const at::Tensor& t) { return t.narrow(2, pk.k[b], lk).narrow(1, g, 1); };
    Variant seq_variant = variant;  // each sequence aligned bottom-right
    seq_variant.q_offset = lk - lq;
    auto [gq, gk, gv, unused] =
        dense_bwd(qrows(grad_out), qrows(q), krows(k), krows(v), qrows(out), qrows(lse.unsqueeze(3)).squeeze(3),
                  std::nullopt, alibi_heads(alibi_slopes, b, h0, group), {}, philox, scale, dropout_p, seq_variant,
                  blocks, false,
                  SeqDropout{static_cast<int64_t>(b) * Hq + h0, pk.max_q, pk.max_k});
    qrows(dq).copy_(gq), krows(dk).copy_(gk), krows(dv).copy_(gv);
  });
  return {dq, dk, dv, at::empty({0}, q.options())};
}

// The registry's forward op (fastattn/backends/registry.py: OP_FWD_ARGS): summary = [] or [tile_state] for
// blocks = [block_q, block_k]; cu_seqlens_q/k (and the maxima) for packed sequences, whose q_offset is 0.
std::tuple<at::Tensor, at::Tensor> cpu_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& mask,
                                                const std::optional<at::Tensor>& alibi_slopes,
                                                const std::optional<at::Tensor>& sinks, at::TensorList summary,
                                                const std::optional<at::Tensor>& philox, double scale,
                                                double dropout_p, at::ArrayRef<double> variant_scalars,
                                                at::IntArrayRef blocks,
                                                const std::optional<at::Tensor>& cu_seqlens_q,
                                                const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                                int64_t max_seqlen_k) {
  const Variant variant = read_variant(variant_scalars);
  if (!cu_seqlens_q.has_value()) {
    TORCH_CHECK(!cu_seqlens_k.has_value(), "fastattn cpu op: cu_seqlens_q: expected offsets with cu_seqlens_k");
    return dense_fwd(q, k, v, mask, alibi_slopes, sinks, summary, philox, scale, dropout_p, variant, blocks,
                     SeqDropout());
  }
  const Shapes s = check_qkv(q, k, v);
  const Packed pk = read_packed(s, mask, summary, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return packed_fwd(q, k, v, pk, alibi_slopes, sinks, philox, scale, dropout_p, variant, blocks);
}

// The registry's backward op (OP_BWD_ARGS), dense or packed as the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_attn_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
    at::TensorList summary, const std::optional<at::Tensor>& philox, double scale, double dropout_p,
    at::ArrayRef<double> variant_scalars, at::IntArrayRef blocks, bool need_mask_grad,
    const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const Variant variant = read_variant(variant_scalars);
  if (!cu_seqlens_q.has_value()) {
    TORCH_CHECK(!cu_seqlens_k.has_value(), "fastattn cpu op: cu_seqlens_q: expected offsets with cu_seqlens_k");
    return dense_bwd(grad_out, q, k, v, out, lse, mask, alibi_slopes, summary, philox, scale, dropout_p, variant,
                     blocks, need_mask_grad, SeqDropout());
  }
  const Shapes s = check_qkv(q, k, v);
  TORCH_CHECK(!need_mask_grad, "fastattn cpu op: need_mask_grad: packed sequences take no mask tensor");
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 4 && out.size(2) == s.Lq && out.size(3) == s.Dv &&
                  lse.dim() == 3 && lse.size(2) == s.Lq && lse.scalar_type() == at::kFloat,
              "fastattn cpu op: grad_out, out, lse: expected (1, ", s.Hq, ", ", s.Lq, ", ", s.Dv, ") and float32 (1, ",
              s.Hq, ", ", s.Lq, "), got ", describe(grad_out), ", ", describe(out), ", ", describe(lse));
  const Packed pk = read_packed(s, mask, summary, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return packed_bwd(grad_out, q, k, v, out, lse, pk, alibi_slopes, philox, scale, dropout_p, variant, blocks);
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

// "isa=avx2 (forced by FASTATTN_CPU_ISA=avx2; this CPU: avx512) brgemm_bf16=0": the build the next call
// runs and why, and whether bf16 takes the native-dot path.
std::string cpu_attn_info() {
  const Kernels* k = kernels_for(select_isa());
  return "isa=" + describe_isa(compiled) + " brgemm_bf16=" + (bf16_brgemm(k) ? "1" : "0");
}

// The name of the build the next call runs: "avx512", "avx2" or "default".
std::string cpu_attn_isa() { return isa_name(select_isa()); }

// The builds this CPU can run and the library has, best first (what FASTATTN_CPU_ISA accepts here).
std::vector<std::string> cpu_attn_isas() { return runnable_isas(compiled); }

// Calls so far per build and direction: [avx512 fwd, avx512 bwd, avx2 fwd, avx2 bwd, default fwd, default bwd].
std::vector<int64_t> cpu_attn_dispatch_counts() {
  std::vector<int64_t> out;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kDefault})
    for (int dir = 0; dir < 2; ++dir) out.push_back(g_dispatched[static_cast<int>(isa)][dir].load());
  return out;
}

}  // namespace
}  // namespace fastattn_cpu

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // The registry's op arguments (fastattn/backends/registry.py: OP_FWD_ARGS, OP_BWD_ARGS), as every backend's.
  m.def(
      "cpu_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? alibi_slopes, Tensor? sinks, "
      "Tensor[] summary, Tensor? philox, float scale, float dropout_p, float[] variant, int[] blocks, "
      "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "cpu_attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
      "Tensor? alibi_slopes, Tensor[] summary, Tensor? philox, float scale, float dropout_p, float[] variant, "
      "int[] blocks, bool need_mask_grad, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
      "int max_seqlen_q=0, int max_seqlen_k=0) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  m.def(
      "cpu_dropout_keep_mask(Tensor philox, int batch, int heads_q, int seqlen_q, int seqlen_k, float dropout_p) -> "
      "Tensor");
  m.def("cpu_attn_info() -> str", &fastattn_cpu::cpu_attn_info);
  m.def("cpu_attn_isa() -> str", &fastattn_cpu::cpu_attn_isa);
  m.def("cpu_attn_isas() -> str[]", &fastattn_cpu::cpu_attn_isas);
  m.def("cpu_attn_dispatch_counts() -> int[]", &fastattn_cpu::cpu_attn_dispatch_counts);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_attn_fwd", &fastattn_cpu::cpu_attn_fwd);
  m.impl("cpu_attn_bwd", &fastattn_cpu::cpu_attn_bwd);
  m.impl("cpu_dropout_keep_mask", &fastattn_cpu::cpu_dropout_keep_mask);
}

// fastattn's CPU graph-attention ops: schemas, input checks, allocation, the run-time choice of
// instruction set, and the fixed-order sums of the per-chunk parameter-gradient partials. The kernels
// live in graph_cpu_kernel.h (design note there); fastattn/graph/_cpu.py registers their fake
// implementations and autograd.
//
// The graph arrives prepared by fastattn/graph/_structure.py (CSR by target, CSC by source, edge ids);
// its index values are trusted here (Python checks edge_index once, when it builds the structure).
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_isa.h"
#include "graph_cpu_params.h"

namespace fastattn_cpu {
namespace graph {
namespace {

const GraphKernels* kernels_for(Isa isa) {
  return build_for(isa, graph_kernels_avx512, graph_kernels_avx2, graph_kernels_default);
}

bool compiled(Isa isa) { return kernels_for(isa) != nullptr; }

// The attention kernels' rule (cpu_isa.h): FASTATTN_CPU_ISA, else the best build the CPU supports.
const GraphKernels* select_kernels() { return kernels_for(resolve_isa(compiled)); }

// FASTATTN_POISON=1 (tests): outputs and scratch start as NaN, so an element never written shows.
void maybe_poison(std::initializer_list<at::Tensor*> ts) {
  const char* env = std::getenv("FASTATTN_POISON");
  if (env == nullptr || std::strcmp(env, "1") != 0) return;
  for (at::Tensor* t : ts)
    if (t->numel()) t->fill_(std::numeric_limits<float>::quiet_NaN());
}

std::string shape(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + (t.dim() == 1 ? ",)" : ")");
}

std::string dims(std::initializer_list<int64_t> want) {
  std::string s = "(";
  size_t k = 0;
  for (int64_t w : want) s += (k++ ? ", " : "") + std::to_string(w);
  return s + (want.size() == 1 ? ",)" : ")");
}

void check_shape(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> want) {
  bool ok = t.dim() == int64_t(want.size());
  int64_t d = 0;
  for (int64_t w : want) ok = ok && t.size(d++) == w;
  TORCH_CHECK(ok, op, ": argument '", name, "' must have shape ", dims(want), ", got ", shape(t));
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": argument '", name, "' must be a CPU tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": argument '", name, "' must have dtype ", c10::toString(dtype), ", got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), op, ": argument '", name, "' must be contiguous, got strides ", t.strides(),
              " for shape ", shape(t));
}

const char* kind_name(int64_t kind) { return kind == kDot ? "dot" : kind == kGat ? "gat" : "gatv2"; }

// Everything the forward and backward share: checks, sizes, pointers, and the fp32 copies of the small
// parameter tensors (kept alive here for the kernel's duration).
struct Prepared {
  GraphParams p{};
  at::Tensor att32, proj_t;
};

Prepared prepare(const char* op, const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
                 const at::Tensor& colptr, const at::Tensor& row, const at::Tensor& slot, const at::Tensor& dst,
                 const at::Tensor& src, const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& att,
                 const std::optional<at::Tensor>& edge_attr, const std::optional<at::Tensor>& loop_attr,
                 const std::optional<at::Tensor>& edge_proj, const std::optional<at::Tensor>& philox, int64_t kind,
                 int64_t num_edges, double scale, double negative_slope, double dropout_p) {
  Prepared r;
  GraphParams& p = r.p;
  TORCH_CHECK(kind == kDot || kind == kGat || kind == kGatV2, op, ": argument 'kind' must be 0 (dot), 1 (gat) or 2 (gatv2), got ",
              kind);
  const std::initializer_list<std::pair<const char*, const at::Tensor*>> graph = {
      {"rowptr", &rowptr}, {"col", &col}, {"eid", &eid}, {"colptr", &colptr}, {"row", &row}, {"slot", &slot}};
  for (auto [name, t] : graph) {
    check_tensor(op, name, *t, at::kLong);
    TORCH_CHECK(t->dim() == 1, op, ": argument '", name, "' must be 1-D, got shape ", shape(*t));
  }
  TORCH_CHECK(dst.scalar_type() == at::kFloat || dst.scalar_type() == at::kBFloat16, op,
              ": argument 'dst' must have dtype float32 or bfloat16, got ", c10::toString(dst.scalar_type()));
  const at::ScalarType dtype = dst.scalar_type();
  check_tensor(op, "dst", dst, dtype);
  check_tensor(op, "src", src, dtype);
  const bool gat = kind == kGat;
  TORCH_CHECK(dst.dim() == (gat ? 2 : 3), op, ": argument 'dst' must be ", gat ? "(targets, heads)" : "(targets, heads, channels)",
              " for kind ", kind_name(kind), ", got shape ", shape(dst));
  const int64_t Nd = dst.size(0), H = dst.size(1), C = gat ? 0 : dst.size(2);
  TORCH_CHECK(H > 0, op, ": argument 'dst' must have at least one head, got shape ", shape(dst));
  TORCH_CHECK(src.dim() == dst.dim() && src.size(1) == H && (gat || src.size(2) == C), op, ": argument 'src' must be ",
              gat ? "(sources, " + std::to_string(H) + ")" : "(sources, " + std::to_string(H) + ", " + std::to_string(C) + ")",
              " like 'dst', got shape ", shape(src));
  const int64_t Ns = src.size(0), Etot = eid.size(0);
  check_shape(op, "rowptr", rowptr, {Nd + 1});
  check_shape(op, "colptr", colptr, {Ns + 1});
  check_shape(op, "col", col, {Etot});
  check_shape(op, "row", row, {Etot});
  check_shape(op, "slot", slot, {Etot});
  TORCH_CHECK(num_edges >= 0 && num_edges <= Etot, op, ": argument 'num_edges' must be in [0, ", Etot, "], got ", num_edges);
  int64_t Cv = C;
  if (kind == kGatV2) {
    TORCH_CHECK(!values.has_value(), op, ": argument 'values' must be None for kind gatv2 (the values are 'src')");
    TORCH_CHECK(att.has_value(), op, ": argument 'att' is required for kind gatv2");
    TORCH_CHECK(att->device().is_cpu() && att->scalar_type() == dtype, op, ": argument 'att' must be a CPU tensor of dtype ",
                c10::toString(dtype), ", got ", c10::toString(att->scalar_type()), " on ", att->device());
    check_shape(op, "att", *att, {H, C});
    r.att32 = att->to(at::kFloat).contiguous();
    p.att = r.att32.data_ptr<float>();
  } else {
    TORCH_CHECK(values.has_value(), op, ": argument 'values' is required for kind ", kind_name(kind));
    TORCH_CHECK(!att.has_value(), op, ": argument 'att' must be None for kind ", kind_name(kind));
    check_tensor(op, "values", *values, dtype);
    TORCH_CHECK(values->dim() == 3 && values->size(0) == Ns && values->size(1) == H, op,
                ": argument 'values' must be (", Ns, ", ", H, ", channels), got shape ", shape(*values));
    Cv = values->size(2);
    p.values = values->data_ptr();
  }
  const int64_t loops = Etot - num_edges;
  int64_t De = 0;
  p.has_edge = edge_attr.has_value();
  if (p.has_edge) {
    check_tensor(op, "edge_attr", *edge_attr, dtype);
    TORCH_CHECK(edge_attr->dim() == 2 && edge_attr->size(0) == num_edges, op, ": argument 'edge_attr' must be (",
                num_edges, gat ? ", heads)" : ", edge_dim)", ", got shape ", shape(*edge_attr));
    const int64_t width = edge_attr->size(1);
    if (gat) {
      TORCH_CHECK(width == H, op, ": argument 'edge_attr' holds one logit per head for kind gat: (", num_edges, ", ", H,
                  "), got shape ", shape(*edge_attr));
      TORCH_CHECK(!edge_proj.has_value(), op, ": argument 'edge_proj' must be None for kind gat");
    } else {
      De = width;
      TORCH_CHECK(edge_proj.has_value(), op, ": argument 'edge_proj' is required with 'edge_attr' for kind ", kind_name(kind));
      TORCH_CHECK(edge_proj->device().is_cpu() && edge_proj->scalar_type() == dtype, op,
                  ": argument 'edge_proj' must be a CPU tensor of dtype ", c10::toString(dtype), ", got ",
                  c10::toString(edge_proj->scalar_type()), " on ", edge_proj->device());
      check_shape(op, "edge_proj", *edge_proj, {H * C, De});
      TORCH_CHECK(kind != kDot || Cv == C, op, ": kind dot adds the projected edge features to keys and values, so "
                  "'values' must have ", C, " channels like 'src', got ", Cv);
      r.proj_t = edge_proj->to(at::kFloat).t().contiguous();  // (De, H·C)
      p.proj_t = r.proj_t.data_ptr<float>();
    }
    if (loops > 0) {
      TORCH_CHECK(loop_attr.has_value(), op, ": argument 'loop_attr' is required: the graph has ", loops,
                  " added self loops and 'edge_attr' is given");
      check_tensor(op, "loop_attr", *loop_attr, dtype);
      check_shape(op, "loop_attr", *loop_attr, {loops, width});
      p.loop_attr = loop_attr->data_ptr();
    }
    p.edge_attr = edge_attr->data_ptr();
  } else {
    TORCH_CHECK(!loop_attr.has_value() && !edge_proj.has_value(), op,
                ": arguments 'loop_attr' and 'edge_proj' must be None when 'edge_attr' is None");
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": argument 'dropout_p' must be in [0, 1), got ", dropout_p);
  p.dropout = dropout_p > 0.0;
  if (p.dropout) {
    TORCH_CHECK(philox.has_value(), op, ": argument 'philox' ([seed, offset], int64) is required when dropout_p > 0");
    check_tensor(op, "philox", *philox, at::kLong);
    check_shape(op, "philox", *philox, {2});
    const int64_t* ph = philox->data_ptr<int64_t>();
    const uint64_t seed = uint64_t(ph[0]);
    p.k0 = uint32_t(seed), p.k1 = uint32_t(seed >> 32), p.rng_offset = uint64_t(ph[1]);
    p.p = float(dropout_p);
  }
  p.kind = int(kind);
  p.bf16 = dtype == at::kBFloat16;
  p.Nd = Nd, p.Ns = Ns, p.H = H, p.C = gat ? Cv : C, p.Cv = Cv, p.De = De, p.E = num_edges, p.Etot = Etot;
  p.rowptr = rowptr.data_ptr<int64_t>(), p.col = col.data_ptr<int64_t>(), p.eid = eid.data_ptr<int64_t>();
  p.colptr = colptr.data_ptr<int64_t>(), p.row = row.data_ptr<int64_t>(), p.slot = slot.data_ptr<int64_t>();
  p.dst = dst.data_ptr(), p.src = src.data_ptr();
  p.scale = float(scale), p.slope = float(negative_slope);
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_graph_attn(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid, const at::Tensor& colptr,
    const at::Tensor& row, const at::Tensor& slot, const at::Tensor& dst, const at::Tensor& src,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& att,
    const std::optional<at::Tensor>& edge_attr, const std::optional<at::Tensor>& loop_attr,
    const std::optional<at::Tensor>& edge_proj, const std::optional<at::Tensor>& philox, int64_t kind,
    int64_t num_edges, double scale, double negative_slope, double dropout_p, bool return_probs) {
  constexpr const char* op = "fastattn::cpu_graph_attn";
  Prepared r = prepare(op, rowptr, col, eid, colptr, row, slot, dst, src, values, att, edge_attr, loop_attr, edge_proj,
                       philox, kind, num_edges, scale, negative_slope, dropout_p);
  GraphParams& p = r.p;
  at::Tensor out = at::empty({p.Nd, p.H, p.Cv}, dst.options());
  at::Tensor lse = at::empty({p.Nd, p.H}, dst.options().dtype(at::kFloat));
  // Zeros: the slots of replaced self loops (past rowptr[-1]) are never visited and must read 0.
  at::Tensor probs = at::zeros({return_probs ? p.Etot : 0, p.H}, dst.options().dtype(at::kFloat));
  maybe_poison({&out, &lse});
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>(), p.probs = return_probs ? probs.data_ptr<float>() : nullptr;
  if (p.Nd > 0) select_kernels()->fwd(p);
  return {out, lse, probs};
}

at::Tensor empty_like_opt(const std::optional<at::Tensor>& t, const at::Tensor& ref, bool zero = false) {
  if (!t.has_value()) return at::empty({0}, ref.options());
  return zero ? at::zeros(t->sizes(), t->options()) : at::empty(t->sizes(), t->options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_graph_attn_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid, const at::Tensor& colptr,
    const at::Tensor& row, const at::Tensor& slot, const at::Tensor& dst, const at::Tensor& src,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& att,
    const std::optional<at::Tensor>& edge_attr, const std::optional<at::Tensor>& loop_attr,
    const std::optional<at::Tensor>& edge_proj, const std::optional<at::Tensor>& philox, int64_t kind,
    int64_t num_edges, double scale, double negative_slope, double dropout_p) {
  constexpr const char* op = "fastattn::cpu_graph_attn_bwd";
  Prepared r = prepare(op, rowptr, col, eid, colptr, row, slot, dst, src, values, att, edge_attr, loop_attr, edge_proj,
                       philox, kind, num_edges, scale, negative_slope, dropout_p);
  GraphParams& p = r.p;
  const at::ScalarType dtype = dst.scalar_type();
  check_tensor(op, "grad_out", grad_out, dtype);
  check_shape(op, "grad_out", grad_out, {p.Nd, p.H, p.Cv});
  check_tensor(op, "out", out, dtype);
  check_shape(op, "out", out, {p.Nd, p.H, p.Cv});
  check_tensor(op, "lse", lse, at::kFloat);
  check_shape(op, "lse", lse, {p.Nd, p.H});
  at::Tensor dlse;
  if (grad_lse.has_value()) {
    check_shape(op, "grad_lse", *grad_lse, {p.Nd, p.H});
    dlse = grad_lse->to(at::kFloat).contiguous();
    p.dlse = dlse.data_ptr<float>();
  }
  const int64_t HC = p.H * p.C;
  const bool proj_grad = p.has_edge && kind != kGat;
  // Chunks of the target pass: fixed by the problem (never by the thread count), so the parameter
  // gradients, summed over chunks in order below, are bitwise independent of torch.get_num_threads().
  p.n_chunks = std::max<int64_t>(1, std::min<int64_t>(p.Nd, 256));
  at::Tensor d_dst = at::empty(dst.sizes(), dst.options());
  at::Tensor d_src = at::empty(src.sizes(), src.options());
  at::Tensor d_values = empty_like_opt(values, dst);
  at::Tensor d_edge_attr = empty_like_opt(edge_attr, dst, /*zero=*/true);  // dropped self loops keep 0
  const bool loops_grad = p.has_edge && p.E < p.Etot;
  at::Tensor d_loop_attr = loops_grad ? at::empty(loop_attr->sizes(), loop_attr->options()) : at::empty({0}, dst.options());
  at::Tensor P = at::empty({p.Etot, p.H}, dst.options().dtype(at::kFloat));
  at::Tensor DS = at::empty({p.Etot, p.H}, dst.options().dtype(at::kFloat));
  at::Tensor att_part = at::zeros({kind == kGatV2 ? p.n_chunks : 0, HC}, dst.options().dtype(at::kFloat));
  at::Tensor proj_part = at::zeros({proj_grad ? p.n_chunks : 0, p.De, HC}, dst.options().dtype(at::kFloat));
  maybe_poison({&d_dst, &d_src, &d_values, &d_loop_attr, &P, &DS});
  p.dout = grad_out.data_ptr(), p.o = out.data_ptr(), p.lse_in = lse.data_ptr<float>();
  p.P = P.data_ptr<float>(), p.DS = DS.data_ptr<float>();
  p.d_dst = d_dst.data_ptr(), p.d_src = d_src.data_ptr();
  p.d_values = d_values.numel() ? d_values.data_ptr() : nullptr;
  p.d_edge_attr = d_edge_attr.numel() ? d_edge_attr.data_ptr() : nullptr;
  p.d_loop_attr = d_loop_attr.numel() ? d_loop_attr.data_ptr() : nullptr;
  p.d_att_part = att_part.numel() ? att_part.data_ptr<float>() : nullptr;
  p.d_proj_part = proj_part.numel() ? proj_part.data_ptr<float>() : nullptr;
  if (p.Nd > 0 || p.Ns > 0) select_kernels()->bwd(p);

  // The parameter gradients: the chunk partials summed in chunk order.
  auto chunk_sum = [](const at::Tensor& part) {
    const int64_t n = part.size(0), k = part.numel() / std::max<int64_t>(n, 1);
    at::Tensor total = at::zeros({k}, part.options());
    float* t = total.data_ptr<float>();
    const float* s = part.data_ptr<float>();
    at::parallel_for(0, k, 4096, [&](int64_t b, int64_t e) {
      for (int64_t c = 0; c < n; ++c)
        for (int64_t x = b; x < e; ++x) t[x] += s[c * k + x];
    });
    return total;
  };
  at::Tensor d_att = kind == kGatV2 ? chunk_sum(att_part).view({p.H, p.C}).to(dtype) : at::empty({0}, dst.options());
  at::Tensor d_edge_proj = proj_grad ? chunk_sum(proj_part).view({p.De, HC}).t().contiguous().to(dtype)
                                     : at::empty({0}, dst.options());
  return {d_dst, d_src, d_values, d_att, d_edge_attr, d_loop_attr, d_edge_proj};
}

// The dropout keep-mask (num_ids, heads) of the contract in fastattn/graph/_dropout.py (tests, debugging).
at::Tensor cpu_graph_dropout_keep(const at::Tensor& philox, int64_t num_ids, int64_t heads, double p) {
  constexpr const char* op = "fastattn::cpu_graph_dropout_keep";
  check_tensor(op, "philox", philox, at::kLong);
  check_shape(op, "philox", philox, {2});
  TORCH_CHECK(num_ids >= 0 && heads >= 0, op, ": arguments 'num_ids' and 'heads' must be >= 0, got ", num_ids, " and ",
              heads);
  const int64_t* ph = philox.data_ptr<int64_t>();
  const uint64_t seed = uint64_t(ph[0]), offset = uint64_t(ph[1]);
  at::Tensor keep = at::empty({num_ids, heads}, philox.options().dtype(at::kBool));
  bool* k = keep.data_ptr<bool>();
  const float pf = float(p);
  at::parallel_for(0, num_ids * heads, 4096, [&](int64_t b, int64_t e) {
    for (int64_t x = b; x < e; ++x) k[x] = philox_uniform(uint32_t(seed), uint32_t(seed >> 32), offset + uint64_t(x)) >= pf;
  });
  return keep;
}

std::string cpu_graph_info() { return std::string("isa=") + select_kernels()->isa; }

}  // namespace
}  // namespace graph
}  // namespace fastattn_cpu

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def(
      "cpu_graph_attn(Tensor rowptr, Tensor col, Tensor eid, Tensor colptr, Tensor row, Tensor slot, Tensor dst, "
      "Tensor src, Tensor? values, Tensor? att, Tensor? edge_attr, Tensor? loop_attr, Tensor? edge_proj, "
      "Tensor? philox, int kind, int num_edges, float scale, float negative_slope, float dropout_p, "
      "bool return_probs) -> (Tensor out, Tensor lse, Tensor probs)");
  m.def(
      "cpu_graph_attn_bwd(Tensor grad_out, Tensor? grad_lse, Tensor out, Tensor lse, Tensor rowptr, Tensor col, "
      "Tensor eid, Tensor colptr, Tensor row, Tensor slot, Tensor dst, Tensor src, Tensor? values, Tensor? att, "
      "Tensor? edge_attr, Tensor? loop_attr, Tensor? edge_proj, Tensor? philox, int kind, int num_edges, "
      "float scale, float negative_slope, float dropout_p) -> (Tensor d_dst, Tensor d_src, Tensor d_values, "
      "Tensor d_att, Tensor d_edge_attr, Tensor d_loop_attr, Tensor d_edge_proj)");
  m.def("cpu_graph_dropout_keep(Tensor philox, int num_ids, int heads, float p) -> Tensor");
  m.def("cpu_graph_info() -> str", &fastattn_cpu::graph::cpu_graph_info);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_graph_attn", &fastattn_cpu::graph::cpu_graph_attn);
  m.impl("cpu_graph_attn_bwd", &fastattn_cpu::graph::cpu_graph_attn_bwd);
  m.impl("cpu_graph_dropout_keep", &fastattn_cpu::graph::cpu_graph_dropout_keep);
}

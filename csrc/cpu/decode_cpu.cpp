// fastattn's CPU decode op (fastattn.kvcache_attention's kernel): schema, checks, scratch, and the run-time
// choice of instruction set. The kernel lives in decode_cpu_kernel.h (compiled once per instruction set by
// decode_cpu_{avx512,avx2,default}.cpp). The append into the cache and the choice of splits happen in Python
// (fastattn/backends/_kvcache.py), in the op that wraps this one.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>

#include "cpu_isa.h"
#include "decode_cpu.h"

namespace fastattn_cpu {
namespace {

const DecodeKernels* decode_kernels_for(Isa isa) {
  return build_for(isa, decode_kernels_avx512, decode_kernels_avx2, decode_kernels_default);
}

bool decode_compiled(Isa isa) { return decode_kernels_for(isa) != nullptr; }

// The attention and graph kernels' rule (cpu_isa.h), read at every call: FASTATTN_CPU_ISA, else the best build
// the CPU supports, capped by torch's CPU capability.
const DecodeKernels* select_decode_kernels() { return decode_kernels_for(resolve_isa(decode_compiled)); }

// FASTATTN_POISON=1 (tests): outputs and scratch start as NaN, so an element never written shows.
bool decode_poison() {
  const char* env = std::getenv("FASTATTN_POISON");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

std::tuple<at::Tensor, at::Tensor> cpu_kvcache_fwd(const at::Tensor& query, const at::Tensor& key_cache,
                                                   const at::Tensor& value_cache, const at::Tensor& cache_seqlens,
                                                   int64_t new_len, const std::optional<at::Tensor>& block_table,
                                                   const std::optional<at::Tensor>& alibi_slopes,
                                                   const std::optional<at::Tensor>& sinks, double scale,
                                                   at::ArrayRef<double> variant, int64_t num_splits) {
  TORCH_CHECK(query.dim() == 4 && key_cache.dim() == 4 && value_cache.dim() == 4,
              "cpu_kvcache_fwd: expected 4-D query and caches");
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "cpu_kvcache_fwd: expected float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(key_cache.scalar_type() == dtype && value_cache.scalar_type() == dtype,
              "cpu_kvcache_fwd: caches must have query's dtype");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.is_contiguous(),
              "cpu_kvcache_fwd: cache_seqlens must be a contiguous int32 (B,) tensor");
  TORCH_CHECK(num_splits >= 1, "cpu_kvcache_fwd: num_splits must be >= 1");
  DecodeParams p{};
  p.B = query.size(0);
  p.Hq = query.size(1);
  p.Lq = query.size(2);
  p.D = query.size(3);
  p.Hkv = key_cache.size(1);
  p.Dv = value_cache.size(3);
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, "cpu_kvcache_fwd: heads_kv must divide heads_q");
  p.q = query.data_ptr();
  p.k = key_cache.data_ptr();
  p.v = value_cache.data_ptr();
  for (int d = 0; d < 4; ++d) {
    p.q_s[d] = query.stride(d);
    p.k_s[d] = key_cache.stride(d);
    p.v_s[d] = value_cache.stride(d);
  }
  p.page_size = key_cache.size(2);
  at::Tensor table;
  if (block_table.has_value()) {
    table = block_table->contiguous();
    TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2, "cpu_kvcache_fwd: block_table must be int32 2-D");
    p.block_table = table.data_ptr<int32_t>();
    p.bt_stride = table.size(1);
  }
  p.seqlens = cache_seqlens.data_ptr<int32_t>();
  p.new_len = new_len;
  p.dtype = dtype == at::kBFloat16 ? kDecodeBF16 : dtype == at::kHalf ? kDecodeF16 : kDecodeF32;
  p.scale = static_cast<float>(scale);
  at::Tensor alibi, sink;
  const std::string error = fastattn::rules::unpack_variant(variant.data(), variant.size(), p.variant);
  TORCH_CHECK(error.empty(), "cpu_kvcache_fwd: variant: ", error);
  TORCH_CHECK(p.variant.q_offset == 0 && p.variant.chunk == 0,
              "cpu_kvcache_fwd: variant: expected q_offset 0 (each sequence is aligned bottom-right) and chunk 0, got ",
              p.variant.q_offset, " and ", p.variant.chunk);
  if (alibi_slopes.has_value()) {
    alibi = alibi_slopes->to(at::kFloat).contiguous();
    p.variant.alibi = alibi.data_ptr<float>();
    p.variant.alibi_stride_b = alibi.dim() == 2 && alibi.size(0) > 1 ? p.Hq : 0;
  }
  if (sinks.has_value()) {
    sink = sinks->to(at::kFloat).contiguous();
    p.variant.sinks = sink.data_ptr<float>();
  }
  p.splits = num_splits;
  p.bf16_dot = cpu_has_avx512_bf16();
  const int64_t R = (p.Hq / p.Hkv) * p.Lq;
  auto f32 = query.options().dtype(at::kFloat);
  at::Tensor part_out = at::empty({p.B * p.Hkv * p.splits * R * p.Dv}, f32);
  at::Tensor part_lse = at::empty({p.B * p.Hkv * p.splits * R}, f32);
  at::Tensor out = at::empty({p.B, p.Hq, p.Lq, p.Dv}, query.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, f32);
  if (decode_poison()) {
    for (at::Tensor* t : {&part_out, &part_lse, &out, &lse})
      if (t->numel()) t->fill_(std::numeric_limits<float>::quiet_NaN());
  }
  p.part_out = part_out.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (p.B * p.Hq * p.Lq > 0) select_decode_kernels()->decode(p);
  return {out, lse};
}

std::string cpu_kvcache_info() { return "isa=" + describe_isa(decode_compiled); }

}  // namespace
}  // namespace fastattn_cpu

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def(
      "cpu_kvcache_fwd(Tensor query, Tensor key_cache, Tensor value_cache, Tensor cache_seqlens, int new_len, "
      "Tensor? block_table, Tensor? alibi_slopes, Tensor? sinks, float scale, float[] variant, int num_splits) -> "
      "(Tensor out, Tensor lse)");
  m.def("cpu_kvcache_info() -> str", &fastattn_cpu::cpu_kvcache_info);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) { m.impl("cpu_kvcache_fwd", &fastattn_cpu::cpu_kvcache_fwd); }

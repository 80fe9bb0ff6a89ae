// Test fixture for fastattn._ext.load("cpu", sources=[...]): a tiny CPU library shaped like the CPU
// backend's (TORCH_LIBRARY_FRAGMENT into the fastattn namespace, at::parallel_for with OpenMP).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

// y = x * s + (number of threads that took part > 0), computed in parallel chunks.
at::Tensor ext_fixture_scale(const at::Tensor& x, double s) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "ext_fixture_scale: float32 contiguous x");
    at::Tensor y = at::empty_like(x);
    const float* in = x.data_ptr<float>();
    float* out = y.data_ptr<float>();
    at::parallel_for(0, x.numel(), 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) out[i] = in[i] * float(s);
    });
    return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastattn, m) { m.def("ext_fixture_scale(Tensor x, float s) -> Tensor", &ext_fixture_scale); }

// Cosines of every retained key with its head's common direction on CPU: torch.ops.halo.key_cosines.
//
// The compiled twin of halo.key_novelty.key_cosines_reference: for each (layer, KV head) the anchor is the sum of
// the unit vectors of its first counts[l, h] keys, and each of its n keys gets cos(key, anchor). The reference
// spends a CPU step in a norm, two batched matrix-vector products and a copy of the strided key view; here each
// head is two passes over its keys, read in place through their strides, with vectorised sums (`omp simd`: the
// order of a sum differs from the reference's, so the two agree to float32 rounding, not to the bit).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <vector>

namespace halo {

at::Tensor key_cosines_cpu(const at::Tensor& keys, const at::Tensor& counts) {
  TORCH_CHECK(keys.device().is_cpu(), "key_cosines: keys must be on the CPU, got ", keys.device());
  TORCH_CHECK(keys.scalar_type() == at::kFloat, "key_cosines: keys must be Float, got ", keys.scalar_type());
  TORCH_CHECK(keys.dim() == 4, "key_cosines: keys must be [L, Hkv, n, D], got ", keys.sizes());
  const int64_t layers = keys.size(0), heads = keys.size(1), n = keys.size(2), dim = keys.size(3);
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong, "key_cosines: counts must be a CPU "
              "Long tensor, got ", counts.scalar_type(), " on ", counts.device());
  TORCH_CHECK(counts.dim() == 2 && counts.size(0) == layers && counts.size(1) == heads, "key_cosines: counts must be [",
              layers, ", ", heads, "], got ", counts.sizes());
  auto k = keys.stride(3) == 1 ? keys : keys.contiguous();
  auto c = counts.contiguous();
  auto out = at::empty({layers, heads, n}, keys.options());
  const float* k_ = k.data_ptr<float>();
  const int64_t* c_ = c.data_ptr<int64_t>();
  float* out_ = out.data_ptr<float>();
  const int64_t s0 = k.stride(0), s1 = k.stride(1), s2 = k.stride(2);
  for (int64_t i = 0; i < layers * heads; ++i) {
    TORCH_CHECK(c_[i] >= 0 && c_[i] <= n, "key_cosines: counts holds ", c_[i], " outside [0, ", n, "]");
  }

  at::parallel_for(0, layers * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> anchor(dim), inverse(n);
    for (int64_t row = begin; row < end; ++row) {
      const float* base = k_ + (row / heads) * s0 + (row % heads) * s1;
      float* cos = out_ + row * n;
      std::fill(anchor.begin(), anchor.end(), 0.0f);
      for (int64_t s = 0; s < n; ++s) {
        const float* key = base + s * s2;
        float square = 0.0f;
#pragma omp simd reduction(+ : square)
        for (int64_t d = 0; d < dim; ++d) square += key[d] * key[d];
        inverse[s] = 1.0f / std::max(std::sqrt(square), FLT_MIN);
        if (s < c_[row]) {
          float* a = anchor.data();
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += key[d] * inverse[s];
        }
      }
      float square = 0.0f;
      for (int64_t d = 0; d < dim; ++d) square += anchor[d] * anchor[d];
      const float anchor_inverse = 1.0f / std::max(std::sqrt(square), FLT_MIN);
      for (int64_t s = 0; s < n; ++s) {
        const float* key = base + s * s2;
        const float* a = anchor.data();
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += key[d] * a[d];
        cos[s] = dot * inverse[s] * anchor_inverse;
      }
    }
  });
  return out;
}

}  // namespace halo

TORCH_LIBRARY_FRAGMENT(halo, m) {
  m.def("key_cosines(Tensor keys, Tensor counts) -> Tensor");
}

TORCH_LIBRARY_IMPL(halo, CPU, m) {
  m.impl("key_cosines", &halo::key_cosines_cpu);
}

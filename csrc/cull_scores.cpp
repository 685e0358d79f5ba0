// Cull scores of every row of a per-layer or per-head memory on CPU in one call: torch.ops.halo.cull_scores_rows.
//
// The compiled twin of halo.layer_cull.cull_scores_layers: in each row's position order, a slot scores
// `b + dark_bias * mean(b of the up-to-radius valid neighbours on each side)`, the neighbour sums taken from a
// float64 prefix sum exactly as the reference takes them (same clamps at the row's valid count), so the two
// agree to the last bit where the reference's cumulative sum runs in order. On CPU the reference spends its time
// in a dozen small tensor ops over [rows, n]; here each row is one pass.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "row_checks.h"

namespace halo {

at::Tensor cull_scores_rows_cpu(const at::Tensor& brightness, const at::Tensor& order, const at::Tensor& counts,
                                double dark_bias, int64_t radius) {
  TORCH_CHECK(brightness.device().is_cpu() && brightness.scalar_type() == at::kFloat && brightness.dim() == 2,
              "cull_scores_rows: brightness must be float32 [rows, n] on the CPU, got ", brightness.scalar_type(),
              " ", brightness.sizes(), " on ", brightness.device());
  const int64_t rows = brightness.size(0), n = brightness.size(1);
  check_row_input("cull_scores_rows", order, at::kLong, rows, n, "order");
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.dim() == 1 &&
                  counts.size(0) == rows,
              "cull_scores_rows: counts must be int64 [", rows, "] on the CPU, got ", counts.scalar_type(), " ",
              counts.sizes());
  TORCH_CHECK(radius >= 0, "cull_scores_rows: radius must be >= 0, got ", radius);
  auto b = brightness.contiguous(), o = order.contiguous(), c = counts.contiguous();
  auto out = at::empty({rows, n}, brightness.options());
  const float* b_ = b.data_ptr<float>();
  const int64_t* o_ = o.data_ptr<int64_t>();
  const int64_t* c_ = c.data_ptr<int64_t>();
  float* out_ = out.data_ptr<float>();
  const float bias = static_cast<float>(dark_bias);

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> ordered(n), prefix(n + 1);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * n, valid = c_[r];
      prefix[0] = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t slot = o_[base + i];
        TORCH_CHECK(slot >= 0 && slot < n, "cull_scores_rows: order holds slot ", slot, " outside [0, ", n, ")");
        ordered[i] = static_cast<double>(b_[base + slot]);
        prefix[i + 1] = prefix[i] + ordered[i];
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t lo = std::max<int64_t>(i - radius, 0);
        const int64_t hi = std::max(std::max<int64_t>(std::min(i + radius + 1, valid), 0), lo);
        const bool own = i < valid;
        const double sum = prefix[hi] - prefix[lo] - (own ? ordered[i] : 0.0);
        const int64_t count = std::max<int64_t>(hi - lo - (own ? 1 : 0), 1);
        const float mean = static_cast<float>(sum / static_cast<double>(count));
        out_[base + o_[base + i]] = static_cast<float>(ordered[i]) + bias * mean;
      }
    }
  });
  return out;
}

}  // namespace halo

TORCH_LIBRARY_FRAGMENT(halo, m) {
  m.def("cull_scores_rows(Tensor brightness, Tensor order, Tensor counts, float dark_bias, int radius) -> Tensor");
}

TORCH_LIBRARY_IMPL(halo, CPU, m) {
  m.impl("cull_scores_rows", &halo::cull_scores_rows_cpu);
}

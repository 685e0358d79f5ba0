// Unit means of every row of a per-layer or per-head memory on CPU in one call: torch.ops.halo.run_means_rows.
//
// The compiled twin of halo.layer_cull.run_means_layers: in each row's position order a unit is a run of equal
// unit ids (a negative id is a plain token, a run of its own); a pooled slot of a unit takes the mean score of
// the unit's slots, every other slot keeps its own. Sums run in float64 in position order, as the reference's
// index_add_ takes them, so the two agree to the last bit. On CPU the reference spends its time in a dozen
// small tensor ops over [rows, n]; here each row is two passes.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "row_checks.h"

namespace halo {

at::Tensor run_means_rows_cpu(const at::Tensor& scores, const at::Tensor& order, const at::Tensor& units,
                              const at::Tensor& pooled) {
  TORCH_CHECK(scores.dim() == 2, "run_means_rows: scores must be [rows, n], got ", scores.sizes());
  const int64_t rows = scores.size(0), n = scores.size(1);
  check_row_input("run_means_rows", scores, at::kFloat, rows, n, "scores");
  check_row_input("run_means_rows", order, at::kLong, rows, n, "order");
  check_row_input("run_means_rows", units, at::kLong, rows, n, "units");
  check_row_input("run_means_rows", pooled, at::kBool, rows, n, "pooled");
  auto s = scores.contiguous(), o = order.contiguous(), u = units.contiguous(), p = pooled.contiguous();
  auto out = at::empty({rows, n}, scores.options());
  const float* s_ = s.data_ptr<float>();
  const int64_t* o_ = o.data_ptr<int64_t>();
  const int64_t* u_ = u.data_ptr<int64_t>();
  const bool* p_ = p.data_ptr<bool>();
  float* out_ = out.data_ptr<float>();

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * n;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t slot = o_[base + i];
        TORCH_CHECK(slot >= 0 && slot < n, "run_means_rows: order holds slot ", slot, " outside [0, ", n, ")");
      }
      int64_t start = 0;
      while (start < n) {  // one run [start, stop) of equal unit ids (a plain token alone)
        const int64_t unit = u_[base + o_[base + start]];
        int64_t stop = start + 1;
        double sum = 0.0;  // from +0.0, as the reference's index_add_ into zeros (a lone -0.0 sums to +0.0)
        sum += static_cast<double>(s_[base + o_[base + start]]);
        while (unit >= 0 && stop < n && u_[base + o_[base + stop]] == unit) {
          sum += static_cast<double>(s_[base + o_[base + stop]]);
          ++stop;
        }
        const float mean = static_cast<float>(sum / static_cast<double>(stop - start));
        for (int64_t i = start; i < stop; ++i) {
          const int64_t slot = o_[base + i];
          out_[base + slot] = (unit >= 0 && p_[base + slot]) ? mean : s_[base + slot];
        }
        start = stop;
      }
    }
  });
  return out;
}

}  // namespace halo

TORCH_LIBRARY_FRAGMENT(halo, m) {
  m.def("run_means_rows(Tensor scores, Tensor order, Tensor units, Tensor pooled) -> Tensor");
}

TORCH_LIBRARY_IMPL(halo, CPU, m) {
  m.impl("run_means_rows", &halo::run_means_rows_cpu);
}

// Argument checks shared by the per-row cull operators on CPU (cull_scores_rows, word_victims_rows,
// run_means_rows): every [rows, n] input must sit on the CPU with its dtype and the rows' shape.

#pragma once

#include <ATen/ATen.h>

namespace halo {

// `t` must be a CPU tensor of `dtype` shaped [rows, n]; the error names the operator `op` and the argument `name`.
inline void check_row_input(const char* op, const at::Tensor& t, at::ScalarType dtype, int64_t rows, int64_t n,
                            const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == n, op, ": ", name, " must be [", rows, ", ", n,
              "], got ", t.sizes());
}

}  // namespace halo

// decode_column_mass: the attention column mass of one decode row (T = 1), on CPU, in one operator call.
//
// Reference: halo.brightness.attention_column_mass with a single query row. For query head h on slot j,
// p[h, j] = softmax_j(scaling * q[h] . k[h / G, j]) over the n = key.size(1) visible slots (G = Hq / Hkv, GQA),
// and the row's weight is n / Hq (uniform attention reads 1.0), so
//
//     mass[j]          += (n / Hq) * sum_h p[h, j]      for j < n
//     last_row_mass[j] += (n / Hq) * sum_h p[h, j]      (when given: the decode row is also the last row)
//
// On CPU the Python reference spends most of a decode step's Halo time in per-op dispatch (a dozen small ops per
// layer); here the logits are one batched matmul, the softmax ATen's vectorised kernel, and the weighted column
// sum over heads one pass that adds into both targets.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "gqa_logits.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace halo {
namespace {

void check_mass_target(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), "decode_column_mass: ", name, " must be on CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "decode_column_mass: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.stride(0) == 1, "decode_column_mass: ", name,
              " must be a contiguous 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.size(0) >= n, "decode_column_mass: ", name, " has ", t.size(0), " slots, fewer than the ", n,
              " visible keys");
}

}  // namespace

void decode_column_mass_cpu(const at::Tensor& query, const at::Tensor& key, double scaling, at::Tensor mass,
                            const std::optional<at::Tensor>& last_row_mass) {
  check_query_key(query, key, "decode_column_mass");
  const int64_t n = key.size(1);
  TORCH_CHECK(n > 0, "decode_column_mass: no visible keys");
  check_mass_target(mass, "mass", n);
  if (last_row_mass.has_value()) check_mass_target(*last_row_mass, "last_row_mass", n);
  // every head sees the same n slots: one mass row, the decode_probs / add_decode_mass of the per-head operator
  const int64_t hq = query.size(0), group = hq / key.size(0);
  const std::vector<int64_t> count(key.size(0), n - 1);
  const at::Tensor probs = decode_probs(query, key, count.data(), group, n, scaling);
  add_decode_mass(probs.const_data_ptr<float>(), n, count.data(), hq, group, 1, mass.data_ptr<float>(), 0,
                  last_row_mass.has_value() ? last_row_mass->data_ptr<float>() : nullptr, 0);
}

// Per-head memory (halo.head_cache): KV head h holds counts[h] retained slots and the decode row's own slot right
// after them, so its query heads see key[h, :counts[h] + 1]; row h of mass receives that head's column mass
// (the mean over its G query heads, weight (counts[h] + 1) / G). One call per layer instead of one per head.
void decode_column_mass_heads_cpu(const at::Tensor& query, const at::Tensor& key, double scaling,
                                  const at::Tensor& counts, at::Tensor mass,
                                  const std::optional<at::Tensor>& last_row_mass) {
  check_query_key(query, key, "decode_column_mass_heads");
  const int64_t hkv = key.size(0), group = query.size(0) / hkv;
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.dim() == 1 &&
                  counts.size(0) == hkv,
              "decode_column_mass_heads: counts must be a CPU int64 [Hkv] tensor, got ", counts.scalar_type(), " ",
              counts.sizes());
  const auto check_rows = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == hkv &&
                    t.stride(1) == 1,
                "decode_column_mass_heads: ", name, " must be float32 [Hkv, C] on CPU with contiguous rows, got ",
                t.scalar_type(), " ", t.sizes());
  };
  check_rows(mass, "mass");
  if (last_row_mass.has_value()) check_rows(*last_row_mass, "last_row_mass");
  const int64_t* count = counts.const_data_ptr<int64_t>();
  const int64_t room = std::min(key.size(1), last_row_mass.has_value() ? std::min(mass.size(1), last_row_mass->size(1))
                                                                       : mass.size(1));
  for (int64_t h = 0; h < hkv; ++h) {  // every head checked before any is written
    TORCH_CHECK(count[h] >= 0 && count[h] + 1 <= room, "decode_column_mass_heads: head ", h, " holds ", count[h],
                " slots; the key view has ", key.size(1), " and mass ", mass.size(1));
  }
  int64_t width = 0;
  for (int64_t h = 0; h < hkv; ++h) width = std::max(width, count[h] + 1);
  // one softmax over every head's row (each head's slots past its own read 0), then each head's column mass
  const at::Tensor probs = decode_probs(query, key, count, group, width, scaling);
  add_decode_mass(probs.const_data_ptr<float>(), width, count, query.size(0), group, hkv, mass.data_ptr<float>(),
                  mass.stride(0), last_row_mass.has_value() ? last_row_mass->data_ptr<float>() : nullptr,
                  last_row_mass.has_value() ? last_row_mass->stride(0) : 0);
}

}  // namespace halo

TORCH_LIBRARY_FRAGMENT(halo, m) {
  m.def("decode_column_mass(Tensor query, Tensor key, float scaling, Tensor(a!) mass, Tensor(b!)? last_row_mass) -> ()");
  m.def("decode_column_mass_heads(Tensor query, Tensor key, float scaling, Tensor counts, Tensor(a!) mass, "
        "Tensor(b!)? last_row_mass) -> ()");
}

TORCH_LIBRARY_IMPL(halo, CPU, m) {
  m.impl("decode_column_mass", &halo::decode_column_mass_cpu);
  m.impl("decode_column_mass_heads", &halo::decode_column_mass_heads_cpu);
}

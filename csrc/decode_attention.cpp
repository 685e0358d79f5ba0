// decode_attention: the attention output of one decode row (T = 1) and its column mass, on CPU, in one call.
//
// Reference: halo.decode_attention.decode_attention_reference. KV head h sees its first v[h] = counts[h] + 1 slots
// (its retained slots, then the decode row's own). For query head q of KV head h = q / G (G = Hq / Hkv, GQA),
//
//     p[q, j] = softmax_j(scaling * query[q] . key[h, j])   over j < v[h]
//     out[q]  = sum_j p[q, j] * value[h, j]
//
// and the column mass is added in place, normalised as brightness income (uniform attention reads 1.0):
//     mass [Hkv, C] (one row per KV head):  mass[h, j] += (v[h] / G) * sum_{q of h} p[q, j]
//     mass [1, C]   (one row for the layer; every head sees the same v slots):  mass[0, j] += (v / Hq) * sum_q p[q, j]
// last_row_mass (same shape), when given, receives the same. The logits, the softmax and the column mass are the
// decode column mass operator's; the output is one weighted pass over the values, so a decode step's attention and
// its mass read the keys once, where SDPA and the mass operator read them twice.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "gqa_logits.h"

namespace halo {
namespace {

void check_mass_rows(const at::Tensor& t, const char* name, int64_t hkv) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                  (t.size(0) == 1 || t.size(0) == hkv) && t.stride(1) == 1,
              "decode_attention: ", name, " must be float32 [1, C] or [Hkv, C] on CPU with contiguous rows, got ",
              t.scalar_type(), " ", t.sizes());
}

// out[q] = sum_{j < visible[h]} p[q, j] * value[h, j] for the G query heads q of each KV head h: each value row is
// read once for its G heads (the output of a decode row is bound by reading the values, as its logits by the keys).
// `out` is zeroed by the caller; `value` rows are contiguous.
#ifdef HALO_X86_AVX2
__attribute__((target("avx2,fma"))) void weighted_values_avx2(const float* p, int64_t width, const float* v,
                                                              int64_t vs0, int64_t vs1, const int64_t* count,
                                                              int64_t hkv, int64_t group, int64_t d, float* out) {
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t j = 0; j <= count[h]; ++j) {
      const float* row = v + h * vs0 + j * vs1;
      for (int64_t q = h * group; q < (h + 1) * group; ++q) {
        const __m256 w = _mm256_set1_ps(p[q * width + j]);
        float* o = out + q * d;
        for (int64_t t = 0; t < d; t += 8) {
          _mm256_storeu_ps(o + t, _mm256_fmadd_ps(w, _mm256_loadu_ps(row + t), _mm256_loadu_ps(o + t)));
        }
      }
    }
  }
}
#endif

void weighted_values(const float* p, int64_t width, const at::Tensor& value, const int64_t* count, int64_t group,
                     float* out) {
  const int64_t hkv = value.size(0), d = value.size(2), vs0 = value.stride(0), vs1 = value.stride(1);
  const float* v = value.const_data_ptr<float>();
#ifdef HALO_X86_AVX2
  if (has_avx2_fma() && d % 8 == 0) {
    weighted_values_avx2(p, width, v, vs0, vs1, count, hkv, group, d, out);
    return;
  }
#endif
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t j = 0; j <= count[h]; ++j) {
      const float* row = v + h * vs0 + j * vs1;
      for (int64_t q = h * group; q < (h + 1) * group; ++q) {
        const float weight = p[q * width + j];
        float* o = out + q * d;
#pragma omp simd
        for (int64_t t = 0; t < d; ++t) o[t] += weight * row[t];
      }
    }
  }
}

}  // namespace

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                double scaling, const at::Tensor& counts, at::Tensor mass,
                                const std::optional<at::Tensor>& last_row_mass) {
  check_query_key(query, key, "decode_attention");
  const int64_t hq = query.size(0), d = query.size(1), hkv = key.size(0), group = hq / hkv;
  TORCH_CHECK(value.device().is_cpu() && value.scalar_type() == at::kFloat && value.dim() == 3 &&
                  value.size(0) == hkv && value.size(2) == d && value.stride(2) == 1,
              "decode_attention: value must be float32 [Hkv, N, D] on CPU like key, with contiguous rows, got ",
              value.scalar_type(), " ", value.sizes(), " strides ", value.strides());
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.dim() == 1 &&
                  counts.size(0) == hkv,
              "decode_attention: counts must be a CPU int64 [Hkv] tensor, got ", counts.scalar_type(), " ",
              counts.sizes());
  check_mass_rows(mass, "mass", hkv);
  if (last_row_mass.has_value()) {
    check_mass_rows(*last_row_mass, "last_row_mass", hkv);
    TORCH_CHECK(last_row_mass->size(0) == mass.size(0), "decode_attention: last_row_mass has ",
                last_row_mass->size(0), " rows, mass ", mass.size(0));
  }
  const at::Tensor count_c = counts.contiguous();
  const int64_t* count = count_c.const_data_ptr<int64_t>();
  int64_t room = std::min({key.size(1), value.size(1), mass.size(1)});
  if (last_row_mass.has_value()) room = std::min(room, last_row_mass->size(1));
  int64_t width = 0;
  for (int64_t h = 0; h < hkv; ++h) {  // every head checked before anything is written
    TORCH_CHECK(count[h] >= 0 && count[h] + 1 <= room, "decode_attention: head ", h, " holds ", count[h],
                " slots; the key view has ", key.size(1), ", the value view ", value.size(1), " and mass ",
                mass.size(1));
    TORCH_CHECK(mass.size(0) == hkv || count[h] == count[0], "decode_attention: a one-row mass needs every head ",
                "to hold the same slots; head ", h, " holds ", count[h], ", head 0 ", count[0]);
    width = std::max(width, count[h] + 1);
  }
  const at::Tensor probs = decode_probs(query, key, count, group, width, scaling);  // [Hq, W]
  const float* p = probs.const_data_ptr<float>();
  add_decode_mass(p, width, count, hq, group, mass.size(0), mass.data_ptr<float>(), mass.stride(0),
                  last_row_mass.has_value() ? last_row_mass->data_ptr<float>() : nullptr,
                  last_row_mass.has_value() ? last_row_mass->stride(0) : 0);
  at::Tensor out = at::zeros({hq, d}, query.options());
  weighted_values(p, width, value, count, group, out.data_ptr<float>());
  return out;
}

}  // namespace halo

TORCH_LIBRARY_FRAGMENT(halo, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, float scaling, Tensor counts, Tensor(a!) mass, "
        "Tensor(b!)? last_row_mass) -> Tensor");
}

TORCH_LIBRARY_IMPL(halo, CPU, m) { m.impl("decode_attention", &halo::decode_attention_cpu); }

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

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HALO_X86_AVX2 1
#endif

#include <algorithm>
#include <optional>

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

#ifdef HALO_X86_AVX2
// logits[kv * G + g, j] = q[kv * G + g] . k[kv, j] with 8-wide FMAs; each key row is read once for the G query
// heads that share it (a decode step's column mass is bound by reading the keys). Needs D % 8 == 0.
__attribute__((target("avx2,fma"))) void gqa_logits_avx2(const float* q, const float* k, int64_t ks0, int64_t ks1,
                                                          int64_t hkv, int64_t group, int64_t n, int64_t d,
                                                          float* logits) {
  for (int64_t kv = 0; kv < hkv; ++kv) {
    for (int64_t j = 0; j < n; ++j) {
      const float* key_row = k + kv * ks0 + j * ks1;
      for (int64_t g = 0; g < group; ++g) {
        const float* q_row = q + (kv * group + g) * d;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t t = 0; t < d; t += 8) {
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(q_row + t), _mm256_loadu_ps(key_row + t), acc);
        }
        const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
        logits[(kv * group + g) * n + j] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
      }
    }
  }
}

bool has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}
#endif

// [Hq, N] logits of the decode row: q . k for every query head and visible slot (unscaled).
at::Tensor gqa_logits(const at::Tensor& query, const at::Tensor& key, int64_t group) {
  const int64_t hq = query.size(0), d = query.size(1), hkv = key.size(0), n = key.size(1);
#ifdef HALO_X86_AVX2
  if (has_avx2_fma() && d % 8 == 0 && key.stride(2) == 1) {
    const at::Tensor q = query.contiguous();
    at::Tensor logits = at::empty({hq, n}, query.options());
    gqa_logits_avx2(q.const_data_ptr<float>(), key.const_data_ptr<float>(), key.stride(0), key.stride(1), hkv, group,
                    n, d, logits.data_ptr<float>());
    return logits;
  }
#endif
  // [Hkv, G, D] @ [Hkv, D, N] -> [Hkv, G, N]: row h = kv * G + g, as the reference orders query heads.
  return at::matmul(query.reshape({hkv, group, d}), key.transpose(1, 2)).reshape({hq, n});
}


void check_query_key(const at::Tensor& query, const at::Tensor& key, const char* op) {
  TORCH_CHECK(query.dim() == 2, op, ": query must be [Hq, D], got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 3, op, ": key must be [Hkv, N, D], got shape ", key.sizes());
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu(), op, ": query and key must be on CPU");
  TORCH_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == at::kFloat, op,
              ": query and key must be float32, got ", query.scalar_type(), " and ", key.scalar_type());
  TORCH_CHECK(key.size(2) == query.size(1), op, ": head dims differ: query ", query.size(1), ", key ", key.size(2));
  TORCH_CHECK(key.size(0) > 0 && query.size(0) % key.size(0) == 0, op, ": query heads (", query.size(0),
              ") must be a multiple of key heads (", key.size(0), ")");
}

// Adds (n / Hq) * sum_h p[h, j] for the n = key.size(1) visible slots into m (and last when given).
void add_column_mass(const at::Tensor& query, const at::Tensor& key, double scaling, float* m, float* last) {
  const int64_t hq = query.size(0), n = key.size(1);
  at::Tensor logits = gqa_logits(query, key, hq / key.size(0));
  logits.mul_(scaling);
  const at::Tensor probs = at::_softmax(logits, -1, false).contiguous();
  const float* p = probs.const_data_ptr<float>();
  const float weight = static_cast<float>(n) / static_cast<float>(hq);
  for (int64_t j = 0; j < n; ++j) {
    float column = 0.f;
    for (int64_t h = 0; h < hq; ++h) column += p[h * n + j];
    column *= weight;
    m[j] += column;
    if (last != nullptr) last[j] += column;
  }
}

}  // namespace

void decode_column_mass_cpu(const at::Tensor& query, const at::Tensor& key, double scaling, at::Tensor mass,
                            const std::optional<at::Tensor>& last_row_mass) {
  check_query_key(query, key, "decode_column_mass");
  const int64_t n = key.size(1);
  TORCH_CHECK(n > 0, "decode_column_mass: no visible keys");
  check_mass_target(mass, "mass", n);
  if (last_row_mass.has_value()) check_mass_target(*last_row_mass, "last_row_mass", n);
  add_column_mass(query, key, scaling, mass.data_ptr<float>(),
                  last_row_mass.has_value() ? last_row_mass->data_ptr<float>() : nullptr);
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
  for (int64_t h = 0; h < hkv; ++h) {
    const int64_t n = count[h] + 1;
    float* last = last_row_mass.has_value() ? last_row_mass->data_ptr<float>() + h * last_row_mass->stride(0)
                                            : nullptr;
    add_column_mass(query.narrow(0, h * group, group), key.narrow(0, h, 1).narrow(1, 0, n), scaling,
                    mass.data_ptr<float>() + h * mass.stride(0), last);
  }
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

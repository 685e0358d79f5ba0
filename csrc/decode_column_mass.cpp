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

}  // namespace

void decode_column_mass_cpu(const at::Tensor& query, const at::Tensor& key, double scaling, at::Tensor mass,
                            const std::optional<at::Tensor>& last_row_mass) {
  TORCH_CHECK(query.dim() == 2, "decode_column_mass: query must be [Hq, D], got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 3, "decode_column_mass: key must be [Hkv, N, D], got shape ", key.sizes());
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu(), "decode_column_mass: query and key must be on CPU");
  TORCH_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == at::kFloat,
              "decode_column_mass: query and key must be float32, got ", query.scalar_type(), " and ",
              key.scalar_type());
  const int64_t hq = query.size(0), d = query.size(1), hkv = key.size(0), n = key.size(1);
  TORCH_CHECK(key.size(2) == d, "decode_column_mass: head dims differ: query ", d, ", key ", key.size(2));
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "decode_column_mass: query heads (", hq,
              ") must be a multiple of key heads (", hkv, ")");
  TORCH_CHECK(n > 0, "decode_column_mass: no visible keys");
  check_mass_target(mass, "mass", n);
  if (last_row_mass.has_value()) check_mass_target(*last_row_mass, "last_row_mass", n);

  const int64_t group = hq / hkv;
  at::Tensor logits = gqa_logits(query, key, group);
  logits.mul_(scaling);
  const at::Tensor probs = at::_softmax(logits, -1, false).contiguous();
  const float* p = probs.const_data_ptr<float>();
  const float weight = static_cast<float>(n) / static_cast<float>(hq);
  float* m = mass.data_ptr<float>();
  float* last = last_row_mass.has_value() ? last_row_mass->data_ptr<float>() : nullptr;
  for (int64_t j = 0; j < n; ++j) {
    float column = 0.f;
    for (int64_t h = 0; h < hq; ++h) column += p[h * n + j];
    column *= weight;
    m[j] += column;
    if (last != nullptr) last[j] += column;
  }
}

}  // namespace halo

TORCH_LIBRARY_FRAGMENT(halo, m) {
  m.def("decode_column_mass(Tensor query, Tensor key, float scaling, Tensor(a!) mass, Tensor(b!)? last_row_mass) -> ()");
}

TORCH_LIBRARY_IMPL(halo, CPU, m) { m.impl("decode_column_mass", &halo::decode_column_mass_cpu); }

// The logits of one decode row against a layer's keys, shared by the decode operators on CPU
// (decode_column_mass.cpp, decode_attention.cpp): every query head of a GQA group reads each key row once.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HALO_X86_AVX2 1
#endif

namespace halo {

#ifdef HALO_X86_AVX2
// logits[kv * G + g, j] = q[kv * G + g] . k[kv, j] with 8-wide FMAs; each key row is read once for the G query
// heads that share it (a decode step's column mass is bound by reading the keys). Needs D % 8 == 0.
__attribute__((target("avx2,fma"))) inline void gqa_logits_avx2(const float* q, const float* k, int64_t ks0,
                                                                 int64_t ks1, int64_t hkv, int64_t group, int64_t n,
                                                                 int64_t d, float* logits) {
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

inline bool has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}
#endif

// [Hq, N] logits of the decode row: q . k for every query head and visible slot (unscaled).
inline at::Tensor gqa_logits(const at::Tensor& query, const at::Tensor& key, int64_t group) {
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


inline void check_query_key(const at::Tensor& query, const at::Tensor& key, const char* op) {
  TORCH_CHECK(query.dim() == 2, op, ": query must be [Hq, D], got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 3, op, ": key must be [Hkv, N, D], got shape ", key.sizes());
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu(), op, ": query and key must be on CPU");
  TORCH_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == at::kFloat, op,
              ": query and key must be float32, got ", query.scalar_type(), " and ", key.scalar_type());
  TORCH_CHECK(key.size(2) == query.size(1), op, ": head dims differ: query ", query.size(1), ", key ", key.size(2));
  TORCH_CHECK(key.size(0) > 0 && query.size(0) % key.size(0) == 0, op, ": query heads (", query.size(0),
              ") must be a multiple of key heads (", key.size(0), ")");
}


// [Hq, W] probabilities of one decode row: query head q (KV head h = q / G) sees the first count[h] + 1 slots of
// its KV head (its retained slots, then the row's own); its other columns read 0. W = max_h count[h] + 1.
inline at::Tensor decode_probs(const at::Tensor& query, const at::Tensor& key, const int64_t* count, int64_t group,
                               int64_t width, double scaling) {
  at::Tensor logits = gqa_logits(query, key.narrow(1, 0, width), group);
  logits.mul_(scaling);
  float* lg = logits.data_ptr<float>();
  for (int64_t q = 0; q < query.size(0); ++q) {
    std::fill(lg + q * width + count[q / group] + 1, lg + (q + 1) * width, -std::numeric_limits<float>::infinity());
  }
  return at::_softmax(logits, -1, false).contiguous();
}

// Adds the column mass of `p` ([Hq, W], decode_probs) into `rows` rows of mass (row stride `stride`) and, when
// given, of last: rows == Hkv (> 1): row h gets (count[h] + 1) / G times the sum of its G query heads; rows == 1:
// every head holds count[0] slots and the row gets (count[0] + 1) / Hq times the sum over all query heads.
inline void add_decode_mass(const float* p, int64_t width, const int64_t* count, int64_t hq, int64_t group,
                            int64_t rows, float* mass, int64_t stride, float* last, int64_t last_stride) {
  const bool per_head = rows > 1;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t first = per_head ? row * group : 0, heads = per_head ? group : hq;
    const int64_t visible = count[per_head ? row : 0] + 1;
    const float weight = static_cast<float>(visible) / static_cast<float>(heads);
    float* m = mass + row * stride;
    float* l = last != nullptr ? last + row * last_stride : nullptr;
    for (int64_t j = 0; j < visible; ++j) {
      float column = 0.f;
      for (int64_t q = first; q < first + heads; ++q) column += p[q * width + j];
      column *= weight;
      m[j] += column;
      if (l != nullptr) l[j] += column;
    }
  }
}

}  // namespace halo

// Victims of a per-layer or per-head cull on CPU, every row in one call: torch.ops.halo.word_victims_rows.
//
// The compiled twin of halo.layer_cull.select_word_victims_layers (its docstring states the rules): in each row,
// a unit is a run of equal unit ids in that row's position order (a slot with unit -1 is a unit of its own); it
// scores as its best-scoring slot, is guarded when any slot is protected, and units die in order of (score,
// position of their first slot) until the row's `need` slots are chosen; with a threshold, every open unit whose
// brightest slot is at most it dies too. On CPU the reference spends its time in a dozen small tensor ops over
// [rows, n] (sorts, scatters, gathers); here each row is one pass and one sort of its units.
//
// Output: victims int64 [rows, n] (each row's victims unit by unit in dying order, a unit's slots in slot order,
// then -1) and freed int64 [rows] (slots chosen per row; the caller falls back to the general path when a row
// frees fewer than it needs, i.e. when protected units would have to be cut).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "row_checks.h"

namespace halo {

namespace {

struct Unit {
  int64_t start;  // first index into the row's position order
  int64_t size;
  float key;      // best score, +inf when guarded
  float brightest;
  bool guarded;
};

// NaN as torch does it: the max of a run holding NaN is NaN, and NaN sorts after every number (+inf included)
inline float nan_max(float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : std::max(a, b); }
inline bool before(float a, float b) { return !std::isnan(a) && (std::isnan(b) || a < b); }

// at most this many slots to free (and no threshold): selection instead of a sort of every unit
constexpr int64_t kFewVictims = 8;

}  // namespace

std::tuple<at::Tensor, at::Tensor> word_victims_rows_cpu(const at::Tensor& scores, const at::Tensor& order,
                                                         const at::Tensor& brightness, const at::Tensor& protected_,
                                                         const at::Tensor& units, const at::Tensor& need,
                                                         std::optional<double> threshold) {
  TORCH_CHECK(scores.dim() == 2, "word_victims_rows: scores must be [rows, n], got ", scores.sizes());
  const int64_t rows = scores.size(0), n = scores.size(1);
  check_row_input("word_victims_rows", scores, at::kFloat, rows, n, "scores");
  check_row_input("word_victims_rows", order, at::kLong, rows, n, "order");
  check_row_input("word_victims_rows", brightness, at::kFloat, rows, n, "brightness");
  check_row_input("word_victims_rows", protected_, at::kBool, rows, n, "protected");
  check_row_input("word_victims_rows", units, at::kLong, rows, n, "units");
  TORCH_CHECK(need.device().is_cpu() && need.scalar_type() == at::kLong && need.dim() == 1 && need.size(0) == rows,
              "word_victims_rows: need must be int64 [", rows, "] on the CPU, got ", need.scalar_type(), " ",
              need.sizes());
  auto s = scores.contiguous(), o = order.contiguous(), b = brightness.contiguous(), p = protected_.contiguous(),
       u = units.contiguous(), k = need.contiguous();
  auto victims = at::full({rows, n}, -1, scores.options().dtype(at::kLong));
  auto freed = at::zeros({rows}, scores.options().dtype(at::kLong));
  const float* s_ = s.data_ptr<float>();
  const int64_t* o_ = o.data_ptr<int64_t>();
  const float* b_ = b.data_ptr<float>();
  const bool* p_ = p.data_ptr<bool>();
  const int64_t* u_ = u.data_ptr<int64_t>();
  const int64_t* k_ = k.data_ptr<int64_t>();
  int64_t* v_ = victims.data_ptr<int64_t>();
  int64_t* f_ = freed.data_ptr<int64_t>();
  const bool has_threshold = threshold.has_value();
  const float limit = has_threshold ? static_cast<float>(*threshold) : 0.0f;
  const float inf = std::numeric_limits<float>::infinity();

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<Unit> found;
    std::vector<int64_t> rank, slots;
    std::vector<bool> picked;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = r * n;
      found.clear();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t slot = o_[base + i];
        TORCH_CHECK(slot >= 0 && slot < n, "word_victims_rows: order holds slot ", slot, " outside [0, ", n, ")");
        const int64_t unit = u_[base + slot];
        const bool starts = i == 0 || unit < 0 || unit != u_[base + o_[base + i - 1]];
        if (starts) found.push_back({i, 0, -inf, -inf, false});
        Unit& cur = found.back();
        cur.size += 1;
        cur.key = nan_max(cur.key, s_[base + slot]);
        cur.brightest = nan_max(cur.brightest, b_[base + slot]);
        cur.guarded = cur.guarded || p_[base + slot];
      }
      const int64_t wanted = k_[r];
      rank.clear();
      if (!has_threshold && wanted <= kFewVictims) {
        // a decode step frees a slot or two: pick the lowest open units one at a time instead of sorting them all
        int64_t chosen = 0;
        std::vector<bool>& used = picked;
        used.assign(found.size(), false);
        while (chosen < wanted) {
          int64_t best = -1;
          for (size_t g = 0; g < found.size(); ++g) {
            if (found[g].guarded || used[g]) continue;
            if (best < 0 || before(found[g].key, found[best].key)) best = static_cast<int64_t>(g);  // ties: lower index
          }
          if (best < 0) break;
          used[best] = true;
          rank.push_back(best);
          chosen += found[best].size;
        }
      } else {
        rank.resize(found.size());
        for (size_t g = 0; g < found.size(); ++g) {
          if (found[g].guarded) found[g].key = inf;
          rank[g] = static_cast<int64_t>(g);
        }
        // units in dying order: by key, ties by position order (their index), as the reference's stable sort
        std::stable_sort(rank.begin(), rank.end(), [&](int64_t a, int64_t c) { return before(found[a].key, found[c].key); });
      }
      int64_t open_before = 0, out = 0;
      for (const int64_t g : rank) {
        const Unit& unit = found[g];
        if (unit.guarded) continue;
        const bool taken = open_before < wanted || (has_threshold && unit.brightest <= limit);
        open_before += unit.size;
        if (!taken) continue;
        slots.assign(o_ + base + unit.start, o_ + base + unit.start + unit.size);
        std::sort(slots.begin(), slots.end());
        for (const int64_t slot : slots) v_[base + out++] = slot;
      }
      f_[r] = out;
    }
  });
  return {victims, freed};
}

}  // namespace halo

TORCH_LIBRARY_FRAGMENT(halo, m) {
  m.def("word_victims_rows(Tensor scores, Tensor order, Tensor brightness, Tensor protected_, Tensor units, "
        "Tensor need, float? threshold) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(halo, CPU, m) {
  m.impl("word_victims_rows", &halo::word_victims_rows_cpu);
}

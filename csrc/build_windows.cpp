// Repair-window batch builder, CPU implementation and operator registration (see build_windows.h).
//
// Two strategies to put the retained slots in position order, both O(n_valid) passes plus O(K * W) output:
//   * dense (the common case: positions are unique and span at most ~32x the retained count): a bitmap over
//     the position range marks retained positions, and per-word prefix counts give every slot its rank (prefix
//     + popcount) without a sort. Each slot's (token, brightness, position) record is stored at its rank, so a
//     window is a contiguous run of records and its row is a plain, vectorised copy.
//   * sorted (sparse ranges or duplicate positions): LSD radix sort of (position - min, slot) pairs, stable, so
//     ties keep slot order; a target's rank is found by binary search.
// The O(n_valid) passes (min/max, marking into per-chunk bitmaps, placing records) run in parallel chunks and
// the windows are filled in parallel (at::parallel_for). Large scratch buffers are cached per calling thread, so
// steady-state calls allocate only the outputs and a few words.

#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "build_windows.h"

// The O(n_valid) loops are compiled for the x86-64 baseline and for x86-64-v3 / v4 (popcnt, BMI, AVX2 /
// AVX-512), and the loader picks the best the CPU supports (GCC function multiversioning). Elsewhere they are
// compiled once, for the target the build uses.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HALO_HOT_LOOP __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define HALO_HOT_LOOP
#endif

namespace halo {
namespace {

constexpr int64_t kDenseSpanFactor = 32;   // dense path when the position span <= factor * n + slack
constexpr int64_t kDenseSpanSlack = 1 << 16;
constexpr int64_t kSlotGrain = 8192;       // slots per parallel chunk of the O(n_valid) passes, at least
constexpr int64_t kMinMaxGrain = 1 << 17;  // the same for min/max, which is cheap enough to run inline longer

// One retained token as a window row needs it. The dense strategy stores them in position order.
struct Record {
  int64_t token;
  float brightness;
  uint32_t offset;  // position - min position (the dense strategy only runs on spans below 2^32)
};

struct Workspace {
  std::vector<uint64_t> bits;     // dense: bitmap over position offsets, one per chunk (merged into the first)
  std::vector<int64_t> prefix;    // dense: set bits before each bitmap word
  std::vector<Record> records;    // dense: records by rank
  std::vector<uint64_t> keys, keys_tmp;  // sorted: radix keys
  std::vector<int32_t> order, order_tmp; // sorted: slots in position order
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

template <typename T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Min and max of p[0..n-1] (n >= 1).
HALO_HOT_LOOP void min_max(const int64_t* __restrict p, int64_t n, int64_t& lo_out, int64_t& hi_out) {
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 0; i < n; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  lo_out = lo;
  hi_out = hi;
}

// Chunks for an O(n) pass over the slots: one per thread, at least `grain` slots each.
inline int64_t scan_chunks(int64_t n, int64_t grain = kSlotGrain) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / grain));
}

// Windows per parallel chunk: about 16k output entries, so small batches run inline on the calling thread.
inline int64_t window_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

inline int64_t window_start(int64_t rank, int64_t width, int64_t n) {
  return std::min(std::max<int64_t>(rank - width / 2, 0), n - width);
}

struct Outputs {
  int64_t* ids;
  int64_t* mask;
  float* bright;
  int64_t* local;
  int64_t* wpos;
};

// One output row of width W.
struct Row {
  int64_t* ids;
  int64_t* mask;
  float* bright;
  int64_t* wpos;

  void set(int64_t w, int64_t id, float b, int64_t p) const {
    ids[w] = id;
    mask[w] = 1;
    bright[w] = b;
    wpos[w] = p;
  }
};

// Row k of the outputs. An invalid target slot t gets a padding row and local index -1, and the caller skips it
// (returns false).
inline bool open_row(const Outputs& out, int64_t k, int64_t W, int64_t t, int64_t n, Row& row) {
  row = Row{out.ids + k * W, out.mask + k * W, out.bright + k * W, out.wpos + k * W};
  if (t >= 0 && t < n) return true;
  for (int64_t w = 0; w < W; ++w) {
    row.ids[w] = 0;
    row.mask[w] = 0;
    row.bright[w] = 0.f;
    row.wpos[w] = -1;
  }
  out.local[k] = -1;
  return false;
}

// Dense strategy helpers. Offsets are positions minus the minimum position; bit `off` of the bitmap marks a
// retained position, prefix[i] counts the set bits in words 0 .. i-1.

// Rank of a marked offset: the number of marked offsets below it.
inline int64_t rank_at(const uint64_t* __restrict bits, const int64_t* __restrict prefix, uint64_t off) {
  return prefix[off >> 6] + __builtin_popcountll(bits[off >> 6] & ((uint64_t(1) << (off & 63)) - 1));
}

// Sets the bits of pos[0..count-1] in a zeroed bitmap (a repeated position sets its bit once).
HALO_HOT_LOOP void mark_positions(const int64_t* __restrict pos, int64_t count, int64_t pmin,
                                  uint64_t* __restrict bits) {
  for (int64_t s = 0; s < count; ++s) {
    const uint64_t off = static_cast<uint64_t>(pos[s]) - static_cast<uint64_t>(pmin);
    bits[off >> 6] |= uint64_t(1) << (off & 63);
  }
}

// ORs the other chunks' bitmaps into the first one and fills prefix[0..words]. Returns the number of distinct
// marked positions.
HALO_HOT_LOOP int64_t merge_and_count(uint64_t* __restrict bits, int64_t words, int64_t chunks,
                                      int64_t* __restrict prefix) {
  int64_t total = 0;
  for (int64_t i = 0; i < words; ++i) {
    uint64_t merged = bits[i];
    for (int64_t c = 1; c < chunks; ++c) merged |= bits[c * words + i];
    bits[i] = merged;
    prefix[i] = total;
    total += __builtin_popcountll(merged);
  }
  prefix[words] = total;
  return total;
}

// Stores the record of every slot s0 .. s1-1 at its rank (positions unique).
HALO_HOT_LOOP void place_records(const int64_t* __restrict tok, const int64_t* __restrict pos,
                                 const float* __restrict br, int64_t s0, int64_t s1, int64_t pmin,
                                 const uint64_t* __restrict bits, const int64_t* __restrict prefix,
                                 Record* __restrict records) {
  for (int64_t s = s0; s < s1; ++s) {
    const uint64_t off = static_cast<uint64_t>(pos[s]) - static_cast<uint64_t>(pmin);
    records[rank_at(bits, prefix, off)] = Record{tok[s], br[s], static_cast<uint32_t>(off)};
  }
}

// Writes W consecutive records into a row.
HALO_HOT_LOOP void copy_records(const Record* __restrict rec, int64_t W, int64_t pmin, int64_t* __restrict ids,
                                int64_t* __restrict mask, float* __restrict bright, int64_t* __restrict wpos) {
  for (int64_t w = 0; w < W; ++w) {
    ids[w] = rec[w].token;
    mask[w] = 1;
    bright[w] = rec[w].brightness;
    wpos[w] = pmin + static_cast<int64_t>(rec[w].offset);
  }
}

// Dense strategy. Returns false (having written nothing) when positions repeat.
bool fill_dense(const int64_t* tok, const int64_t* pos, const float* br, int64_t n, const int64_t* tgt, int64_t K,
                int64_t W, int64_t pmin, uint64_t span, const Outputs& out) {
  Workspace& ws = workspace();
  const int64_t words = static_cast<int64_t>(span / 64) + 1;
  const int64_t chunks = scan_chunks(n);
  uint64_t* bits = grow(ws.bits, chunks * words);
  int64_t* prefix = grow(ws.prefix, words + 1);
  Record* records = grow(ws.records, n);

  // One private bitmap per chunk of slots (no atomics), merged below.
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint64_t* mine = bits + c * words;
      std::memset(mine, 0, words * sizeof(uint64_t));
      const int64_t b = c * n / chunks, e = (c + 1) * n / chunks;
      mark_positions(pos + b, e - b, pmin, mine);
    }
  });
  if (merge_and_count(bits, words, chunks, prefix) != n) return false;  // fewer distinct positions than slots

  at::parallel_for(0, n, kSlotGrain, [&](int64_t s0, int64_t s1) {
    place_records(tok, pos, br, s0, s1, pmin, bits, prefix, records);
  });

  at::parallel_for(0, K, window_grain(W), [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t t = tgt[k];
      Row row;
      if (!open_row(out, k, W, t, n, row)) continue;
      const int64_t rank = rank_at(bits, prefix, static_cast<uint64_t>(pos[t]) - static_cast<uint64_t>(pmin));
      const int64_t start = window_start(rank, W, n);
      out.local[k] = rank - start;
      copy_records(records + start, W, pmin, row.ids, row.mask, row.bright, row.wpos);
    }
  });
  return true;
}

// Sorted strategy: stable LSD radix sort of (offset, slot), 8-bit digits, only over the bytes the span uses.
void fill_sorted(const int64_t* tok, const int64_t* pos, const float* br, int64_t n, const int64_t* tgt, int64_t K,
                 int64_t W, int64_t pmin, uint64_t span, const Outputs& out) {
  Workspace& ws = workspace();
  uint64_t* keys = grow(ws.keys, n);
  uint64_t* keys_tmp = grow(ws.keys_tmp, n);
  int32_t* order = grow(ws.order, n);
  int32_t* order_tmp = grow(ws.order_tmp, n);
  for (int64_t s = 0; s < n; ++s) {
    keys[s] = static_cast<uint64_t>(pos[s]) - static_cast<uint64_t>(pmin);
    order[s] = static_cast<int32_t>(s);
  }
  int passes = 0;
  for (uint64_t r = span; r != 0; r >>= 8) ++passes;
  for (int p = 0; p < passes; ++p) {
    const int shift = 8 * p;
    int64_t count[257] = {0};
    for (int64_t i = 0; i < n; ++i) ++count[((keys[i] >> shift) & 0xff) + 1];
    bool single_bucket = false;
    for (int d = 1; d <= 256; ++d) single_bucket |= count[d] == n;
    if (single_bucket) continue;  // this digit is the same everywhere: the pass would be the identity
    for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t dst = count[(keys[i] >> shift) & 0xff]++;
      keys_tmp[dst] = keys[i];
      order_tmp[dst] = order[i];
    }
    std::swap(keys, keys_tmp);
    std::swap(order, order_tmp);
  }

  at::parallel_for(0, K, window_grain(W), [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t t = tgt[k];
      Row row;
      if (!open_row(out, k, W, t, n, row)) continue;
      const uint64_t key = static_cast<uint64_t>(pos[t]) - static_cast<uint64_t>(pmin);
      const int64_t lo_eq = std::lower_bound(keys, keys + n, key) - keys;
      const int64_t hi_eq = std::upper_bound(keys + lo_eq, keys + n, key) - keys;
      // Equal keys keep ascending slot order (stable sort of slots 0..n-1).
      const int64_t rank = std::lower_bound(order + lo_eq, order + hi_eq, static_cast<int32_t>(t)) - order;
      const int64_t start = window_start(rank, W, n);
      out.local[k] = rank - start;
      for (int64_t w = 0; w < W; ++w) {
        const int32_t s = order[start + w];
        row.set(w, tok[s], br[s], pos[s]);
      }
    }
  });
}

}  // namespace

WindowBatch build_windows_cpu(const at::Tensor& token_ids_in, const at::Tensor& positions_in,
                              const at::Tensor& brightness_in, int64_t n_valid, const at::Tensor& targets_in,
                              int64_t window) {
  check_build_windows_args(token_ids_in, positions_in, brightness_in, n_valid, targets_in, window);
  TORCH_CHECK(token_ids_in.device().is_cpu(), "build_windows_cpu: tensors must be on CPU");
  auto [token_ids, positions, brightness, targets, K, W, result] =
      start_window_build(token_ids_in, positions_in, brightness_in, n_valid, targets_in, window);
  const int64_t n = n_valid;
  auto& [ids_t, mask_t, bright_t, local_t, wpos_t] = result;
  const Outputs out{ids_t.data_ptr<int64_t>(), mask_t.data_ptr<int64_t>(), bright_t.data_ptr<float>(),
                    local_t.data_ptr<int64_t>(), wpos_t.data_ptr<int64_t>()};
  if (K == 0) return result;
  if (n == 0) {  // nothing retained: every target is invalid, windows have width 0
    std::fill(out.local, out.local + K, int64_t(-1));
    return result;
  }

  const int64_t* tok = token_ids.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* br = brightness.data_ptr<float>();
  const int64_t* tgt = targets.data_ptr<int64_t>();

  // Position range, one partial min/max per chunk.
  const int64_t chunks = scan_chunks(n, kMinMaxGrain);
  std::vector<int64_t> cmin(chunks), cmax(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * n / chunks, e = (c + 1) * n / chunks;
      min_max(pos + b, e - b, cmin[c], cmax[c]);
    }
  });
  const int64_t pmin = *std::min_element(cmin.begin(), cmin.end());
  const int64_t pmax = *std::max_element(cmax.begin(), cmax.end());
  const uint64_t span = static_cast<uint64_t>(pmax) - static_cast<uint64_t>(pmin);
  const bool dense_ok = span <= static_cast<uint64_t>(kDenseSpanFactor * n + kDenseSpanSlack) &&
                        span < (uint64_t(1) << 32);
  if (!(dense_ok && fill_dense(tok, pos, br, n, tgt, K, W, pmin, span, out))) {
    fill_sorted(tok, pos, br, n, tgt, K, W, pmin, span, out);
  }
  return result;
}

}  // namespace halo

TORCH_LIBRARY(halo, m) {
  m.def(
      "build_windows(Tensor token_ids, Tensor positions, Tensor brightness, int n_valid, Tensor targets, "
      "int window) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(halo, CPU, m) { m.impl("build_windows", &halo::build_windows_cpu); }

// `import halo._C` loads this library, which registers torch.ops.halo.*; the module itself only reports how it
// was built.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Halo Weave C++/CUDA extension: torch.ops.halo.build_windows (repair-window batch builder)";
#ifdef HALO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

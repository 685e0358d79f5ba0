// Repair-window batch builder, CPU implementation and operator registration (see build_windows.h).
//
// Two strategies to put the retained slots in position order, both O(n_valid) passes plus O(K * W) output:
//   * dense (the common case: positions are unique and span at most ~32x the retained count): a bitmap over
//     the position range marks retained positions and a position -> slot table maps them back. The rank of a
//     target is a prefix popcount; a window is read by walking set bits from the window's first rank. No sort.
//   * sorted (sparse ranges or duplicate positions): LSD radix sort of (position - min, slot) pairs, stable, so
//     ties keep slot order; a target's rank is found by binary search.
// The O(n_valid) passes (min/max, scatter into per-chunk bitmaps) run in parallel chunks and the windows are
// filled in parallel (at::parallel_for). Large scratch buffers are cached per calling thread, so steady-state
// calls allocate only the outputs and a few words.

#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "build_windows.h"
#include <chrono>
#include <cstdio>
static double now_us(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count()*1e6;}
static double PT[8]; static long PN;

namespace halo {
namespace {

constexpr int64_t kDenseSpanFactor = 32;   // dense path when the position span <= factor * n + slack
constexpr int64_t kDenseSpanSlack = 1 << 16;

struct Workspace {
  std::vector<uint64_t> bits;     // dense: bitmap over position offsets
  std::vector<int64_t> prefix;    // dense: set bits before each bitmap word
  std::vector<int32_t> slot_at;   // dense: offset -> slot (only read where the bit is set)
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

// Min and max of p[0..n-1] (n >= 1). The loop vectorises (AVX2 has 64-bit compares; the x86-64 baseline has
// not), so it is compiled twice and picked at run time.
__attribute__((always_inline)) inline void min_max_loop(const int64_t* p, int64_t n, int64_t& lo_out, int64_t& hi_out) {
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 0; i < n; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  lo_out = lo;
  hi_out = hi;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) void min_max_avx2(const int64_t* p, int64_t n, int64_t& lo, int64_t& hi) {
  min_max_loop(p, n, lo, hi);
}
void min_max(const int64_t* p, int64_t n, int64_t& lo, int64_t& hi) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    min_max_avx2(p, n, lo, hi);
  } else {
    min_max_loop(p, n, lo, hi);
  }
}
#else
void min_max(const int64_t* p, int64_t n, int64_t& lo, int64_t& hi) { min_max_loop(p, n, lo, hi); }
#endif

// Chunks for the O(n) passes over the slots: one per thread, at least 8k slots each.
inline int64_t scan_chunks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 8192));
}

// Windows per parallel chunk: about 16k output entries, so small batches run inline on the calling thread.
inline int64_t window_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

inline int64_t window_start(int64_t rank, int64_t width, int64_t n) {
  return std::min(std::max<int64_t>(rank - width / 2, 0), n - width);
}

// Index (0..63) of the j-th set bit of `word` (j < popcount(word)).
inline int select_in_word(uint64_t word, int64_t j) {
  for (int64_t i = 0; i < j; ++i) word &= word - 1;
  return __builtin_ctzll(word);
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

// Dense strategy. Returns false (having written nothing) when positions repeat.
bool fill_dense(const int64_t* tok, const int64_t* pos, const float* br, int64_t n, const int64_t* tgt, int64_t K,
                int64_t W, int64_t pmin, uint64_t span, const Outputs& out) {
  Workspace& ws = workspace();
  const int64_t words = static_cast<int64_t>(span / 64) + 1;
  const int64_t chunks = scan_chunks(n);
  uint64_t* bits = grow(ws.bits, chunks * words);
  int64_t* prefix = grow(ws.prefix, words + 1);
  int32_t* slot_at = grow(ws.slot_at, span + 1);

  // Scatter, one private bitmap per chunk of slots (no atomics); distinct positions write distinct slot_at
  // entries. The bitmaps are merged below, where a bit set in two of them is a duplicate position.
  std::vector<char> chunk_dup(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint64_t* mine = bits + c * words;
      std::memset(mine, 0, words * sizeof(uint64_t));
      bool dup = false;
      for (int64_t s = c * n / chunks, e = (c + 1) * n / chunks; s < e; ++s) {
        const uint64_t off = static_cast<uint64_t>(pos[s]) - static_cast<uint64_t>(pmin);
        const uint64_t m = uint64_t(1) << (off & 63);
        uint64_t& word = mine[off >> 6];
        dup |= (word & m) != 0;
        word |= m;
        slot_at[off] = static_cast<int32_t>(s);
      }
      chunk_dup[c] = dup;
    }
  });
  bool duplicate = false;
  for (int64_t c = 0; c < chunks; ++c) duplicate |= chunk_dup[c] != 0;
  if (duplicate) return false;

  double tp0=now_us();
  prefix[0] = 0;
  for (int64_t i = 0; i < words; ++i) {
    uint64_t merged = bits[i];
    for (int64_t c = 1; c < chunks; ++c) {
      const uint64_t other = bits[c * words + i];
      if (merged & other) return false;  // the same position in two chunks
      merged |= other;
    }
    bits[i] = merged;
    prefix[i + 1] = prefix[i] + __builtin_popcountll(merged);
  }

  double tp1=now_us(); PT[3]+=tp1-tp0;
  at::parallel_for(0, K, window_grain(W), [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t t = tgt[k];
      Row row;
      if (!open_row(out, k, W, t, n, row)) continue;
      const uint64_t off = static_cast<uint64_t>(pos[t]) - static_cast<uint64_t>(pmin);
      const int64_t rank = prefix[off >> 6] + __builtin_popcountll(bits[off >> 6] & ((uint64_t(1) << (off & 63)) - 1));
      const int64_t start = window_start(rank, W, n);
      out.local[k] = rank - start;
      // Word holding the start-th set bit: last word whose prefix <= start.
      int64_t wi = std::upper_bound(prefix, prefix + words + 1, start) - prefix - 1;
      uint64_t word = bits[wi];
      const int first = select_in_word(word, start - prefix[wi]);
      word &= ~uint64_t(0) << first;  // drop bits below the first one
      for (int64_t w = 0; w < W; ++w) {
        while (word == 0) word = bits[++wi];
        const int b = __builtin_ctzll(word);
        word &= word - 1;
        const int64_t o = wi * 64 + b;
        const int32_t s = slot_at[o];
        row.set(w, tok[s], br[s], pmin + o);
      }
    }
  });
  PT[4]+=now_us()-tp1;
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
  const at::Tensor token_ids = token_ids_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  const at::Tensor brightness = brightness_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();

  const int64_t n = n_valid;
  const int64_t K = targets.size(0);
  const int64_t W = std::min(window, n);
  WindowBatch result = allocate_window_batch(token_ids, K, W);
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

  double t0=now_us();
  const int64_t chunks = scan_chunks(n);
  std::vector<int64_t> cmin(chunks), cmax(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * n / chunks, e = (c + 1) * n / chunks;
      min_max(pos + b, e - b, cmin[c], cmax[c]);
    }
  });
  double t1=now_us(); PT[0]+=t1-t0;
  const int64_t pmin = *std::min_element(cmin.begin(), cmin.end());
  const int64_t pmax = *std::max_element(cmax.begin(), cmax.end());
  const uint64_t span = static_cast<uint64_t>(pmax) - static_cast<uint64_t>(pmin);
  const bool dense_ok = span <= static_cast<uint64_t>(kDenseSpanFactor * n + kDenseSpanSlack);
  double t2=now_us();
  if (!(dense_ok && fill_dense(tok, pos, br, n, tgt, K, W, pmin, span, out))) {
    fill_sorted(tok, pos, br, n, tgt, K, W, pmin, span, out);
  }
  PT[5]+=now_us()-t2; if(++PN%20000==0){fprintf(stderr,"minmax %.2f scatter %.2f prefix %.2f fill %.2f total_fill %.2f\n",PT[0]/PN,(PT[5]-PT[3]-PT[4])/PN,PT[3]/PN,PT[4]/PN,PT[5]/PN);}
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

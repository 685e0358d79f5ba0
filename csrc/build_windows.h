// Repair-window batch builder: shared declarations and argument checks (CPU and CUDA).
//
// halo::build_windows(token_ids, positions, brightness, n_valid, targets, window)
//   token_ids   int64   [C]  host token id of every cache slot
//   positions   int64   [C]  absolute sequence position of every slot
//   brightness  float32 [C]  brightness of every slot
//   n_valid     int           slots 0 .. n_valid-1 are retained, in arbitrary slot order
//   targets     int64   [K]  slot indices of the repair targets
//   window      int           1 .. 511, tokens per window
// returns (W = min(window, n_valid))
//   window_ids        int64   [K, W]  token ids of each window, position order, right padded with 0
//   attention_mask    int64   [K, W]  1 real token, 0 padding
//   window_brightness float32 [K, W]  brightness, padding 0
//   target_local      int64   [K]     index of the target inside its window (-1: invalid target)
//   window_positions  int64   [K, W]  absolute positions, padding -1
//
// Position order is the order of (position, slot) ascending. A window holds W consecutive retained tokens of that
// order, centred on the target (start = rank - W/2) and shifted to stay inside 0 .. n_valid-1, so it is always
// full. A target outside 0 .. n_valid-1 yields an all-padding row with target_local = -1 (no host sync needed on
// CUDA; the Python wrapper halo.repair.windows.build_windows raises for such targets on CPU).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

namespace halo {

constexpr int64_t kMaxWindow = 511;

using WindowBatch = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_build_windows_args(const at::Tensor& token_ids, const at::Tensor& positions,
                                     const at::Tensor& brightness, int64_t n_valid, const at::Tensor& targets,
                                     int64_t window) {
  TORCH_CHECK(token_ids.dim() == 1 && positions.dim() == 1 && brightness.dim() == 1,
              "build_windows: token_ids, positions and brightness must be 1-D slot tensors");
  TORCH_CHECK(targets.dim() == 1, "build_windows: targets must be 1-D, got ", targets.dim(), "-D");
  TORCH_CHECK(token_ids.scalar_type() == at::kLong, "build_windows: token_ids must be int64, got ",
              token_ids.scalar_type());
  TORCH_CHECK(positions.scalar_type() == at::kLong, "build_windows: positions must be int64, got ",
              positions.scalar_type());
  TORCH_CHECK(brightness.scalar_type() == at::kFloat, "build_windows: brightness must be float32, got ",
              brightness.scalar_type());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "build_windows: targets must be int64, got ",
              targets.scalar_type());
  const int64_t capacity = token_ids.size(0);
  TORCH_CHECK(positions.size(0) == capacity && brightness.size(0) == capacity,
              "build_windows: token_ids, positions and brightness must have the same length, got ", capacity, ", ",
              positions.size(0), ", ", brightness.size(0));
  TORCH_CHECK(n_valid >= 0 && n_valid <= capacity, "build_windows: n_valid=", n_valid, " outside 0..", capacity);
  TORCH_CHECK(n_valid < (int64_t(1) << 31), "build_windows: n_valid=", n_valid, " too large");
  TORCH_CHECK(window >= 1 && window <= kMaxWindow, "build_windows: window=", window, " outside 1..", kMaxWindow);
  const auto device = token_ids.device();
  TORCH_CHECK(positions.device() == device && brightness.device() == device && targets.device() == device,
              "build_windows: all tensors must be on the same device");
}

inline WindowBatch allocate_window_batch(const at::Tensor& like, int64_t num_targets, int64_t width) {
  auto long_opts = like.options().dtype(at::kLong);
  return WindowBatch(at::empty({num_targets, width}, long_opts), at::empty({num_targets, width}, long_opts),
                     at::empty({num_targets, width}, like.options().dtype(at::kFloat)),
                     at::empty({num_targets}, long_opts), at::empty({num_targets, width}, long_opts));
}

// One build's inputs made contiguous, its sizes and its outputs (allocated, not yet filled). Both backends start
// here, after the argument and device checks (on CUDA under the device guard, so allocations land there).
struct WindowBuild {
  at::Tensor token_ids, positions, brightness, targets;
  int64_t K, W;
  WindowBatch result;
};

inline WindowBuild start_window_build(const at::Tensor& token_ids, const at::Tensor& positions,
                                      const at::Tensor& brightness, int64_t n_valid, const at::Tensor& targets,
                                      int64_t window) {
  const int64_t K = targets.size(0);
  const int64_t W = std::min(window, n_valid);
  const at::Tensor ids = token_ids.contiguous();
  return WindowBuild{ids, positions.contiguous(), brightness.contiguous(), targets.contiguous(), K, W,
                     allocate_window_batch(ids, K, W)};
}

WindowBatch build_windows_cpu(const at::Tensor& token_ids, const at::Tensor& positions, const at::Tensor& brightness,
                              int64_t n_valid, const at::Tensor& targets, int64_t window);

#ifdef HALO_WITH_CUDA
WindowBatch build_windows_cuda(const at::Tensor& token_ids, const at::Tensor& positions,
                               const at::Tensor& brightness, int64_t n_valid, const at::Tensor& targets,
                               int64_t window);
#endif

}  // namespace halo

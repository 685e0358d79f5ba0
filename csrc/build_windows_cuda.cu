// Repair-window batch builder, CUDA implementation (see build_windows.h). Compiled only with CUDA
// (setup.py adds csrc/*.cu and HALO_WITH_CUDA=1 when CUDA works or FORCE_CUDA=1).
//
// Steps, all on the current stream, no host synchronisation:
//   1. order = stable sort of positions[0:n] (at::sort, CUB radix sort): slots in (position, slot) order;
//   2. rank[order[i]] = i (inverse permutation kernel);
//   3. one block row per window: thread w writes entry w of window k from order[start_k + w].

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "build_windows.h"

namespace halo {
namespace {

constexpr int kThreads = 128;

__global__ void inverse_permutation_kernel(const int64_t* __restrict__ order, int64_t* __restrict__ rank,
                                           int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) rank[order[i]] = i;
}

// grid = (K, ceil(W / kThreads)); block = kThreads.
__global__ void fill_windows_kernel(const int64_t* __restrict__ token_ids, const int64_t* __restrict__ positions,
                                    const float* __restrict__ brightness, const int64_t* __restrict__ order,
                                    const int64_t* __restrict__ rank, const int64_t* __restrict__ targets, int64_t n,
                                    int64_t W, int64_t* __restrict__ out_ids, int64_t* __restrict__ out_mask,
                                    float* __restrict__ out_bright, int64_t* __restrict__ out_local,
                                    int64_t* __restrict__ out_pos) {
  const int64_t k = blockIdx.x;
  const int64_t w = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t t = targets[k];
  const bool valid = t >= 0 && t < n;
  int64_t start = 0, r = 0;
  if (valid) {
    r = rank[t];
    start = r - W / 2;
    start = start < 0 ? 0 : start;
    start = start > n - W ? n - W : start;
  }
  if (w == 0) out_local[k] = valid ? r - start : -1;
  if (w >= W) return;
  const int64_t o = k * W + w;
  if (!valid) {
    out_ids[o] = 0;
    out_mask[o] = 0;
    out_bright[o] = 0.f;
    out_pos[o] = -1;
    return;
  }
  const int64_t s = order[start + w];
  out_ids[o] = token_ids[s];
  out_mask[o] = 1;
  out_bright[o] = brightness[s];
  out_pos[o] = positions[s];
}

}  // namespace

WindowBatch build_windows_cuda(const at::Tensor& token_ids_in, const at::Tensor& positions_in,
                               const at::Tensor& brightness_in, int64_t n_valid, const at::Tensor& targets_in,
                               int64_t window) {
  check_build_windows_args(token_ids_in, positions_in, brightness_in, n_valid, targets_in, window);
  TORCH_CHECK(token_ids_in.is_cuda(), "build_windows_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard device_guard(token_ids_in.device());
  auto [token_ids, positions, brightness, targets, K, W, result] =
      start_window_build(token_ids_in, positions_in, brightness_in, n_valid, targets_in, window);
  const int64_t n = n_valid;
  auto& [ids_t, mask_t, bright_t, local_t, wpos_t] = result;
  if (K == 0) return result;
  if (n == 0) {
    local_t.fill_(-1);
    return result;
  }
  TORCH_CHECK(K <= 2147483647, "build_windows_cuda: too many targets");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor order = std::get<1>(at::sort(positions.slice(0, 0, n), /*stable=*/true, /*dim=*/0,
                                                /*descending=*/false));
  at::Tensor rank = at::empty({n}, positions.options());
  const unsigned inv_blocks = static_cast<unsigned>((n + 255) / 256);
  inverse_permutation_kernel<<<inv_blocks, 256, 0, stream>>>(order.data_ptr<int64_t>(), rank.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(std::max<int64_t>((W + kThreads - 1) / kThreads, 1)));
  fill_windows_kernel<<<grid, kThreads, 0, stream>>>(
      token_ids.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), brightness.data_ptr<float>(),
      order.data_ptr<int64_t>(), rank.data_ptr<int64_t>(), targets.data_ptr<int64_t>(), n, W,
      ids_t.data_ptr<int64_t>(), mask_t.data_ptr<int64_t>(), bright_t.data_ptr<float>(), local_t.data_ptr<int64_t>(),
      wpos_t.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

}  // namespace halo

TORCH_LIBRARY_IMPL(halo, CUDA, m) { m.impl("build_windows", &halo::build_windows_cuda); }

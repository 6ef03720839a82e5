// sliced_wasserstein_grouped's device hooks: the op and its autograd (sliced_grouped_autograd.cpp)
// are device-independent ATen code; a CUDA build replaces the projections and the max's backward
// with the kernels of sliced_grouped_cuda.cu (sliced_grouped_glue.cpp sets these at load).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace pyengine {

struct GroupedForward {
  at::Tensor dist, cx, cy, win;
  at::Tensor scale;  // (G, K): 1 / |block g of direction k| (normalize only)
};

struct GroupedCudaImpl {
  // Each returns false where it does not apply (too many pairs for one launch, sizes past the
  // grid) and the caller takes the ATen path. Called for CUDA tensors whose arguments the caller
  // has checked.
  bool (*forward)(at::TensorList xs, at::TensorList ys, const at::Tensor& theta, const std::vector<int64_t>& dims,
                  double p, bool use_max, bool normalize, bool need_grad, GroupedForward& out) = nullptr;
  // out[g] / out[G + g]: the gradients to xs[g] / ys[g] where need[g] / need[G + g]
  bool (*max_backward)(const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& cx, const at::Tensor& cy,
                       const at::Tensor& win, const at::Tensor& scale, const std::vector<int64_t>& dims,
                       const std::vector<int64_t>& need, std::vector<at::Tensor>& out) = nullptr;
};

// The process's hooks (empty in a CPU-only build).
GroupedCudaImpl& grouped_cuda_impl();

}  // namespace pyengine

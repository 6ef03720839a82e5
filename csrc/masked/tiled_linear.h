// out = x @ W^T + bias for a sparse W that the GEMM sees dense: W is densified row tile by row
// tile into two alternating buffers on a side stream while cuBLAS multiplies the previous tile
// (the large-batch path of sparse_linear and sparse_linear_bitmap). CUDA glue only (ATen).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>

#include "common/cuda_glue.h"

namespace pyengine {
namespace tiled {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The result of x (m, k) @ W^T (+ bias) when nothing needs multiplying (m, n or k is 0): written
// into `out` (m, n), and true. False otherwise (out untouched).
inline bool trivial_linear(at::Tensor& out, int64_t k, const std::optional<at::Tensor>& bias) {
  if (out.numel() == 0) return true;
  if (k != 0) return false;
  if (bias.has_value() && bias->defined()) out.copy_(bias->unsqueeze(0).expand(out.sizes()));
  else out.zero_();
  return true;
}

// Extent of one tile along a dimension of `total` slices of `slice_bytes` bytes each, for a GEMM
// whose output tile is `other` x extent: small matrices in one tile, else tiles of 8..32 MB (at
// most about a quarter of the whole), a multiple of `align` (a power of two, at least 8).
inline int64_t tile_extent(int64_t total, int64_t slice_bytes, int64_t other, int64_t align = 8) {
  if (total <= 8 || total * slice_bytes <= (int64_t(2) << 20)) return total;
  const int64_t lo = std::max<int64_t>(1, (int64_t(8) << 20) / slice_bytes);
  const int64_t hi = std::max<int64_t>(lo, (int64_t(32) << 20) / slice_bytes);
  const int64_t want = ceil_div(int64_t(1) << 21, std::max<int64_t>(other, 1));
  int64_t t = std::min(std::max(want, lo), hi);
  t = std::min(t, ceil_div(total, 4));
  t = ceil_div(t, align) * align;
  return std::min(t, total);
}

// out (m, n) = x @ W^T + bias with W densified tile by tile (a multiple of `align` rows each):
// produce_rows(row0, rows, buffer, stream) writes tile t on a side stream (into buffer t % 2) while the current stream multiplies tile t - 1. The side stream first
// waits for the current stream, and the current stream waits for every produced tile, so all work
// is ordered before whatever the current stream does next (also under graph capture).
template <class ProduceRows>
void tiled_linear(const at::Tensor& x, const std::optional<at::Tensor>& bias, at::Tensor& out, int64_t n, int64_t k,
                  ProduceRows&& produce_rows, int64_t align = 8) {
  const int64_t m = x.size(0);
  const int64_t nt = tile_extent(n, k * x.element_size(), m, align);
  const int64_t ntiles = ceil_div(n, nt);
  at::Tensor buf[2] = {at::empty({nt * k}, x.options()), ntiles > 1 ? at::empty({nt * k}, x.options()) : at::Tensor()};
  c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
  auto consume = [&](int64_t t, const at::Tensor& b) {
    const int64_t n0 = t * nt, rows = std::min(nt, n - n0);
    const at::Tensor tile = b.narrow(0, 0, rows * k).view({rows, k});
    at::Tensor dst = ntiles == 1 ? out : out.narrow(1, n0, rows);
    if (bias.has_value() && bias->defined()) at::addmm_out(dst, bias->narrow(0, n0, rows), x, tile.t());
    else at::mm_out(dst, x, tile.t());
  };
  if (ntiles == 1) {
    produce_rows(int64_t(0), n, buf[0], main.stream());
    consume(0, buf[0]);
    return;
  }
  const int dev = main.device_index();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, main.device_index());
  cudaEvent_t ready = cuda::cached_event(dev, 0);
  cudaEvent_t produced[2] = {cuda::cached_event(dev, 1), cuda::cached_event(dev, 2)};
  cudaEvent_t consumed[2] = {cuda::cached_event(dev, 3), cuda::cached_event(dev, 4)};
  C10_CUDA_CHECK(cudaEventRecord(ready, main.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), ready, 0));
  for (int64_t t = 0; t < ntiles; ++t) {
    const int b = static_cast<int>(t & 1);
    if (t >= 2) C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), consumed[b], 0));
    const int64_t n0 = t * nt;
    produce_rows(n0, std::min(nt, n - n0), buf[b], side.stream());
    C10_CUDA_CHECK(cudaEventRecord(produced[b], side.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(main.stream(), produced[b], 0));
    consume(t, buf[b]);
    C10_CUDA_CHECK(cudaEventRecord(consumed[b], main.stream()));
  }
}

}  // namespace tiled
}  // namespace pyengine

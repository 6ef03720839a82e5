// The projection GEMM of the sliced Wasserstein ops, shared by the CUDA glue (sliced_glue.cpp) and
// the grouped op (sliced_grouped_autograd.cpp): dst (K, cols) = theta (K, d) @ z (cols, d)^T.
#pragma once

#include <ATen/ATen.h>

namespace pyengine {

// How many pieces to split the reduction dimension d into so that a long thin product (LaCoOT
// flattens whole feature maps: d = C*H*W, K and cols small) fills the GPU: a power of two, at most
// max_pieces, that divides d into pieces of at least 2048; 1 (no split) below d = 8192.
inline int64_t split_k_pieces(int64_t d, int64_t max_pieces) {
  if (d < 8192) return 1;
  int64_t s = 1;
  while (s * 2 <= max_pieces && d % (s * 2) == 0 && d / (s * 2) >= 2048) s *= 2;
  return s;
}

// dst = theta @ z^T; with s > 1 pieces, one strided batched GEMM over zero-copy views of the
// pieces, then their sum.
inline void project_into(at::Tensor dst, const at::Tensor& theta, const at::Tensor& z, int64_t s) {
  if (s == 1) {
    at::mm_out(dst, theta, z.t());
    return;
  }
  const int64_t K = theta.size(0), d = theta.size(1), cols = z.size(0), dc = d / s;
  const at::Tensor th = theta.view({K, s, dc}).transpose(0, 1);  // (s, K, dc)
  const at::Tensor zz = z.view({cols, s, dc}).permute({1, 2, 0});  // (s, dc, cols)
  at::sum_out(dst, at::bmm(th, zz), {0});
}

}  // namespace pyengine

// The sort / cost / reduce / gradient stage of the sliced Wasserstein forward on CUDA (defined in
// sliced_glue.cpp), shared by the single op and the grouped one (sliced_grouped_glue.cpp). CUDA
// builds only.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/checks.h"

namespace pyengine {

// P (2, K, B * n) contiguous on a CUDA device (the current one): the projections of x, then of y,
// segment s = k * B + b holding pair b's n points on direction k; sorted in place where that is
// cheapest. Returns (dist (B,), cx, cy (B, n, 1 or K) when need_grad, win (B,) for the max's
// gradient), as sliced_wasserstein_fwd does.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sw_compare_cuda(const OpChecks& op, at::Tensor P, int64_t B,
                                                                         int64_t n, int64_t K, double p, bool use_max,
                                                                         bool need_grad);

}  // namespace pyengine

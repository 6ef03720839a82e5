// Argument checks of the sliced Wasserstein ops, shared by the CPU (sliced_cpu.cpp) and CUDA
// (sliced_glue.cpp) implementations.
#pragma once

#include <cmath>

#include "common/checks.h"

namespace pyengine {

inline void check_p(const OpChecks& op, double p) {
  if (std::isinf(p))
    op.value_error("p = inf (the largest |difference| of sorted projections) is not supported; use a finite p >= 1");
  if (!(p >= 1.0)) op.value_error("p must be >= 1, got ", p);
}

// x, y (B, n, d); theta (K, d). Returns nothing; throws on the first problem.
inline void check_sw_fwd(const OpChecks& op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& theta,
                         double p) {
  op.dim(x, "x", 3, "(B, n, d)");
  op.dtype(x, "x", {at::kFloat, at::kDouble});
  op.dim(y, "y", 3, "(B, n, d)");
  op.same_dtype(y, "y", x, "x");
  op.same_device(y, "y", x, "x");
  if (y.sizes() != x.sizes())
    op.value_error("y has shape ", shape_str(y.sizes()), " but x has ", shape_str(x.sizes()), "; they must match");
  op.dim(theta, "theta", 2, "(K, d)");
  op.same_dtype(theta, "theta", x, "x");
  op.same_device(theta, "theta", x, "x");
  if (theta.size(1) != x.size(2))
    op.value_error("theta has ", theta.size(1), " dims per direction but the points have ", x.size(2));
  if (theta.size(0) < 1) op.value_error("theta holds no directions");
  if (x.size(0) > 0 && x.size(1) < 1) op.value_error("x and y hold no points");
  if (x.size(1) >= (int64_t(1) << 31) - 1) op.value_error("x has ", x.size(1), " points; at most 2**31 - 2 are supported");
  check_p(op, p);
}

// grad (B,); cx, cy (B, n, kg) with kg = 1 (max: the winning direction) or K (mean); theta (K, d);
// win (B,) int64 for the max. The range of win is checked by the caller (host scan on the CPU,
// in the kernel on CUDA).
inline void check_sw_bwd(const OpChecks& op, const at::Tensor& grad, const at::Tensor& cx, const at::Tensor& cy,
                         const at::Tensor& theta, const at::Tensor& win, bool use_max) {
  op.dim(theta, "theta", 2, "(K, d)");
  op.dtype(theta, "theta", {at::kFloat, at::kDouble});
  op.dim(cx, "cx", 3, "(B, n, k)");
  op.dim(cy, "cy", 3, "(B, n, k)");
  op.same_dtype(cx, "cx", theta, "theta");
  op.same_dtype(cy, "cy", theta, "theta");
  op.same_device(cx, "cx", theta, "theta");
  op.same_device(cy, "cy", theta, "theta");
  if (cy.sizes() != cx.sizes())
    op.value_error("cy has shape ", shape_str(cy.sizes()), " but cx has ", shape_str(cx.sizes()), "; they must match");
  const int64_t B = cx.size(0), K = theta.size(0);
  const int64_t want = use_max ? 1 : K;
  if (cx.size(2) != want) {
    if (use_max)
      op.value_error("cx has ", cx.size(2), " columns per point, but the max keeps only the winning direction's (1)");
    op.value_error("cx has ", cx.size(2), " columns per point, but the mean over ", K, " directions needs ", K);
  }
  op.dim(grad, "grad", 1, "(B,)");
  op.same_dtype(grad, "grad", theta, "theta");
  op.same_device(grad, "grad", theta, "theta");
  if (grad.size(0) != B) op.value_error("grad has ", grad.size(0), " entries but cx holds B = ", B, " pairs");
  if (use_max) {
    op.dim(win, "win", 1, "(B,)");
    op.dtype(win, "win", {at::kLong});
    op.same_device(win, "win", theta, "theta");
    if (win.size(0) != B) op.value_error("win has ", win.size(0), " entries but cx holds B = ", B, " pairs");
  }
}

}  // namespace pyengine

// Argument checks of the entropy ops, shared by the CPU (entropy_cpu.cpp) and CUDA
// (entropy_glue.cpp) implementations.
#pragma once

#include <vector>

#include "common/checks.h"

namespace pyengine {

// Validates x / channel_dim / per_position; returns the normalised channel dimension (1 for
// per-position neurons).
inline int64_t check_count_input(const OpChecks& op, const at::Tensor& x, int64_t channel_dim, bool per_position) {
  op.min_dim(x, "x", 2);
  op.floating(x, "x");
  const int64_t nd = x.dim();
  if (per_position) return 1;
  if (channel_dim < -nd || channel_dim >= nd)
    op.value_error("channel_dim=", channel_dim, " is out of range for x with ", nd, " dimensions");
  return channel_dim < 0 ? channel_dim + nd : channel_dim;
}

// The shape of the counts: (C,) per channel, x.shape[1:] per position.
inline std::vector<int64_t> counts_shape(const at::Tensor& x, int64_t cd, bool per_position) {
  if (per_position) return std::vector<int64_t>(x.sizes().begin() + 1, x.sizes().end());
  return {x.size(cd)};
}

// Accumulators given to the in-place ops: int64, contiguous, the counts' shape, x's device.
inline void check_accumulators(const OpChecks& op, const at::Tensor& counts, const at::Tensor& nan_count,
                               const at::Tensor& x, int64_t cd, bool per_position) {
  op.defined(counts, "counts");
  op.dtype(counts, "counts", {at::kLong});
  op.same_device(counts, "counts", x, "x");
  const auto want = counts_shape(x, cd, per_position);
  op.shape(counts, "counts", want, per_position ? "x.shape[1:]" : "one entry per channel of x");
  op.contiguous(counts, "counts");
  op.defined(nan_count, "nan_count");
  op.dtype(nan_count, "nan_count", {at::kLong});
  op.same_device(nan_count, "nan_count", x, "x");
  if (nan_count.numel() != 1) op.value_error("nan_count must hold one element, got shape ", shape_str(nan_count.sizes()));
}

inline void check_from_counts(const OpChecks& op, const at::Tensor& counts, int64_t n_samples, double eps) {
  op.defined(counts, "counts");
  op.dtype(counts, "counts", {at::kLong});
  if (n_samples <= 0) op.value_error("n_samples must be positive, got ", n_samples);
  if (!(eps >= 0.0 && eps < 0.5)) op.value_error("eps must be in [0, 0.5), got ", eps);
}

}  // namespace pyengine

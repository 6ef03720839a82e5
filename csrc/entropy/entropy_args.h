// Argument checks of the entropy ops, shared by the CPU (entropy_cpu.cpp) and CUDA
// (entropy_glue.cpp) implementations.
#pragma once

#include <cstdio>
#include <vector>

#include "common/checks.h"

namespace pyengine {

// Validates x / channel_dim / per_position; returns the normalised channel dimension (1 for
// per-position neurons). `xn` / `dn` name x and channel_dim in the messages.
inline int64_t check_count_input(const OpChecks& op, const at::Tensor& x, int64_t channel_dim, bool per_position,
                                 const char* xn = "x", const char* dn = "channel_dim") {
  op.min_dim(x, xn, 2);
  op.floating(x, xn);
  const int64_t nd = x.dim();
  if (per_position) return 1;
  if (channel_dim < -nd || channel_dim >= nd)
    op.value_error(dn, "=", channel_dim, " is out of range for ", xn, " with ", nd, " dimensions");
  return channel_dim < 0 ? channel_dim + nd : channel_dim;
}

// The shape of the counts: (C,) per channel, x.shape[1:] per position.
inline std::vector<int64_t> counts_shape(const at::Tensor& x, int64_t cd, bool per_position) {
  if (per_position) return std::vector<int64_t>(x.sizes().begin() + 1, x.sizes().end());
  return {x.size(cd)};
}

// The counts accumulator of x: int64, contiguous, the counts' shape, x's device. `cn` / `xn`
// name counts and x in the messages.
inline void check_counts_for(const OpChecks& op, const at::Tensor& counts, const at::Tensor& x, int64_t cd,
                             bool per_position, const char* cn = "counts", const char* xn = "x") {
  op.defined(counts, cn);
  op.dtype(counts, cn, {at::kLong});
  op.same_device(counts, cn, x, xn);
  const auto want = counts_shape(x, cd, per_position);
  if (counts.sizes() != at::IntArrayRef(want))
    op.value_error(cn, " has shape ", shape_str(counts.sizes()), " but must have shape ", shape_str(want), " (",
                   per_position ? "" : "one entry per channel of ", xn, per_position ? ".shape[1:]" : "", ")");
  op.contiguous(counts, cn);
}

// The NaN accumulator: one int64 element on x's device.
inline void check_nan_count(const OpChecks& op, const at::Tensor& nan_count, const at::Tensor& x, const char* xn = "x") {
  op.defined(nan_count, "nan_count");
  op.dtype(nan_count, "nan_count", {at::kLong});
  op.same_device(nan_count, "nan_count", x, xn);
  if (nan_count.numel() != 1) op.value_error("nan_count must hold one element, got shape ", shape_str(nan_count.sizes()));
}

// Accumulators given to the in-place ops: int64, contiguous, the counts' shape, x's device.
inline void check_accumulators(const OpChecks& op, const at::Tensor& counts, const at::Tensor& nan_count,
                               const at::Tensor& x, int64_t cd, bool per_position) {
  check_counts_for(op, counts, x, cd, per_position);
  check_nan_count(op, nan_count, x);
}

// entropy_counts_add_many_(counts, nan_count, xs, channel_dims, ...): as many counts and channel
// dims as tensors, every tensor and accumulator on one device. Returns the normalised channel
// dims. Checks everything before anything is counted.
inline std::vector<int64_t> check_count_many(const OpChecks& op, at::TensorList counts, const at::Tensor& nan_count,
                                             at::TensorList xs, at::IntArrayRef channel_dims, bool per_position) {
  if (counts.size() != xs.size() || channel_dims.size() != xs.size())
    op.value_error("counts has ", counts.size(), " tensors and channel_dims ", channel_dims.size(), " entries for ",
                   xs.size(), " tensors in xs; they must match");
  std::vector<int64_t> cds(xs.size());
  auto check_one = [&](size_t i, const char* xn, const char* cn, const char* dn) {
    cds[i] = check_count_input(op, xs[i], channel_dims[i], per_position, xn, dn);
    if (i > 0) op.same_device(xs[i], xn, xs[0], "xs[0]");
    check_counts_for(op, counts[i], xs[i], cds[i], per_position, cn, xn);
  };
  for (size_t i = 0; i < xs.size(); ++i) {
    try {  // the messages' names are formatted only for a failing tensor (a flush checks ~17 per step)
      check_one(i, "x", "counts", "channel_dim");
    } catch (const c10::Error&) {
      char xn[32], cn[32], dn[40];
      std::snprintf(xn, sizeof(xn), "xs[%zu]", i);
      std::snprintf(cn, sizeof(cn), "counts[%zu]", i);
      std::snprintf(dn, sizeof(dn), "channel_dims[%zu]", i);
      check_one(i, xn, cn, dn);  // raises the same error with the names
      throw;
    }
  }
  if (!xs.empty()) check_nan_count(op, nan_count, xs[0], "xs[0]");
  return cds;
}

inline void check_from_counts(const OpChecks& op, const at::Tensor& counts, int64_t n_samples, double eps) {
  op.defined(counts, "counts");
  op.dtype(counts, "counts", {at::kLong});
  if (n_samples <= 0) op.value_error("n_samples must be positive, got ", n_samples);
  if (!(eps >= 0.0 && eps < 0.5)) op.value_error("eps must be in [0, 0.5), got ", eps);
}

}  // namespace pyengine

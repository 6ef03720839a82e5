// Argument checks of the masked / sparse linear family and apply_masks_, shared by the CPU
// (masked_cpu.cpp) and CUDA (masked_glue.cpp, sparse_glue.cpp) implementations.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "masked/bitmap_format.h"

namespace pyengine {

// masked_linear(x (M, K), weight (N, K), mask (N, K) bool, bias (N,)?).
inline void check_masked_args(const OpChecks& op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& mask,
                              const c10::optional<at::Tensor>& bias) {
  op.dim(x, "x", 2, "(M, K)");
  op.floating(x, "x");
  op.dim(w, "weight", 2, "(N, K)");
  op.same_dtype(w, "weight", x, "x");
  op.same_device(w, "weight", x, "x");
  op.defined(mask, "mask");
  op.dtype(mask, "mask", {at::kBool});
  op.same_device(mask, "mask", x, "x");
  if (x.size(1) != w.size(1))
    op.value_error("x has ", x.size(1), " features in its last dimension but weight expects ", w.size(1));
  op.shape(mask, "mask", w.sizes(), "the weight's");
  if (bias.has_value() && bias->defined()) {
    op.dim(*bias, "bias", 1, "(N,)");
    op.same_dtype(*bias, "bias", x, "x");
    op.same_device(*bias, "bias", x, "x");
    if (bias->size(0) != w.size(0)) op.value_error("bias has ", bias->size(0), " entries but weight has ", w.size(0), " rows");
  }
}

inline void check_masked_bwd_args(const OpChecks& op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& mask) {
  check_masked_args(op, x, w, mask, c10::nullopt);
  op.dim(dy, "grad_out", 2, "(M, N)");
  op.same_dtype(dy, "grad_out", x, "x");
  op.same_device(dy, "grad_out", x, "x");
  op.shape(dy, "grad_out", {x.size(0), w.size(0)}, "rows of x, rows of weight");
}

inline void check_pack_args(const OpChecks& op, const at::Tensor& w) {
  op.dim(w, "weight", 2, "(N, K)");
  op.floating(w, "weight");
  if (w.numel() >= (int64_t(1) << 31)) op.value_error("weight has 2**31 or more entries; at most 2**31 - 1 are supported");
}

// sparse_linear_bitmap(x (M, K), bitmap int32 [tiles * 32], offsets int32 [tiles + 1], values [nnz],
// out_features, bias (N,)?): the tiled-bitmap format of masked/bitmap_kernels.h (16 x 64 tiles).
// Returns the number of tiles. The contents of offsets and bitmap are checked where they are read
// (the CPU kernel before it computes, the CUDA kernels tile by tile on the device).
inline int64_t check_bitmap_linear_args(const OpChecks& op, const at::Tensor& x, const at::Tensor& bitmap,
                                        const at::Tensor& offsets, const at::Tensor& values, int64_t out_features,
                                        const c10::optional<at::Tensor>& bias) {
  op.dim(x, "x", 2, "(M, in_features)");
  op.floating(x, "x");
  op.dim(bitmap, "bitmap", 1);
  op.dtype(bitmap, "bitmap", {at::kInt});
  op.dim(offsets, "offsets", 1);
  op.dtype(offsets, "offsets", {at::kInt});
  op.dim(values, "values", 1);
  op.same_dtype(values, "values", x, "x");
  op.same_device(bitmap, "bitmap", x, "x");
  op.same_device(offsets, "offsets", x, "x");
  op.same_device(values, "values", x, "x");
  if (out_features < 0) op.value_error("out_features must be >= 0, got ", out_features);
  const int64_t k = x.size(1);
  const int64_t tiles = ((out_features + kBmRows - 1) / kBmRows) * ((k + kBmCols - 1) / kBmCols);
  if (bitmap.numel() != tiles * kBmWords)
    op.value_error("bitmap holds ", bitmap.numel(), " words but a (", out_features, ", ", k, ") weight in ", kBmRows,
                   " x ", kBmCols, " tiles needs ", tiles * kBmWords, " (", kBmWords, " per tile)");
  if (offsets.numel() != tiles + 1)
    op.value_error("offsets holds ", offsets.numel(), " entries but ", tiles, " tiles need ", tiles + 1);
  if (values.numel() >= (int64_t(1) << 31)) op.value_error("more than 2**31 - 1 stored entries");
  if (bias.has_value() && bias->defined()) {
    op.dim(*bias, "bias", 1);
    op.same_dtype(*bias, "bias", x, "x");
    op.same_device(*bias, "bias", x, "x");
    if (bias->size(0) != out_features)
      op.value_error("bias has ", bias->size(0), " entries but out_features is ", out_features);
  }
  return tiles;
}

// apply_masks_(tensors, masks, mask_index): element sizes 1, 2, 4 or 8 bytes; one device.
inline void check_apply_masks_args(const OpChecks& op, at::TensorList tensors, at::TensorList masks,
                                   at::IntArrayRef mask_index) {
  if (tensors.size() != mask_index.size())
    op.value_error("mask_index has ", mask_index.size(), " entries for ", tensors.size(), " tensors");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    // names for the messages, formatted without iostreams (valid calls format nothing else)
    char tn[32], mn[32];
    std::snprintf(tn, sizeof(tn), "tensors[%zu]", i);
    op.defined(t, tn);
    const int64_t mi = mask_index[i];
    if (mi < 0 || mi >= static_cast<int64_t>(masks.size()))
      op.index_error("mask_index[", i, "] = ", mi, " is out of range for ", masks.size(), " masks");
    const at::Tensor& m = masks[mi];
    std::snprintf(mn, sizeof(mn), "masks[%lld]", static_cast<long long>(mi));
    op.defined(m, mn);
    op.dtype(m, mn, {at::kBool});
    if (t.device() != tensors[0].device())
      op.value_error(tn, " is on ", t.device(), " but tensors[0] is on ", tensors[0].device(), "; use one device");
    op.same_device(m, mn, t, tn);
    if (m.sizes() != t.sizes())
      op.value_error(tn, " has shape ", shape_str(t.sizes()), " but ", mn, " has ", shape_str(m.sizes()));
    if (!t.is_contiguous() || !m.is_contiguous()) op.value_error(tn, " and ", mn, " must be contiguous");
    const int64_t es = t.element_size();
    if (es != 1 && es != 2 && es != 4 && es != 8) op.type_error(tn, " has an unsupported dtype ", dtype_name(t.scalar_type()));
  }
  // No two tensors may share memory: the CUDA kernel rewrites whole 16-byte vectors, so two entries
  // on one buffer (handled by different blocks) could undo each other's zeros. Sorted by start
  // address, each must end before the next begins.
  std::vector<std::pair<uintptr_t, size_t>> spans;  // (start, index)
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].numel() > 0) spans.emplace_back(reinterpret_cast<uintptr_t>(tensors[i].data_ptr()), i);
  std::sort(spans.begin(), spans.end());
  for (size_t s = 1; s < spans.size(); ++s) {
    const at::Tensor& prev = tensors[spans[s - 1].second];
    const uintptr_t prev_end = spans[s - 1].first + static_cast<uintptr_t>(prev.numel() * prev.element_size());
    if (spans[s].first < prev_end)
      op.value_error("tensors[", spans[s - 1].second, "] and tensors[", spans[s].second,
                     "] overlap in memory; each tensor may be listed once");
  }
}

}  // namespace pyengine

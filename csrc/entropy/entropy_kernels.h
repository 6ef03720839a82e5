// Plain C++ interface of the entropy CUDA kernels (entropy_cuda.cu, compiled without torch
// headers) for the torch glue (entropy_glue.cpp). Pointers are device pointers; each launcher
// launches nothing when there is nothing to do and returns the launch status.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/device_error.h"
#include "common/dtype.h"

namespace pyengine {
namespace cuda {

// counts[0 .. n) = 0 and *nan_count = 0 in one launch (the fresh outputs of entropy_counts: one
// kernel where two zero fills were).
cudaError_t zero_counts(int64_t* counts, int64_t n, int64_t* nan_count, cudaStream_t stream);

// x viewed as `rows` rows of `row_len` contiguous elements. Column c belongs to neuron
// c / channel_div. Adds, per neuron, the number of its elements that are ON (x > 0, or x >= 0
// when inclusive; NaN never) into counts[neuron] (int64) and the number of NaNs into *nan_count.
// With y != nullptr also writes y = relu(x) at the same offsets (NaN stays NaN): the fused
// activation + count pass. One persistent, balanced launch.
cudaError_t entropy_counts_rows(DType dt, const void* x, void* y, int64_t rows, int64_t row_len,
                                int64_t channel_div, bool inclusive, int64_t* counts,
                                int64_t* nan_count, cudaStream_t stream);

// One tensor of entropy_counts_rows_many: x (dtype) seen as `rows` rows of `row_len` contiguous
// elements, neuron = column / channel_div, counts its int64 accumulator.
struct CountRowsDesc {
  DType dtype;
  const void* x;
  int64_t rows, row_len, channel_div;
  int64_t* counts;
};

// entropy_counts_rows (without the ReLU) for n tensors, all NaNs into *nan_count: one launch for
// the tensors of one dtype and load width (up to 32 of them), so a forward pass's activations
// are counted in one or two launches however many there are.
cudaError_t entropy_counts_rows_many(const CountRowsDesc* descs, int64_t n, bool inclusive, int64_t* nan_count,
                                     cudaStream_t stream);

// h[i] = binary entropy (bits) of p = counts[i] / n_samples with eps inside the logarithms:
// -(p log2(p + eps) + (1 - p) log2(1 - p + eps)), exactly 0 for a constant neuron (count 0 or
// n_samples); summary[4] = {mean h, mean h over non-constant neurons (0 if none), #count == n,
// #count == 0}. scratch: kEntropyScratchDoubles doubles of device memory. A count outside
// [0, n_samples] is reported in rec (common/device_error.h), its h is NaN and it is left out of
// the summary.
constexpr int kEntropyMaxBlocks = 1024;
constexpr int kEntropyScratchDoubles = 5 * kEntropyMaxBlocks;
cudaError_t entropy_from_counts(const int64_t* counts, int64_t numel, int64_t n_samples,
                                double eps, float* h, double* summary, double* scratch,
                                DeviceErrorRecord* rec, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyengine

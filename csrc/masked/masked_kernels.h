// Plain C++ interface of the masked linear CUDA kernels (masked_cuda.cu, compiled without torch
// headers) for the torch glue (masked_glue.cpp). Pointers are device pointers; each launcher
// launches nothing when there is nothing to do and returns the launch status.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace pyengine {
namespace cuda {

// dst[r, c] = src[r, c] * mask[r, c] for r < rows, c < cols (exactly the reference W * M,
// computed per element in the dtype). dst may equal src (in-place masking, same ld).
cudaError_t masked_copy(DType dt, void* dst, int64_t ldd, const void* src, int64_t lds,
                        const bool* mask, int64_t ldm, int64_t rows, int64_t cols,
                        cudaStream_t stream);

// apply_masks_: data[j] = 0 where mask[j] == 0, for every tensor, in one launch per
// kMaxMaskBatch tensors. elem_size is 1, 2, 4 or 8 bytes; both buffers contiguous.
struct MaskTensorDesc {
  void* data;
  const bool* mask;
  int64_t numel;
  int32_t elem_size;
};
constexpr int kMaxMaskBatch = 96;  // keeps the by-value kernel parameter under 4 KB
cudaError_t apply_masks(const MaskTensorDesc* descs, int64_t count, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyengine

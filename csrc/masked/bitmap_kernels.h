// Plain C++ interface of the tiled-bitmap sparse kernels (bitmap_cuda.cu, compiled without torch
// headers) for the torch glue (bitmap_glue.cpp).
//
// Format (pyengine/ops/masked.py, BitmapWeight): W (n, k) is cut into tiles of kBmRows x kBmCols
// (16 x 64), numbered t = rt * KT + kt (row tile rt, column tile kt; KT = ceil(k / 64)). Tile t has
// 32 int32 words in bitmap[32 t ...]: word 2 r + h holds row r of the tile, bit j of it the column
// 32 h + j. offsets[t] is the number of values stored before tile t (offsets has tiles + 1
// entries); a tile's values follow its set bits in word order, bits ascending. Bits of the padding
// (rows >= n, columns >= k) are not multiplied.
//
// The kernels check each tile on the device before reading its values: 0 <= offsets[t] <=
// offsets[t + 1] <= nnz and offsets[t + 1] - offsets[t] equal to the tile's set bits. A bad tile
// is reported in `rec` (common/device_error.h) and counted as zero, never followed.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/device_error.h"
#include "common/dtype.h"
#include "masked/bitmap_format.h"

namespace pyengine {
namespace cuda {

// Whether sparse_linear_bitmap_mma runs for this dtype on `device`: float16 / bfloat16 on compute
// capability 8.0 or newer (tensor cores through WMMA).
bool bitmap_mma_supported(DType dt, int device);

// out (m, n) row-major with row stride ldo = x (m, k) contiguous @ W^T (+ bias). Each block takes
// one row tile; its warps take the column tiles in turn, expand each tile's values into shared
// memory as a dense 16 x 64 tile and multiply it with the matching 16 x 64 slice of x on tensor
// cores (fp32 accumulation); x rows go 16 at a time (grid.y). Any m; meant for m <= 64.
cudaError_t sparse_linear_bitmap_mma(DType dt, const void* x, int64_t m, int64_t k, const int32_t* bitmap,
                                     const int32_t* offsets, const void* values, int64_t nnz, const void* bias,
                                     void* out, int64_t ldo, int64_t n, DeviceErrorRecord* rec, cudaStream_t stream);

// tile (nrows, k) contiguous = dense rows [row0, row0 + nrows) of W; row0 and nrows multiples of
// 16 (the last tile may end at n). For the GEMM path (larger m, float32 / float64).
cudaError_t bitmap_densify_rows(DType dt, const int32_t* bitmap, const int32_t* offsets, const void* values,
                                int64_t nnz, int64_t n, int64_t k, int64_t row0, int64_t nrows, void* tile,
                                DeviceErrorRecord* rec, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyengine

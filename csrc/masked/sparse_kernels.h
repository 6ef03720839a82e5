// Plain C++ interface of the packed sparse CUDA kernels (sparse_cuda.cu, compiled without torch
// headers) for the torch glue (sparse_glue.cpp). CSR: rowptr int32 [n + 1], colidx int16 or
// int32 [nnz], values [nnz]. The sparse_linear kernels check rowptr and colidx on the device and
// report a bad entry in `rec` (common/device_error.h) instead of following it.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/device_error.h"
#include "common/dtype.h"

namespace pyengine {
namespace cuda {

// pack_sparse, step 1: counts[r] = number of nonzero entries (w != 0, NaN counts as nonzero) of
// row r of the contiguous (n, k) matrix w.
cudaError_t pack_count_rows(DType dt, const void* w, int64_t n, int64_t k, int32_t* counts,
                            cudaStream_t stream);
// step 2: rowptr[0] = 0, rowptr[1 + r] = counts[0] + ... + counts[r] (a CUB device scan; the
// temporary storage comes from the caller, pack_scan_temp_bytes(n) bytes, may be 0).
size_t pack_scan_temp_bytes(int64_t n);
cudaError_t pack_scan(void* temp, size_t temp_bytes, const int32_t* counts, int32_t* rowptr,
                      int64_t n, cudaStream_t stream);
// step 3: writes the nonzeros of each row, columns ascending, at rowptr[r]...
cudaError_t pack_fill(DType dt, const void* w, int64_t n, int64_t k, const int32_t* rowptr,
                      void* colidx, bool colidx16, void* values, cudaStream_t stream);

// out (m, n) row-major with row stride ldo = x (m, k) contiguous @ W^T (+ bias); fp32
// accumulation; for m <= 64. x is read per nonzero as one vector of up to 16 rows, staged in
// shared memory or (m <= 16) from a transposed copy in xt_scratch (*scratch_elems elements of x's
// dtype from sparse_skinny_plan: 0 when the kernel will stage x in shared memory; may be nullptr:
// shared memory only); one row of x (m = 1) is read in place and needs no scratch. mode: 0 picks,
// 1 shared memory, 2 global (the transposed copy, or x itself for m = 1). Call it on the device that
// will run the product (the plan depends on its shared memory).
// sparse_skinny_plan: whether the skinny kernel can take m rows of k columns on the current device
// (more than 16 rows are staged in shared memory, which a row of x must fit: the device's opt-in
// limit decides), and the scratch it then needs.
bool sparse_skinny_plan(DType dt, int64_t m, int64_t k, int mode, int64_t* scratch_elems);
cudaError_t sparse_linear_skinny(DType dt, const void* x, int64_t m, int64_t k, const int32_t* rowptr,
                                 const void* colidx, bool colidx16, const void* values, int64_t nnz,
                                 const void* bias, void* out, int64_t ldo, int64_t n, void* xt_scratch, int mode,
                                 DeviceErrorRecord* rec, cudaStream_t stream);
// Whether sparse_linear_spmm_t supports this dtype (float32 only).
bool sparse_linear_spmm_supported(DType dt);
// outT (n, m) row-major = W @ x^T (+ bias[:, None]): a sparse x dense product tiled through shared
// memory, for larger m. Needs ascending column indices within each row (as pack_sparse writes
// them and PackedWeight checks); other orders stay memory-safe but give a wrong product.
// The caller transposes outT into the (m, n) result.
cudaError_t sparse_linear_spmm_t(DType dt, const void* x, int64_t m, int64_t k, const int32_t* rowptr,
                                 const void* colidx, bool colidx16, const void* values, int64_t nnz,
                                 const void* bias, void* out_t, int64_t n, DeviceErrorRecord* rec,
                                 cudaStream_t stream);
// tile (nrows, k) contiguous = dense rows [row0, row0 + nrows) of the n-row CSR matrix (zeros + scatter).
cudaError_t sparse_densify_rows(DType dt, const int32_t* rowptr, const void* colidx, bool colidx16,
                                const void* values, int64_t nnz, int64_t row0, int64_t nrows, int64_t n, int64_t k, void* tile,
                                DeviceErrorRecord* rec, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyengine

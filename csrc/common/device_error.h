// Index checks on the GPU without a host sync.
//
// A kernel that reads memory at an index taken from user data (CSR column indices and row
// pointers, bitmap tile offsets, the winning direction of sliced Wasserstein), or a value that
// must lie in a range (ON counts against their sample count), checks the index
// itself: a bad one is skipped (never a wild read) and described in a DeviceErrorRecord - one per
// device, in mapped pinned host memory, so the host can read it without synchronising. The first
// error wins.
// The torch glue raises it as a ValueError at the next natural sync point: the entry of the next
// pyengine CUDA op, pyengine.ops.check_device_errors() (which synchronises), or the construction
// of a PackedWeight. No torch headers here: included by .cu and glue files alike.
#pragma once

#include <cstdint>

namespace pyengine {
namespace cuda {

enum DeviceErrorCode : int32_t {
  kDevErrNone = 0,
  kDevErrColidx = 1,       // position = index into colidx, value = the column, bound = in_features
  kDevErrRowptrStart = 2,  // value = rowptr[0]
  kDevErrRowptrOrder = 3,  // position = row r with rowptr[r + 1] < rowptr[r]; value = rowptr[r + 1], bound = rowptr[r]
  kDevErrRowptrEnd = 4,    // position = row r whose end rowptr[r + 1] exceeds nnz, or the last row ending short of it; value, bound = nnz
  kDevErrWin = 5,          // position = pair b, value = win[b], bound = number of directions
  kDevErrTileRange = 6,    // position = tile t, value = offsets[t], bound = offsets[t + 1] (not 0 <= a <= b <= nnz)
  kDevErrTileCount = 7,    // position = tile t, value = offsets[t + 1] - offsets[t], bound = the tile's set bits
  kDevErrCount = 8,        // position = index into counts, value = the count, bound = n_samples (not in [0, bound])
  kDevErrColOrder = 9,     // position = index into colidx, value = its column, out of ascending order in its row
};

enum DeviceErrorOp : int32_t {
  kOpSparseLinear = 1,
  kOpSlicedBwd = 2,
  kOpSparseLinearBitmap = 3,
  kOpSlicedGrouped = 4,
  kOpEntropyFromCounts = 5,
};

struct DeviceErrorRecord {
  int32_t code;     // written last (after a system fence): non-zero means the fields are valid
  int32_t claimed;  // 1 once a thread has claimed the record
  int32_t op;
  int32_t pad;
  int64_t position;
  int64_t value;
  int64_t bound;
};

#if defined(__CUDACC__) || defined(PYENGINE_KERNEL_MODEL)  // the latter: tests/cuda_model
__device__ __forceinline__ void report_device_error(DeviceErrorRecord* rec, int32_t op, int32_t code,
                                                    int64_t position, int64_t value, int64_t bound) {
  if (rec == nullptr) return;
  if (atomicCAS(&rec->claimed, 0, 1) != 0) return;  // an earlier error is already recorded
  rec->op = op;
  rec->position = position;
  rec->value = value;
  rec->bound = bound;
  __threadfence_system();
  atomicExch(&rec->code, code);
}
#endif

}  // namespace cuda
}  // namespace pyengine

// Torch-side helpers of the CUDA glue files (<family>/<family>_glue.cpp): dtype mapping, the
// current stream, cached events, stream-capture detection and the device error record
// (common/device_error.h). Compiled by the host compiler; no kernels here.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include "common/checks.h"
#include "common/device_error.h"
#include "common/dtype.h"

namespace pyengine {
namespace cuda {

// The kernels' dtype for a floating tensor (the caller has checked it is one).
inline DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: return DType::kFloat32;
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Multiprocessors of `device` (cached).
int sm_count(int device);

// True while the current stream is being captured into a CUDA graph.
bool stream_capturing();

// An event cached per thread, device and slot (created once, reused).
cudaEvent_t cached_event(int device, int slot);

// Device pointer of `device`'s error record (allocated on first use).
DeviceErrorRecord* device_error_record(int device);

// Raises (ValueError) the error an earlier kernel recorded on `device`, if any, and clears it.
// Reads mapped host memory: no synchronisation. Every CUDA op calls this on entry.
void raise_pending_device_error(int device);

// Entry checks common to every CUDA op: `t` is a CUDA tensor; earlier device errors surface.
inline void cuda_entry(const OpChecks& op, const at::Tensor& t, const char* arg) {
  op.defined(t, arg);
  if (!t.is_cuda()) op.value_error(arg, " must be a CUDA tensor here, got one on ", t.device());
  (void)cudaGetLastError();  // a stale error of an earlier runtime call must not fail this op's launches
  raise_pending_device_error(t.get_device());
}

}  // namespace cuda
}  // namespace pyengine

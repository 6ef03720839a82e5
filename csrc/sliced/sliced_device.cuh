// Device helpers shared by the sliced Wasserstein kernel files (no torch headers here).
#pragma once

#include <cstdint>

#include "common/device.cuh"
#include "sliced/sliced_kernels.h"

namespace pyengine {
namespace cuda {
namespace sw_detail {

// Key that sorts after every other key (a stable sort keeps it behind real keys equal to it):
// the largest NaN bit pattern, which the radix sort's float twiddle maps to all ones.
template <typename T>
__device__ __forceinline__ T pad_key();
template <>
__device__ __forceinline__ float pad_key<float>() {
  return __int_as_float(0x7fffffff);
}
template <>
__device__ __forceinline__ double pad_key<double>() {
  return __longlong_as_double(0x7fffffffffffffffLL);
}

// |d|^p and d/dd of it, specialised for p = 1 and p = 2.
__device__ __forceinline__ double pow_abs(double d, double p) {
  const double a = fabs(d);
  if (p == 2.0) return a * a;
  if (p == 1.0) return a;
  return pow(a, p);
}
__device__ __forceinline__ double dpow_abs(double d, double p) {  // p |d|^(p-1) sign(d)
  if (p == 2.0) return 2.0 * d;
  const double sg = d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : 0.0);
  if (p == 1.0) return sg;
  return p * pow(fabs(d), p - 1.0) * sg;
}

// The kernels handle float32 and float64 (half inputs are promoted by the Python wrapper).
template <typename F>
inline
cudaError_t dispatch_sw(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    default: return cudaErrorInvalidValue;
  }
}


// Sum over a block of THREADS threads; valid on thread 0. sh: THREADS / 32 entries.
template <int THREADS, typename V>
__device__ __forceinline__ V block_sum(V v, V* sh) {
  v = detail::warp_sum(v);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  V r = V(0);
  if (threadIdx.x == 0) {
    for (int i = 0; i < THREADS / 32; ++i) r += sh[i];  // fixed order: deterministic
  }
  return r;
}

}  // namespace sw_detail
}  // namespace cuda
}  // namespace pyengine

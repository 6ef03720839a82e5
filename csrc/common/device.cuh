// Small device helpers shared by the CUDA kernel files of every family (no torch headers here).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "common/dtype.h"

// The two places where a kernel source meets the launch model; the CPU model of the execution
// model (tests/cuda_model/model.h) defines both its own way, so kernels and launchers run there too.
// Declares `name` as the block's dynamic shared memory, aligned to `align` bytes.
#ifndef PYENGINE_DYNAMIC_SMEM
#define PYENGINE_DYNAMIC_SMEM(name, align) extern __shared__ __align__(align) unsigned char name[]
#endif
// PYENGINE_LAUNCH(grid, block, smem, stream, kernel)(args...) is kernel<<<grid, block, smem, stream>>>(args...)
// (the kernel last, so its template arguments may hold commas).
#ifndef PYENGINE_LAUNCH
#define PYENGINE_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace pyengine {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type and conversions.
template <typename T>
struct Num {
  using acc = float;
  __device__ __forceinline__ static float to_acc(T v) { return static_cast<float>(v); }
  __device__ __forceinline__ static T from_acc(float v) { return static_cast<T>(v); }
};
template <>
struct Num<double> {
  using acc = double;
  __device__ __forceinline__ static double to_acc(double v) { return v; }
  __device__ __forceinline__ static double from_acc(double v) { return v; }
};
template <>
struct Num<__half> {
  using acc = float;
  __device__ __forceinline__ static float to_acc(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  __device__ __forceinline__ static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

// Unsigned integer of the same width (for bit copies and zero tests).
template <int Bytes>
struct UIntOf;
template <>
struct UIntOf<1> { using type = uint8_t; };
template <>
struct UIntOf<2> { using type = uint16_t; };
template <>
struct UIntOf<4> { using type = uint32_t; };
template <>
struct UIntOf<8> { using type = unsigned long long; };

// N elements of T loaded / stored as one aligned chunk.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

// Calls f(T{}) with T the C++ type of dt; returns what f returns.
template <typename F>
cudaError_t dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Device attributes, cached per device.
inline int current_device() {
  int d = 0;
  if (cudaGetDevice(&d) != cudaSuccess) d = 0;
  return d;
}
inline int device_attr_cached(cudaDeviceAttr attr, int slot, int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[3][kMaxDevices];
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[slot][device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  if (cudaDeviceGetAttribute(&v, attr, device) != cudaSuccess) {
    (void)cudaGetLastError();
    v = 0;
  }
  if (v > 0 && device >= 0 && device < kMaxDevices) cache[slot][device].store(v, std::memory_order_relaxed);
  return v;
}
inline int sm_count(int device) {
  const int v = device_attr_cached(cudaDevAttrMultiProcessorCount, 0, device);
  return v > 0 ? v : 1;
}
// Largest dynamic shared memory one block may opt into.
inline int max_smem_optin(int device) {
  const int v = device_attr_cached(cudaDevAttrMaxSharedMemoryPerBlockOptin, 1, device);
  return v > 0 ? v : 48 * 1024;
}

// Major compute capability of `device` (0 if unknown).
inline int compute_major(int device) { return device_attr_cached(cudaDevAttrComputeCapabilityMajor, 2, device); }

// Resident blocks of Kernel per multiprocessor at `threads` threads (the kernel's one block size)
// and no dynamic shared memory, asked once per kernel: launchers that run per activation or per
// layer must not ask every call. At least 1.
template <auto Kernel>
cudaError_t cached_occupancy(int threads, int& occ) {
  static std::atomic<int> cache{0};
  occ = cache.load(std::memory_order_relaxed);
  if (occ > 0) return cudaSuccess;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, Kernel, threads, 0);
  if (err != cudaSuccess) return err;
  if (occ < 1) occ = 1;
  cache.store(occ, std::memory_order_relaxed);
  return cudaSuccess;
}

// Sum over the 32 lanes of a warp (int, unsigned, long long, float or double).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

inline bool aligned_to(const void* p, size_t a) {
  return (reinterpret_cast<uintptr_t>(p) % a) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detail
}  // namespace cuda
}  // namespace pyengine

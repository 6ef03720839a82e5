// CUB's segmented radix sort for projections longer than the in-shared-memory sorts take
// (float32 n > 8192, float64 n > 4096). Its own file: CUB's device-wide sort is the slowest
// template to compile, and apart it builds in parallel with the rest.
#include <algorithm>
#include <cstdint>

#include <cub/device/device_segmented_radix_sort.cuh>

#include "sliced/sliced_device.cuh"

namespace pyengine {
namespace cuda {

using detail::ceil_div;
using detail::current_device;
using detail::sm_count;
using sw_detail::dispatch_sw;

namespace {

__global__ void iota_offsets_kernel(int32_t* __restrict__ iota, int32_t* __restrict__ offsets,
                                    int64_t n, int64_t segs2) {
  const int64_t total = n * segs2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    iota[i] = static_cast<int32_t>(i % n);
  }
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s <= segs2; s += stride) {
    offsets[s] = static_cast<int32_t>(s * n);
  }
}

template <typename T>
size_t segsort_bytes_t(int64_t n, int64_t segs2, bool with_perm) {
  size_t bytes = 0;
  const int items = static_cast<int>(n * segs2);
  const int nseg = static_cast<int>(segs2);
  const int32_t* off = nullptr;
  if (with_perm) {
    cub::DeviceSegmentedRadixSort::SortPairs(nullptr, bytes, static_cast<const T*>(nullptr),
                                             static_cast<T*>(nullptr), static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), items, nseg, off, off + 1);
  } else {
    cub::DeviceSegmentedRadixSort::SortKeys(nullptr, bytes, static_cast<const T*>(nullptr),
                                            static_cast<T*>(nullptr), items, nseg, off, off + 1);
  }
  return bytes;
}

template <typename T>
cudaError_t segsort_t(void* temp, size_t temp_bytes, const T* keys_in, T* keys_out,
                      int32_t* perm_out, int32_t* index_scratch, int64_t n, int64_t segs2,
                      cudaStream_t stream) {
  int32_t* iota = index_scratch;
  int32_t* offsets = index_scratch + n * segs2;
  const int64_t work = std::max<int64_t>(n * segs2, segs2 + 1);
  const int64_t grid = std::min<int64_t>(ceil_div(work, 256), static_cast<int64_t>(sm_count(current_device())) * 8);
  iota_offsets_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(iota, offsets, n, segs2);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  size_t bytes = temp_bytes;
  const int items = static_cast<int>(n * segs2);
  const int nseg = static_cast<int>(segs2);
  if (perm_out != nullptr) {
    err = cub::DeviceSegmentedRadixSort::SortPairs(temp, bytes, keys_in, keys_out, iota, perm_out,
                                                   items, nseg, offsets, offsets + 1, 0,
                                                   static_cast<int>(sizeof(T) * 8), stream);
  } else {
    err = cub::DeviceSegmentedRadixSort::SortKeys(temp, bytes, keys_in, keys_out, items, nseg,
                                                  offsets, offsets + 1, 0,
                                                  static_cast<int>(sizeof(T) * 8), stream);
  }
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace

size_t sw_segmented_sort_temp_bytes(DType dt, int64_t n, int64_t segs2, bool with_perm) {
  if (n <= 0 || segs2 <= 0) return 0;
  if (dt == DType::kFloat64) return segsort_bytes_t<double>(n, segs2, with_perm);
  return segsort_bytes_t<float>(n, segs2, with_perm);
}

cudaError_t sw_segmented_sort(DType dt, void* temp, size_t temp_bytes, const void* keys_in,
                              void* keys_out, int32_t* perm_out, int32_t* index_scratch,
                              int64_t n, int64_t segs2, cudaStream_t stream) {
  if (n <= 0 || segs2 <= 0) return cudaSuccess;
  if (n * segs2 >= 0x7fffffffLL) return cudaErrorInvalidValue;
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    return segsort_t<T>(temp, temp_bytes, static_cast<const T*>(keys_in), static_cast<T*>(keys_out),
                        perm_out, index_scratch, n, segs2, stream);
  });
}

}  // namespace cuda
}  // namespace pyengine

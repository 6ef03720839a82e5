// Kernels of the masked linear family: the masked weight copy (W * M, also applied in place to
// dW) and the multi-tensor apply_masks_. The sparse (packed) path is in sparse_cuda.cu.
// No torch headers here: see masked_kernels.h.
#include <algorithm>
#include <cstdint>

#include "common/device.cuh"
#include "masked/masked_kernels.h"

namespace pyengine {
namespace cuda {

using detail::aligned_to;
using detail::ceil_div;
using detail::current_device;
using detail::Num;
using detail::Pack;
using detail::sm_count;

namespace {

// ============================================================================ masked copy
constexpr int kCopyThreads = 256;
constexpr int64_t kCopyChunk = 2048;  // vectors per task (one row piece)

// dst[r, v] = src[r, v] * mask[r, v], VEC elements at a time; tasks = rows x chunks of a row.
template <typename T, int VEC>
__global__ void __launch_bounds__(kCopyThreads)
    masked_copy_kernel(T* dst, int64_t ldd, const T* src, int64_t lds, const uint8_t* mask,
                       int64_t ldm, int64_t cvec, int64_t chunks_per_row, int64_t tasks) {
  using P = Pack<T, VEC>;
  using MP = Pack<uint8_t, VEC>;
  using A = typename Num<T>::acc;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t r = task / chunks_per_row;
    const int64_t c0 = (task - r * chunks_per_row) * kCopyChunk;
    const int64_t c1 = c0 + kCopyChunk < cvec ? c0 + kCopyChunk : cvec;
    T* d = dst + r * ldd;
    const T* s = src + r * lds;
    const uint8_t* m = mask + r * ldm;
    for (int64_t v = c0 + threadIdx.x; v < c1; v += kCopyThreads) {
      P pv = reinterpret_cast<const P*>(s)[v];
      const MP mv = reinterpret_cast<const MP*>(m)[v];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        pv.v[i] = Num<T>::from_acc(Num<T>::to_acc(pv.v[i]) * (mv.v[i] ? A(1) : A(0)));
      }
      reinterpret_cast<P*>(d)[v] = pv;
    }
  }
}

template <typename T>
cudaError_t masked_copy_t(T* dst, int64_t ldd, const T* src, int64_t lds, const uint8_t* mask,
                          int64_t ldm, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (rows == 1 || (ldd == cols && lds == cols && ldm == cols)) {
    cols *= rows;  // one contiguous run
    rows = 1;
    ldd = lds = ldm = cols;
  }
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  const bool vec = aligned_to(dst, 16) && aligned_to(src, 16) && aligned_to(mask, VEC) &&
                   ldd % VEC == 0 && lds % VEC == 0 && ldm % VEC == 0 && cols % VEC == 0;
  const int64_t cvec = vec ? cols / VEC : cols;
  const int64_t cpr = ceil_div(cvec, kCopyChunk);
  const int64_t tasks = rows * cpr;
  const int64_t grid = std::min<int64_t>(tasks, static_cast<int64_t>(sm_count(current_device())) * 16);
  if (vec) {
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kCopyThreads, 0, stream, masked_copy_kernel<T, VEC>)(
        dst, ldd, src, lds, mask, ldm, cvec, cpr, tasks);
  } else {
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kCopyThreads, 0, stream, masked_copy_kernel<T, 1>)(
        dst, ldd, src, lds, mask, ldm, cvec, cpr, tasks);
  }
  return cudaGetLastError();
}

// ============================================================================ apply_masks_
constexpr int kMaskThreads = 256;
constexpr int64_t kMaskElemsPerBlock = kMaskThreads * 16 * 4;

struct MaskEntry {
  void* data;
  const uint8_t* mask;
  int64_t numel;
  int64_t block_begin;  // first virtual block of this tensor
  int32_t elem_size;
  int32_t vec_ok;
};
struct MaskBatch {
  int32_t count;
  int32_t pad;
  int64_t total_blocks;
  MaskEntry e[kMaxMaskBatch];
};

// 16 elements at p (16-byte aligned) with their 16 mask bytes at m (16-byte aligned).
template <typename U>
__device__ __forceinline__ void mask_group16(U* p, const uint8_t* m) {
  const uint4 mv = *reinterpret_cast<const uint4*>(m);
  const unsigned w[4] = {mv.x, mv.y, mv.z, mv.w};
  unsigned keep = 0;
#pragma unroll
  for (int q = 0; q < 16; ++q) {
    keep |= ((((w[q >> 2] >> ((q & 3) * 8)) & 0xffu) != 0u) ? 1u : 0u) << q;
  }
  if (keep == 0xffffu) return;
  constexpr int PER = 16 / static_cast<int>(sizeof(U));  // elements per 16-byte vector
  constexpr int NV = 16 / PER;                           // vectors per group of 16
  constexpr unsigned FULL = (1u << PER) - 1u;
  union V {
    uint4 u;
    U e[PER];
  };
#pragma unroll
  for (int v = 0; v < NV; ++v) {
    const unsigned kb = (keep >> (v * PER)) & FULL;
    if (kb == FULL) continue;
    uint4* vp = reinterpret_cast<uint4*>(p) + v;
    if (kb == 0u) {
      *vp = make_uint4(0u, 0u, 0u, 0u);
      continue;
    }
    V val;
    val.u = *vp;
#pragma unroll
    for (int q = 0; q < PER; ++q) {
      if (!((kb >> q) & 1u)) val.e[q] = U(0);
    }
    *vp = val.u;
  }
}

template <typename U>
__device__ __forceinline__ void mask_range(U* p, const uint8_t* m, int64_t begin, int64_t end,
                                           bool vec) {
  int64_t scalar_from = begin;
  if (vec) {
    const int64_t full_end = begin + ((end - begin) & ~int64_t(15));
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * 16; i < full_end;
         i += kMaskThreads * 16) {
      mask_group16(p + i, m + i);
    }
    scalar_from = full_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kMaskThreads) {
    if (!m[i]) p[i] = U(0);
  }
}

__global__ void __launch_bounds__(kMaskThreads) apply_masks_kernel(const __grid_constant__ MaskBatch batch) {
  for (int64_t vb = blockIdx.x; vb < batch.total_blocks; vb += gridDim.x) {
    int lo = 0, hi = batch.count - 1;
    while (lo < hi) {  // last entry with block_begin <= vb
      const int mid = (lo + hi + 1) >> 1;
      if (batch.e[mid].block_begin <= vb) lo = mid;
      else hi = mid - 1;
    }
    const MaskEntry& t = batch.e[lo];
    const int64_t begin = (vb - t.block_begin) * kMaskElemsPerBlock;
    const int64_t end = begin + kMaskElemsPerBlock < t.numel ? begin + kMaskElemsPerBlock : t.numel;
    const bool vec = t.vec_ok != 0;
    switch (t.elem_size) {
      case 1: mask_range(static_cast<uint8_t*>(t.data), t.mask, begin, end, vec); break;
      case 2: mask_range(static_cast<uint16_t*>(t.data), t.mask, begin, end, vec); break;
      case 4: mask_range(static_cast<uint32_t*>(t.data), t.mask, begin, end, vec); break;
      default: mask_range(static_cast<unsigned long long*>(t.data), t.mask, begin, end, vec); break;
    }
  }
}

}  // namespace

// ============================================================================ launchers
cudaError_t masked_copy(DType dt, void* dst, int64_t ldd, const void* src, int64_t lds,
                        const bool* mask, int64_t ldm, int64_t rows, int64_t cols,
                        cudaStream_t stream) {
  return detail::dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    return masked_copy_t<T>(static_cast<T*>(dst), ldd, static_cast<const T*>(src), lds,
                            reinterpret_cast<const uint8_t*>(mask), ldm, rows, cols, stream);
  });
}

cudaError_t apply_masks(const MaskTensorDesc* descs, int64_t count, cudaStream_t stream) {
  MaskBatch batch;  // ~10 KB, passed by value as the kernel parameter
  const int64_t grid_cap = static_cast<int64_t>(sm_count(current_device())) * 8;
  int64_t i = 0;
  while (i < count) {
    batch.count = 0;
    batch.pad = 0;
    batch.total_blocks = 0;
    for (; i < count && batch.count < kMaxMaskBatch; ++i) {
      const MaskTensorDesc& d = descs[i];
      if (d.numel <= 0) continue;
      if (d.elem_size != 1 && d.elem_size != 2 && d.elem_size != 4 && d.elem_size != 8) {
        return cudaErrorInvalidValue;
      }
      MaskEntry& e = batch.e[batch.count++];
      e.data = d.data;
      e.mask = reinterpret_cast<const uint8_t*>(d.mask);
      e.numel = d.numel;
      e.block_begin = batch.total_blocks;
      e.elem_size = d.elem_size;
      e.vec_ok = (aligned_to(d.data, 16) && aligned_to(d.mask, 16)) ? 1 : 0;
      batch.total_blocks += ceil_div(d.numel, kMaskElemsPerBlock);
    }
    if (batch.count == 0) break;
    const int64_t grid = std::min<int64_t>(batch.total_blocks, grid_cap);
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kMaskThreads, 0, stream, apply_masks_kernel)(batch);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace pyengine

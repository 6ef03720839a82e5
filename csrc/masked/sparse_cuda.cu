// Kernels of the packed sparse path: pack_sparse (count, scan, fill) and sparse_linear (a skinny
// warp-per-row kernel for small batches, a shared-memory SpMM for larger float32 batches, and a
// densify-tile kernel for the GEMM path). Every index read from the packed weight is checked on
// the device (common/device_error.h): a bad one is reported and skipped, never followed.
// No torch headers here: see sparse_kernels.h.
#include <algorithm>
#include <atomic>
#include <cstdint>

#ifndef PYENGINE_KERNEL_MODEL  // CUB's device scan needs nvcc; the CPU model leaves pack_scan out
#include <cub/device/device_scan.cuh>
#endif

#include "common/device.cuh"
#include "masked/sparse_kernels.h"

namespace pyengine {
namespace cuda {

using detail::aligned_to;
using detail::cached_occupancy;
using detail::ceil_div;
using detail::current_device;
using detail::kFullMask;
using detail::Num;
using detail::Pack;
using detail::sm_count;
using detail::UIntOf;

namespace {

constexpr int kWarpRowThreads = 256;  // 8 warps, one row each

// ============================================================================ pack_sparse
// Zero test on the bit pattern: +0 and -0 are zero, everything else (NaN included) is not,
// exactly like `w != 0`.
template <typename U>
__device__ __forceinline__ bool bits_nonzero(U v) {
  return static_cast<U>(v << 1) != U(0);
}


template <typename U>
__global__ void __launch_bounds__(kWarpRowThreads)
    pack_count_kernel(const U* __restrict__ w, int64_t n, int64_t k, int32_t* __restrict__ counts) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kWarpRowThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // whole warp
  const U* p = w + row * k;
  int c = 0;
  for (int64_t j = lane; j < k; j += 32) c += bits_nonzero(p[j]) ? 1 : 0;
  c = detail::warp_sum(c);
  if (lane == 0) counts[row] = c;
}

template <typename U, typename IdxT>
__global__ void __launch_bounds__(kWarpRowThreads)
    pack_fill_kernel(const U* __restrict__ w, int64_t n, int64_t k,
                     const int32_t* __restrict__ rowptr, IdxT* __restrict__ colidx,
                     U* __restrict__ values) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kWarpRowThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // whole warp
  const U* p = w + row * k;
  int64_t base = rowptr[row];
  const unsigned below = (1u << lane) - 1u;
  for (int64_t j0 = 0; j0 < k; j0 += 32) {
    const int64_t j = j0 + lane;
    U v = U(0);
    bool nz = false;
    if (j < k) {
      v = p[j];
      nz = bits_nonzero(v);
    }
    const unsigned b = __ballot_sync(kFullMask, nz);
    if (nz) {
      const int64_t pos = base + __popc(b & below);
      colidx[pos] = static_cast<IdxT>(j);
      values[pos] = v;
    }
    base += __popc(b);
  }
}

// ============================================================================ sparse linear
// Row r's stored entries [s, e), checked on the device: rowptr[0] = 0, rowptr non-decreasing and
// at most nnz. A bad pointer is reported (lane 0 of the row's warp) and clamped into [0, nnz].
__device__ __forceinline__ void clamp_row(int64_t s0, int64_t e0, int64_t row, int64_t last_row, int64_t nnz,
                                          DeviceErrorRecord* rec, bool reporter, int64_t& s, int64_t& e) {
  if (reporter) {
    if (row == 0 && s0 != 0) report_device_error(rec, kOpSparseLinear, kDevErrRowptrStart, 0, s0, 0);
    if (e0 < s0) report_device_error(rec, kOpSparseLinear, kDevErrRowptrOrder, row, e0, s0);
    else if (e0 > nnz || (row == last_row && e0 != nnz))  // past the entries, or short of them at the end
      report_device_error(rec, kOpSparseLinear, kDevErrRowptrEnd, row, e0, nnz);
  }
  s = s0 < 0 ? 0 : (s0 > nnz ? nnz : s0);
  e = e0 < s ? s : (e0 > nnz ? nnz : e0);
}
__device__ __forceinline__ void row_bounds(const int32_t* __restrict__ rowptr, int64_t row, int64_t last_row,
                                           int64_t nnz, DeviceErrorRecord* rec, bool reporter, int64_t& s, int64_t& e) {
  clamp_row(rowptr[row], rowptr[row + 1], row, last_row, nnz, rec, reporter, s, e);
}

// The bound of a 32-bit column test for rows of k entries: a negative index is >= 2^31 as
// unsigned, and with k >= 2^31 every non-negative one (IdxT has at most 32 bits) is in range.
__device__ __forceinline__ uint32_t col_bound(int64_t k) {
  return k < (int64_t(1) << 31) ? static_cast<uint32_t>(k) : (uint32_t(1) << 31);
}
// Whether c is a column of a row of x (kb = col_bound(k)).
template <typename IdxT>
__device__ __forceinline__ bool col_in_range(IdxT c, uint32_t kb) {
  static_assert(sizeof(IdxT) <= 4, "column indices of at most 32 bits");
  return static_cast<uint32_t>(static_cast<int32_t>(c)) < kb;
}
// The same test; a bad one is reported (and must not be read).
template <typename IdxT>
__device__ __forceinline__ bool col_ok(IdxT c, int64_t j, int64_t k, DeviceErrorRecord* rec) {
  const int64_t v = static_cast<int64_t>(c);
  if (col_in_range(c, col_bound(k))) return true;
  report_device_error(rec, kOpSparseLinear, kDevErrColidx, j, v, k);
  return false;
}

// ---- skinny: one warp per output row; x (at most MT rows) read as xs[col] = {x[0, col], ...,
// x[MT-1, col]} so one nonzero needs one vector load - from shared memory (SMEM: staged by each
// block) or from a transposed copy in global memory (L1/L2-resident; for wide x that would fill
// shared memory and cost every block a full copy). Both copies hold k + 1 columns, the last one
// zero: a column index out of range reads it with a zero weight, with no branch in the products
// (a branch per entry kept the gathers of a row from overlapping: on an H200, M = 1, 4096^2 bf16
// at 90% zeros, 6.20 us with it against 5.34 us without the check, benchmarks/micro/), and the
// row is scanned again for the report only when one was out of range.
constexpr int kSkinnyThreads = 512;
constexpr int kSkinnyWarps = kSkinnyThreads / 32;

template <typename T, typename IdxT, int MT, bool SMEM>
__global__ void __launch_bounds__(kSkinnyThreads)
    sparse_skinny_kernel(const T* __restrict__ x, int64_t ldx, int mv, int64_t k,
                         const Pack<T, MT>* __restrict__ xt, bool vec_loads, const int32_t* __restrict__ rowptr,
                         const IdxT* __restrict__ colidx, const T* __restrict__ values, int64_t nnz,
                         const T* __restrict__ bias, T* __restrict__ out, int64_t ldo, int64_t n,
                         DeviceErrorRecord* rec) {
  using A = typename Num<T>::acc;
  using XP = Pack<T, MT>;
  PYENGINE_DYNAMIC_SMEM(smem_raw, 16);
  XP* xs = reinterpret_cast<XP*>(smem_raw);
  const int lane = threadIdx.x & 31;
  const uint32_t kb = col_bound(k);
  const int64_t wstride = static_cast<int64_t>(gridDim.x) * kSkinnyWarps;
  int64_t row = static_cast<int64_t>(blockIdx.x) * kSkinnyWarps + (threadIdx.x >> 5);
  // the first row's pointers are requested before x is staged, so the two latencies overlap
  int64_t s0 = 0, e0 = 0;
  if (row < n) {
    s0 = rowptr[row];
    e0 = rowptr[row + 1];
  }
  if constexpr (SMEM) {
    // kStage columns per thread per batch, every load of a batch in flight before any store
    constexpr int kStage = MT <= 4 ? 8 : 4;
    if (threadIdx.x == 0) {  // the zero column that an out-of-range index reads
      XP z;
#pragma unroll
      for (int m = 0; m < MT; ++m) z.v[m] = Num<T>::from_acc(A(0));
      xs[k] = z;
    }
    for (int64_t c0 = threadIdx.x; c0 < k; c0 += static_cast<int64_t>(kSkinnyThreads) * kStage) {
      XP v[kStage];
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        const int64_t c = c0 + static_cast<int64_t>(u) * kSkinnyThreads;
#pragma unroll
        for (int m = 0; m < MT; ++m) v[u].v[m] = (m < mv && c < k) ? x[m * ldx + c] : Num<T>::from_acc(A(0));
      }
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        const int64_t c = c0 + static_cast<int64_t>(u) * kSkinnyThreads;
        if (c < k) xs[c] = v[u];
      }
    }
    __syncthreads();
  }
  for (; row < n; row += wstride) {
    A acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = A(0);
    bool bad = false;  // an index of this lane's entries was out of range
    auto add = [&](IdxT col, A wv) {
      const bool ok = col_in_range(col, kb);
      bad = bad || !ok;
      XP xv;
      if constexpr (SMEM || MT > 1) {  // the copy's zero column k
        const uint32_t c = ok ? static_cast<uint32_t>(col) : static_cast<uint32_t>(k);
        xv = SMEM ? xs[c] : xt[c];
      } else {  // one row of x read in place: no zero column, a select instead
        xv = xt[ok ? static_cast<uint32_t>(col) : 0u];
        if (!ok) xv.v[0] = Num<T>::from_acc(A(0));
      }
      wv = ok ? wv : A(0);
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m] += wv * Num<T>::to_acc(xv.v[m]);
    };
    int64_t s, e;
    clamp_row(s0, e0, row, n - 1, nnz, rec, lane == 0, s, e);
    // the next row's pointers are requested now, so their latency hides behind this row
    if (row + wstride < n) {
      s0 = rowptr[row + wstride];
      e0 = rowptr[row + wstride + 1];
    }
    // Every load of a pass is issued before any of its entries is used: a row of up to 64 groups
    // (512 entries) is one memory round trip, not one per code path. The loads of each pass are
    // predicated, in code every lane runs; the head and tail entries are added after the groups.
    if (vec_loads) {
      // groups of 8 entries at indices 8g .. 8g+7 are 16-byte aligned in colidx and values
      using CP = Pack<IdxT, 8>;
      using VP = Pack<T, 8>;
      const CP* cp = reinterpret_cast<const CP*>(colidx);
      const VP* vp = reinterpret_cast<const VP*>(values);
      int64_t a = (s + 7) & ~int64_t(7);  // first aligned index >= s
      const int64_t bnd = e & ~int64_t(7);  // last aligned index <= e
      if (a > e) a = e;                      // the row lies inside one group
      // head [s, a) on lanes 0..7, tail [max(bnd, a), e) on lanes 8..15 (each < 8 entries)
      int64_t h;
      bool hv;
      if (lane < 8) {
        h = s + lane;
        hv = h < a;
      } else {
        h = (bnd > a ? bnd : a) + (lane - 8);
        hv = lane < 16 && h < e;
      }
      IdxT hc = IdxT(0);
      T hw = Num<T>::from_acc(A(0));
      if (hv) {
        hc = colidx[h];
        hw = values[h];
      }
      const int64_t g1 = bnd >> 3;
      // One warp-uniform pass per 64 groups with both halves predicated: with the loop bound per
      // lane (g = first + lane while g < g1), ptxas put the second group's loads after the first
      // group's gathers - two memory round trips per row (SASS of nvcc 13.0, sm_90)
      for (int64_t gb = a >> 3; gb < g1; gb += 64) {
        const int64_t g = gb + lane;
        const bool one = g < g1, two = g + 32 < g1;
        CP c0{}, c1{};
        VP v0{}, v1{};
        if (one) {
          c0 = cp[g];
          v0 = vp[g];
        }
        if (two) {
          c1 = cp[g + 32];
          v1 = vp[g + 32];
        }
        if (one) {
#pragma unroll
          for (int q = 0; q < 8; ++q) add(c0.v[q], Num<T>::to_acc(v0.v[q]));
        }
        if (two) {
#pragma unroll
          for (int q = 0; q < 8; ++q) add(c1.v[q], Num<T>::to_acc(v1.v[q]));
        }
      }
      if (hv) add(hc, Num<T>::to_acc(hw));
    } else {
      for (int64_t j = s + lane; j < e; j += 64) {
        const bool two = j + 32 < e;
        const IdxT c0 = colidx[j];
        const T v0 = values[j];
        IdxT c1 = IdxT(0);
        T v1 = Num<T>::from_acc(A(0));
        if (two) {
          c1 = colidx[j + 32];
          v1 = values[j + 32];
        }
        add(c0, Num<T>::to_acc(v0));
        if (two) add(c1, Num<T>::to_acc(v1));
      }
    }
    if (__any_sync(kFullMask, bad)) {  // rare: find and report the row's first bad index
      for (int64_t j = s + lane; j < e; j += 32) {
        if (!col_ok(colidx[j], j, k, rec)) break;
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = detail::warp_sum(acc[m]);
    A mine = acc[0];
#pragma unroll
    for (int m = 1; m < MT; ++m) {
      if (lane == m) mine = acc[m];
    }
    if (lane < mv) {
      if (bias != nullptr) mine += Num<T>::to_acc(bias[row]);
      out[lane * ldo + row] = Num<T>::from_acc(mine);
    }
  }
}

// xt[c] = {x[0, c], ..., x[mv-1, c], 0, ...} for the global-memory variant, and xt[k] = 0 (the
// column an out-of-range index reads).
template <typename T, int MT>
__global__ void transpose_x_kernel(const T* __restrict__ x, int64_t ldx, int mv, int64_t k, Pack<T, MT>* __restrict__ xt) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c <= k;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Pack<T, MT> v;
#pragma unroll
    for (int m = 0; m < MT; ++m) v.v[m] = (m < mv && c < k) ? x[m * ldx + c] : Num<T>::from_acc(typename Num<T>::acc(0));
    xt[c] = v;
  }
}

template <typename T, typename IdxT, int MT>
cudaError_t launch_skinny(const T* x, int64_t m, int64_t k, bool use_smem, void* xt_scratch, bool vec_loads,
                          const int32_t* rowptr, const IdxT* colidx, const T* values, int64_t nnz,
                          const T* bias, T* out, int64_t ldo, int64_t n, DeviceErrorRecord* rec,
                          cudaStream_t stream) {
  const int dev = current_device();
  cudaError_t err;
  if (!use_smem) {  // one chunk (m <= MT): transposed copy in global memory
    auto kernel = sparse_skinny_kernel<T, IdxT, MT, false>;
    const Pack<T, MT>* xt = nullptr;
    if constexpr (MT == 1) {
      // one row of x is its own transpose (Pack<T, 1> is laid out as T): read it in place
      xt = reinterpret_cast<const Pack<T, 1>*>(x);
    } else {
      auto* xt_w = static_cast<Pack<T, MT>*>(xt_scratch);
      const int64_t tgrid = std::min<int64_t>(ceil_div(k + 1, 256), static_cast<int64_t>(sm_count(dev)) * 8);
      PYENGINE_LAUNCH(static_cast<unsigned>(tgrid), 256, 0, stream, transpose_x_kernel<T, MT>)(x, k, static_cast<int>(m), k, xt_w);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      xt = xt_w;
    }
    int occ = 0;
    err = cached_occupancy<sparse_skinny_kernel<T, IdxT, MT, false>>(kSkinnyThreads, occ);
    if (err != cudaSuccess) return err;
    const int64_t grid = std::min<int64_t>(ceil_div(n, kSkinnyWarps), static_cast<int64_t>(sm_count(dev)) * occ);
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kSkinnyThreads, 0, stream, kernel)(
        x, k, static_cast<int>(m), k, xt, vec_loads, rowptr, colidx, values, nnz, bias, out, ldo, n, rec);
    return cudaGetLastError();
  }
  auto kernel = sparse_skinny_kernel<T, IdxT, MT, true>;
  const size_t smem = static_cast<size_t>(k + 1) * sizeof(Pack<T, MT>);
  // the opt-in shared memory limit only ever grows; the occupancy is kept for the last size asked
  // (per device: the attribute belongs to the kernel in each device's context)
  static std::atomic<int64_t> smem_set[64];
  std::atomic<int64_t>* slot = (dev >= 0 && dev < 64) ? &smem_set[dev] : nullptr;
  if (smem > 48 * 1024 && (slot == nullptr || static_cast<int64_t>(smem) > slot->load(std::memory_order_relaxed))) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    if (slot != nullptr) slot->store(static_cast<int64_t>(smem), std::memory_order_relaxed);
  }
  static std::atomic<int64_t> occ_for_smem{-1};  // (smem << 16) | occupancy
  const int64_t packed = occ_for_smem.load(std::memory_order_relaxed);
  int occ = 0;
  if (packed >= 0 && (packed >> 16) == static_cast<int64_t>(smem)) {
    occ = static_cast<int>(packed & 0xffff);
  } else {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kSkinnyThreads, smem);
    if (err != cudaSuccess) return err;
    if (occ < 1) occ = 1;
    occ_for_smem.store((static_cast<int64_t>(smem) << 16) | occ, std::memory_order_relaxed);
  }
  const int64_t want = ceil_div(n, kSkinnyWarps);
  const int64_t grid = std::min<int64_t>(want, static_cast<int64_t>(sm_count(dev)) * occ);
  for (int64_t m0 = 0; m0 < m; m0 += MT) {
    const int mv = static_cast<int>(std::min<int64_t>(MT, m - m0));
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kSkinnyThreads, smem, stream, kernel)(
        x + m0 * k, k, mv, k, nullptr, vec_loads, rowptr, colidx, values, nnz, bias, out + m0 * ldo, ldo, n, rec);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The number of x rows one skinny launch takes for m rows (a power of two <= 16).
inline int skinny_mt(int64_t m) {
  const int64_t need = std::min<int64_t>(m, 16);
  int mt = 1;
  while (mt < need) mt *= 2;
  return mt;
}

// How the skinny kernel reads x for m rows of k columns of es-byte elements: chunks of mt rows,
// staged in shared memory (smem) or read from a transposed copy in global memory (one chunk;
// m = 1 reads x in place). have_xt: a scratch for the copy exists (or is not needed, m = 1).
// The glue sizes the scratch by this same plan (sparse_skinny_scratch_elems), so it allocates one
// only when the kernel will read it.
struct SkinnyPlan {
  int mt;
  bool smem;
  bool ok;  // false: x does not fit shared memory and no copy was given (the glue prevents this)
};
inline SkinnyPlan skinny_plan(int64_t m, int64_t k, int64_t es, int mode, bool have_xt, int dev) {
  const int64_t smem_cap = std::min<int64_t>(detail::max_smem_optin(dev), 200 * 1024);
  auto staged_bytes = [&](int mt) { return (k + 1) * mt * es; };
  int mt = skinny_mt(m);
  // shared-memory staging costs every block a copy of x: fine while it is small, and for a chunk
  // of 16 rows whenever it fits (the global-memory build of that kernel holds 74-86 registers, so one
  // block per SM as with staging; on an H100, 2026-11-27, bf16 4096 x 4096 at 90% zeros, M = 16:
  // staged 0.0187 ms warm / 0.0212 cold, global 0.0217 / 0.0239); otherwise the transposed global
  // copy (one chunk of <= 16 rows) is read through the caches instead
  bool use_smem = mode == 1 || (mode == 0 && (staged_bytes(mt) <= 48 * 1024 || (mt == 16 && staged_bytes(mt) <= smem_cap)));
  if (m > 16 || !have_xt) use_smem = true;
  if (use_smem) {
    while (mt > 1 && staged_bytes(mt) > smem_cap) mt /= 2;
    if (staged_bytes(mt) > smem_cap) {
      if (!have_xt || m > 16) return {mt, true, false};
      use_smem = false;
      mt = skinny_mt(m);
    }
  }
  return {mt, use_smem, true};
}

template <typename T, typename IdxT>
cudaError_t skinny_t(const T* x, int64_t m, int64_t k, const int32_t* rowptr, const IdxT* colidx, const T* values,
                     int64_t nnz, const T* bias, T* out, int64_t ldo, int64_t n, void* xt_scratch, int mode,
                     DeviceErrorRecord* rec, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  const SkinnyPlan plan = skinny_plan(m, k, sizeof(T), mode, xt_scratch != nullptr || m == 1, current_device());
  if (!plan.ok) return cudaErrorInvalidValue;
  const int mt = plan.mt;
  const bool use_smem = plan.smem;
  const bool vec_loads = aligned_to(colidx, 16) && aligned_to(values, 16);
  switch (mt) {
    case 1: return launch_skinny<T, IdxT, 1>(x, m, k, use_smem, xt_scratch, vec_loads, rowptr, colidx, values, nnz, bias, out, ldo, n, rec, stream);
    case 2: return launch_skinny<T, IdxT, 2>(x, m, k, use_smem, xt_scratch, vec_loads, rowptr, colidx, values, nnz, bias, out, ldo, n, rec, stream);
    case 4: return launch_skinny<T, IdxT, 4>(x, m, k, use_smem, xt_scratch, vec_loads, rowptr, colidx, values, nnz, bias, out, ldo, n, rec, stream);
    case 8: return launch_skinny<T, IdxT, 8>(x, m, k, use_smem, xt_scratch, vec_loads, rowptr, colidx, values, nnz, bias, out, ldo, n, rec, stream);
    default: return launch_skinny<T, IdxT, 16>(x, m, k, use_smem, xt_scratch, vec_loads, rowptr, colidx, values, nnz, bias, out, ldo, n, rec, stream);
  }
}

// ---- SpMM for larger m: outT (n, m) = W x^T. A block owns 128 rows of W (16 per warp) and 128
// rows of x; x is streamed through shared memory in chunks of 64 columns, transposed to
// xs[kk][m] so that one nonzero (broadcast to the warp) meets 4 consecutive m per lane.
// Relies on ascending column indices within each row (as pack_sparse writes them).
constexpr int kSpmmThreads = 256;
constexpr int kSpmmKC = 64;
constexpr int kSpmmMC = 128;
constexpr int kSpmmSX = kSpmmMC + 4;  // row stride of xs (floats): 16-byte aligned, conflict-free
constexpr int kSpmmRW = 16;           // W rows per warp
constexpr int kSpmmNR = (kSpmmThreads / 32) * kSpmmRW;

template <typename T, typename IdxT>
__global__ void __launch_bounds__(kSpmmThreads, 2)
    spmm_t_kernel(const T* __restrict__ x, int64_t m, int64_t k, const int32_t* __restrict__ rowptr,
                  const IdxT* __restrict__ colidx, const T* __restrict__ values, int64_t nnz,
                  const T* __restrict__ bias, T* __restrict__ out_t, int64_t n, int64_t ntiles_n,
                  DeviceErrorRecord* rec) {
  __shared__ __align__(16) float xs[kSpmmKC * kSpmmSX];
  __shared__ int s_end[kSpmmNR];
  __shared__ int s_cur[kSpmmNR];  // per-row cursor into the nonzeros (columns ascend)
  const int64_t tile_n = blockIdx.x % ntiles_n;
  const int64_t m0 = (blockIdx.x / ntiles_n) * kSpmmMC;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t rbase = tile_n * kSpmmNR;
  const int64_t row0 = rbase + warp * kSpmmRW;
  for (int i = threadIdx.x; i < kSpmmNR; i += kSpmmThreads) {
    const int64_t r = rbase + i;
    int64_t s = 0, e = 0;
    if (r < n) row_bounds(rowptr, r, n - 1, nnz, rec, true, s, e);
    s_cur[i] = static_cast<int>(s);
    s_end[i] = static_cast<int>(e);
  }
  float acc[kSpmmRW][4];
#pragma unroll
  for (int i = 0; i < kSpmmRW; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int64_t k0 = 0; k0 < k; k0 += kSpmmKC) {
    __syncthreads();  // the previous chunk is consumed (and s_cur / s_end are visible)
#pragma unroll 2
    for (int it = 0; it < (kSpmmKC * kSpmmMC / 4) / kSpmmThreads; ++it) {
      const int idx = threadIdx.x + it * kSpmmThreads;
      const int kk = idx % kSpmmKC;
      const int m4 = idx / kSpmmKC;
      const int64_t kg = k0 + kk;
      float v[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t mg = m0 + m4 * 4 + r;
        v[r] = (mg < m && kg < k) ? Num<T>::to_acc(x[mg * k + kg]) : 0.f;
      }
      *reinterpret_cast<float4*>(&xs[kk * kSpmmSX + m4 * 4]) = make_float4(v[0], v[1], v[2], v[3]);
    }
    __syncthreads();
    const int64_t kend = k0 + kSpmmKC;
#pragma unroll
    for (int i = 0; i < kSpmmRW; ++i) {
      int c = s_cur[warp * kSpmmRW + i];
      const int e = s_end[warp * kSpmmRW + i];
      while (c < e) {  // warp-uniform
        const int64_t j = static_cast<int64_t>(c) + lane;  // c + lane can pass 2^31 near the end
        bool ok = false;
        int col = 0;
        float wv = 0.f;
        if (j < e) {
          const IdxT cj = colidx[j];
          if (col_ok(cj, j, k, rec)) {
            col = static_cast<int>(cj);
            ok = col < kend;
            if (ok) wv = Num<T>::to_acc(values[j]);
          } else {  // consumed with weight 0, so the cursor moves past it
            col = static_cast<int>(k0);
            ok = true;
          }
        }
        const unsigned bal = __ballot_sync(kFullMask, ok);
        const int cnt = __popc(bal);  // a prefix of the lanes when columns ascend
        // Columns that do not ascend (possible only through the raw op: PackedWeight checks them)
        // show as lanes taken after a lane left for a later chunk, or as a column of an earlier
        // chunk: reported, so a product that used them is never returned quietly
        const unsigned gap = (bal & (bal + 1u)) != 0u ? static_cast<unsigned>(__ffs(~bal) - 1) : 32u;
        if (ok && j < e && ((static_cast<unsigned>(lane) > gap) || col < k0))
          report_device_error(rec, kOpSparseLinear, kDevErrColOrder, j, col, 0);
        for (int q = 0; q < cnt; ++q) {
          int cc = __shfl_sync(kFullMask, col, q) - static_cast<int>(k0);
          const float ww = __shfl_sync(kFullMask, wv, q);
          cc = cc < 0 ? 0 : (cc >= kSpmmKC ? kSpmmKC - 1 : cc);  // memory safety only
          const float4 xv = *reinterpret_cast<const float4*>(&xs[cc * kSpmmSX + lane * 4]);
          acc[i][0] += ww * xv.x;
          acc[i][1] += ww * xv.y;
          acc[i][2] += ww * xv.z;
          acc[i][3] += ww * xv.w;
        }
        c += cnt;
        if (cnt < 32) break;
      }
      __syncwarp();
      if (lane == 0) s_cur[warp * kSpmmRW + i] = c;
    }
  }
#pragma unroll
  for (int i = 0; i < kSpmmRW; ++i) {
    const int64_t r = row0 + i;
    if (r < n) {
      const float b = bias != nullptr ? Num<T>::to_acc(bias[r]) : 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t mg = m0 + lane * 4 + q;
        if (mg < m) out_t[r * m + mg] = Num<T>::from_acc(acc[i][q] + b);
      }
    }
  }
}

template <typename IdxT>
cudaError_t spmm_t_launch(const float* x, int64_t m, int64_t k, const int32_t* rowptr,
                          const IdxT* colidx, const float* values, int64_t nnz, const float* bias, float* out_t,
                          int64_t n, DeviceErrorRecord* rec, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  const int64_t ntn = ceil_div(n, kSpmmNR);
  const int64_t ntm = ceil_div(m, kSpmmMC);
  const int64_t grid = ntn * ntm;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  PYENGINE_LAUNCH(static_cast<unsigned>(grid), kSpmmThreads, 0, stream, spmm_t_kernel<float, IdxT>)(
      x, m, k, rowptr, colidx, values, nnz, bias, out_t, n, ntn, rec);
  return cudaGetLastError();
}

// ---- densify rows of the CSR matrix into a zeroed tile (for the GEMM path)
template <typename U, typename IdxT>
__global__ void __launch_bounds__(kWarpRowThreads)
    densify_kernel(const int32_t* __restrict__ rowptr, const IdxT* __restrict__ colidx,
                   const U* __restrict__ values, int64_t nnz, int64_t row0, int64_t nrows, int64_t last_row, int64_t k,
                   U* __restrict__ tile, DeviceErrorRecord* rec) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * kWarpRowThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= nrows) return;
  int64_t s, e;
  row_bounds(rowptr, row0 + r, last_row, nnz, rec, lane == 0, s, e);
  U* dst = tile + r * k;
  for (int64_t j = s + lane; j < e; j += 32) {
    const IdxT c = colidx[j];
    if (col_ok(c, j, k, rec)) dst[static_cast<int64_t>(c)] = values[j];
  }
}

template <int Bytes>
cudaError_t pack_count_es(const void* w, int64_t n, int64_t k, int32_t* counts, cudaStream_t stream) {
  using U = typename UIntOf<Bytes>::type;
  const int64_t grid = ceil_div(n * 32, kWarpRowThreads);
  PYENGINE_LAUNCH(static_cast<unsigned>(grid), kWarpRowThreads, 0, stream, pack_count_kernel<U>)(
      static_cast<const U*>(w), n, k, counts);
  return cudaGetLastError();
}

template <int Bytes>
cudaError_t pack_fill_es(const void* w, int64_t n, int64_t k, const int32_t* rowptr,
                         void* colidx, bool colidx16, void* values, cudaStream_t stream) {
  using U = typename UIntOf<Bytes>::type;
  const int64_t grid = ceil_div(n * 32, kWarpRowThreads);
  if (colidx16) {
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kWarpRowThreads, 0, stream, pack_fill_kernel<U, int16_t>)(
        static_cast<const U*>(w), n, k, rowptr, static_cast<int16_t*>(colidx), static_cast<U*>(values));
  } else {
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kWarpRowThreads, 0, stream, pack_fill_kernel<U, int32_t>)(
        static_cast<const U*>(w), n, k, rowptr, static_cast<int32_t*>(colidx), static_cast<U*>(values));
  }
  return cudaGetLastError();
}

template <int Bytes>
cudaError_t densify_es(const int32_t* rowptr, const void* colidx, bool colidx16,
                       const void* values, int64_t nnz, int64_t row0, int64_t nrows, int64_t last_row, int64_t k, void* tile,
                       DeviceErrorRecord* rec, cudaStream_t stream) {
  using U = typename UIntOf<Bytes>::type;
  const int64_t grid = ceil_div(nrows * 32, kWarpRowThreads);
  if (colidx16) {
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kWarpRowThreads, 0, stream, densify_kernel<U, int16_t>)(
        rowptr, static_cast<const int16_t*>(colidx), static_cast<const U*>(values), nnz, row0, nrows, last_row, k,
        static_cast<U*>(tile), rec);
  } else {
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kWarpRowThreads, 0, stream, densify_kernel<U, int32_t>)(
        rowptr, static_cast<const int32_t*>(colidx), static_cast<const U*>(values), nnz, row0, nrows, last_row, k,
        static_cast<U*>(tile), rec);
  }
  return cudaGetLastError();
}

}  // namespace

// ============================================================================ launchers
cudaError_t pack_count_rows(DType dt, const void* w, int64_t n, int64_t k, int32_t* counts,
                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (dtype_size(dt)) {
    case 2: return pack_count_es<2>(w, n, k, counts, stream);
    case 4: return pack_count_es<4>(w, n, k, counts, stream);
    case 8: return pack_count_es<8>(w, n, k, counts, stream);
  }
  return cudaErrorInvalidValue;
}

#ifndef PYENGINE_KERNEL_MODEL
size_t pack_scan_temp_bytes(int64_t n) {
  if (n <= 0) return 0;
  size_t bytes = 0;
  cub::DeviceScan::InclusiveSum(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                static_cast<int32_t*>(nullptr), static_cast<int>(n));
  return bytes;
}

cudaError_t pack_scan(void* temp, size_t temp_bytes, const int32_t* counts, int32_t* rowptr,
                      int64_t n, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(rowptr, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess || n <= 0) return err;
  size_t bytes = temp_bytes;
  err = cub::DeviceScan::InclusiveSum(temp, bytes, counts, rowptr + 1, static_cast<int>(n), stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}
#endif  // PYENGINE_KERNEL_MODEL

cudaError_t pack_fill(DType dt, const void* w, int64_t n, int64_t k, const int32_t* rowptr,
                      void* colidx, bool colidx16, void* values, cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  switch (dtype_size(dt)) {
    case 2: return pack_fill_es<2>(w, n, k, rowptr, colidx, colidx16, values, stream);
    case 4: return pack_fill_es<4>(w, n, k, rowptr, colidx, colidx16, values, stream);
    case 8: return pack_fill_es<8>(w, n, k, rowptr, colidx, colidx16, values, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t sparse_linear_skinny(DType dt, const void* x, int64_t m, int64_t k, const int32_t* rowptr,
                                 const void* colidx, bool colidx16, const void* values, int64_t nnz,
                                 const void* bias, void* out, int64_t ldo, int64_t n, void* xt_scratch, int mode,
                                 DeviceErrorRecord* rec, cudaStream_t stream) {
  return detail::dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    if (colidx16) {
      return skinny_t<T, int16_t>(static_cast<const T*>(x), m, k, rowptr, static_cast<const int16_t*>(colidx),
                                  static_cast<const T*>(values), nnz, static_cast<const T*>(bias),
                                  static_cast<T*>(out), ldo, n, xt_scratch, mode, rec, stream);
    }
    return skinny_t<T, int32_t>(static_cast<const T*>(x), m, k, rowptr, static_cast<const int32_t*>(colidx),
                                static_cast<const T*>(values), nnz, static_cast<const T*>(bias), static_cast<T*>(out),
                                ldo, n, xt_scratch, mode, rec, stream);
  });
}

bool sparse_skinny_plan(DType dt, int64_t m, int64_t k, int mode, int64_t* scratch_elems) {
  const SkinnyPlan plan = skinny_plan(m, k, dtype_size(dt), mode, true, current_device());
  // one row is read in place; more than 16 are always staged (the plan says so)
  *scratch_elems = plan.ok && !plan.smem && m > 1 ? (k + 1) * plan.mt : 0;
  return m <= 64 && plan.ok;
}

bool sparse_linear_spmm_supported(DType dt) { return dt == DType::kFloat32; }

cudaError_t sparse_linear_spmm_t(DType dt, const void* x, int64_t m, int64_t k, const int32_t* rowptr,
                                 const void* colidx, bool colidx16, const void* values, int64_t nnz,
                                 const void* bias, void* out_t, int64_t n, DeviceErrorRecord* rec,
                                 cudaStream_t stream) {
  if (dt != DType::kFloat32) return cudaErrorInvalidValue;
  const float* xf = static_cast<const float*>(x);
  const float* vf = static_cast<const float*>(values);
  const float* bf = static_cast<const float*>(bias);
  float* of = static_cast<float*>(out_t);
  if (colidx16) {
    return spmm_t_launch<int16_t>(xf, m, k, rowptr, static_cast<const int16_t*>(colidx), vf, nnz, bf, of, n, rec,
                                  stream);
  }
  return spmm_t_launch<int32_t>(xf, m, k, rowptr, static_cast<const int32_t*>(colidx), vf, nnz, bf, of, n, rec,
                                stream);
}

cudaError_t sparse_densify_rows(DType dt, const int32_t* rowptr, const void* colidx, bool colidx16,
                                const void* values, int64_t nnz, int64_t row0, int64_t nrows, int64_t n, int64_t k, void* tile,
                                DeviceErrorRecord* rec, cudaStream_t stream) {
  if (nrows <= 0 || k <= 0) return cudaSuccess;
  const int es = dtype_size(dt);
  cudaError_t err = cudaMemsetAsync(tile, 0, static_cast<size_t>(nrows) * k * es, stream);
  if (err != cudaSuccess) return err;
  switch (es) {
    case 2: return densify_es<2>(rowptr, colidx, colidx16, values, nnz, row0, nrows, n - 1, k, tile, rec, stream);
    case 4: return densify_es<4>(rowptr, colidx, colidx16, values, nnz, row0, nrows, n - 1, k, tile, rec, stream);
    case 8: return densify_es<8>(rowptr, colidx, colidx16, values, nnz, row0, nrows, n - 1, k, tile, rec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pyengine

// Kernels of the masked / sparse linear family: the masked tile copy used by masked_linear
// (forward and backward), pack_sparse (count, scan, fill), sparse_linear (skinny warp-per-row
// kernel, a shared-memory SpMM for larger batches, and a densify-tile kernel for the GEMM path)
// and the multi-tensor apply_masks_. No torch headers here: see launchers.h.
#include <algorithm>
#include <cstdint>

#include <cub/device/device_scan.cuh>

#include "cuda/device_utils.cuh"

namespace pyengine {
namespace cuda {

using detail::aligned_to;
using detail::ceil_div;
using detail::current_device;
using detail::kFullMask;
using detail::Num;
using detail::Pack;
using detail::sm_count;
using detail::UIntOf;

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
    masked_copy_kernel<T, VEC><<<static_cast<unsigned>(grid), kCopyThreads, 0, stream>>>(
        dst, ldd, src, lds, mask, ldm, cvec, cpr, tasks);
  } else {
    masked_copy_kernel<T, 1><<<static_cast<unsigned>(grid), kCopyThreads, 0, stream>>>(
        dst, ldd, src, lds, mask, ldm, cvec, cpr, tasks);
  }
  return cudaGetLastError();
}

// ============================================================================ pack_sparse
// Zero test on the bit pattern: +0 and -0 are zero, everything else (NaN included) is not,
// exactly like `w != 0`.
template <typename U>
__device__ __forceinline__ bool bits_nonzero(U v) {
  return static_cast<U>(v << 1) != U(0);
}

constexpr int kWarpRowThreads = 256;  // 8 warps, one row each

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
// ---- skinny: one warp per output row, x (at most 16 rows) staged in shared memory as
// xs[col] = {x[0, col], ..., x[MT-1, col]} so one nonzero needs one vector load.
constexpr int kSkinnyThreads = 512;
constexpr int kSkinnyWarps = kSkinnyThreads / 32;

template <typename T, typename IdxT, int MT>
__global__ void __launch_bounds__(kSkinnyThreads)
    sparse_skinny_kernel(const T* __restrict__ x, int64_t ldx, int mv, int64_t k, bool use_smem,
                         bool vec_loads, const int32_t* __restrict__ rowptr,
                         const IdxT* __restrict__ colidx, const T* __restrict__ values,
                         const T* __restrict__ bias, T* __restrict__ out, int64_t ldo, int64_t n) {
  using A = typename Num<T>::acc;
  using XP = Pack<T, MT>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  XP* xs = reinterpret_cast<XP*>(smem_raw);
  if (use_smem) {
    for (int64_t c = threadIdx.x; c < k; c += kSkinnyThreads) {
      XP v;
#pragma unroll
      for (int m = 0; m < MT; ++m) v.v[m] = (m < mv) ? x[m * ldx + c] : Num<T>::from_acc(A(0));
      xs[c] = v;
    }
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  const int64_t wstride = static_cast<int64_t>(gridDim.x) * kSkinnyWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kSkinnyWarps + (threadIdx.x >> 5);
       row < n; row += wstride) {
    A acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = A(0);
    auto add = [&](int64_t col, A wv) {
      if (use_smem) {
        const XP xv = xs[col];
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] += wv * Num<T>::to_acc(xv.v[m]);
      } else {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < mv) acc[m] += wv * Num<T>::to_acc(x[m * ldx + col]);
        }
      }
    };
    const int64_t s = rowptr[row];
    const int64_t e = rowptr[row + 1];
    if (vec_loads) {
      // groups of 8 nonzeros at indices 8g .. 8g+7 are 16-byte aligned in colidx and values
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
      if (hv) add(static_cast<int64_t>(colidx[h]), Num<T>::to_acc(values[h]));
      const int64_t g1 = bnd >> 3;
      int64_t g = (a >> 3) + lane;
      for (; g + 32 < g1; g += 64) {
        const CP c0 = cp[g];
        const VP v0 = vp[g];
        const CP c1 = cp[g + 32];
        const VP v1 = vp[g + 32];
#pragma unroll
        for (int q = 0; q < 8; ++q) add(static_cast<int64_t>(c0.v[q]), Num<T>::to_acc(v0.v[q]));
#pragma unroll
        for (int q = 0; q < 8; ++q) add(static_cast<int64_t>(c1.v[q]), Num<T>::to_acc(v1.v[q]));
      }
      if (g < g1) {
        const CP c0 = cp[g];
        const VP v0 = vp[g];
#pragma unroll
        for (int q = 0; q < 8; ++q) add(static_cast<int64_t>(c0.v[q]), Num<T>::to_acc(v0.v[q]));
      }
    } else {
      int64_t j = s + lane;
      for (; j + 32 < e; j += 64) {
        const int64_t c0 = colidx[j], c1 = colidx[j + 32];
        const A v0 = Num<T>::to_acc(values[j]), v1 = Num<T>::to_acc(values[j + 32]);
        add(c0, v0);
        add(c1, v1);
      }
      if (j < e) add(static_cast<int64_t>(colidx[j]), Num<T>::to_acc(values[j]));
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

template <typename T, typename IdxT, int MT>
cudaError_t launch_skinny(const T* x, int64_t m, int64_t k, bool use_smem, bool vec_loads,
                          const int32_t* rowptr, const IdxT* colidx, const T* values,
                          const T* bias, T* out, int64_t ldo, int64_t n, cudaStream_t stream) {
  auto kernel = sparse_skinny_kernel<T, IdxT, MT>;
  const size_t smem = use_smem ? static_cast<size_t>(k) * MT * sizeof(T) : 0;
  cudaError_t err;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  int occ = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kSkinnyThreads, smem);
  if (err != cudaSuccess) return err;
  if (occ < 1) occ = 1;
  const int64_t want = ceil_div(n, kSkinnyWarps);
  const int64_t grid = std::min<int64_t>(want, static_cast<int64_t>(sm_count(current_device())) * occ);
  for (int64_t m0 = 0; m0 < m; m0 += MT) {
    const int mv = static_cast<int>(std::min<int64_t>(MT, m - m0));
    kernel<<<static_cast<unsigned>(grid), kSkinnyThreads, smem, stream>>>(
        x + m0 * k, k, mv, k, use_smem, vec_loads, rowptr, colidx, values, bias, out + m0 * ldo,
        ldo, n);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, typename IdxT>
cudaError_t skinny_t(const T* x, int64_t m, int64_t k, const int32_t* rowptr,
                     const IdxT* colidx, const T* values, const T* bias, T* out, int64_t ldo,
                     int64_t n, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  const int dev = current_device();
  const int64_t smem_cap = std::min<int64_t>(detail::max_smem_optin(dev), 200 * 1024);
  const int64_t need = std::min<int64_t>(m, 16);
  int mt = 1;
  while (mt < need) mt *= 2;
  int mt_smem = mt;
  while (mt_smem > 1 && k * mt_smem * static_cast<int64_t>(sizeof(T)) > smem_cap) mt_smem /= 2;
  const bool use_smem = k * mt_smem * static_cast<int64_t>(sizeof(T)) <= smem_cap;
  if (use_smem) mt = mt_smem;
  const bool vec_loads = aligned_to(colidx, 16) && aligned_to(values, 16);
  switch (mt) {
    case 1: return launch_skinny<T, IdxT, 1>(x, m, k, use_smem, vec_loads, rowptr, colidx, values, bias, out, ldo, n, stream);
    case 2: return launch_skinny<T, IdxT, 2>(x, m, k, use_smem, vec_loads, rowptr, colidx, values, bias, out, ldo, n, stream);
    case 4: return launch_skinny<T, IdxT, 4>(x, m, k, use_smem, vec_loads, rowptr, colidx, values, bias, out, ldo, n, stream);
    case 8: return launch_skinny<T, IdxT, 8>(x, m, k, use_smem, vec_loads, rowptr, colidx, values, bias, out, ldo, n, stream);
    default: return launch_skinny<T, IdxT, 16>(x, m, k, use_smem, vec_loads, rowptr, colidx, values, bias, out, ldo, n, stream);
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
                  const IdxT* __restrict__ colidx, const T* __restrict__ values,
                  const T* __restrict__ bias, T* __restrict__ out_t, int64_t n, int64_t ntiles_n) {
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
    s_cur[i] = r < n ? rowptr[r] : 0;
    s_end[i] = r < n ? rowptr[r + 1] : 0;
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
        const int j = c + lane;
        bool ok = false;
        int col = 0;
        float wv = 0.f;
        if (j < e) {
          col = static_cast<int>(colidx[j]);
          ok = col < kend;
          if (ok) wv = Num<T>::to_acc(values[j]);
        }
        const unsigned bal = __ballot_sync(kFullMask, ok);
        const int cnt = __popc(bal);  // a prefix of the lanes: columns ascend
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
                          const IdxT* colidx, const float* values, const float* bias, float* out_t,
                          int64_t n, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  const int64_t ntn = ceil_div(n, kSpmmNR);
  const int64_t ntm = ceil_div(m, kSpmmMC);
  const int64_t grid = ntn * ntm;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  spmm_t_kernel<float, IdxT><<<static_cast<unsigned>(grid), kSpmmThreads, 0, stream>>>(
      x, m, k, rowptr, colidx, values, bias, out_t, n, ntn);
  return cudaGetLastError();
}

// ---- densify rows of the CSR matrix into a zeroed tile (for the GEMM path)
template <typename U, typename IdxT>
__global__ void __launch_bounds__(kWarpRowThreads)
    densify_kernel(const int32_t* __restrict__ rowptr, const IdxT* __restrict__ colidx,
                   const U* __restrict__ values, int64_t row0, int64_t nrows, int64_t k,
                   U* __restrict__ tile) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * kWarpRowThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= nrows) return;
  const int64_t s = rowptr[row0 + r];
  const int64_t e = rowptr[row0 + r + 1];
  U* dst = tile + r * k;
  for (int64_t j = s + lane; j < e; j += 32) dst[static_cast<int64_t>(colidx[j])] = values[j];
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

template <int Bytes>
cudaError_t pack_count_es(const void* w, int64_t n, int64_t k, int32_t* counts, cudaStream_t stream) {
  using U = typename UIntOf<Bytes>::type;
  const int64_t grid = ceil_div(n * 32, kWarpRowThreads);
  pack_count_kernel<U><<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(
      static_cast<const U*>(w), n, k, counts);
  return cudaGetLastError();
}

template <int Bytes>
cudaError_t pack_fill_es(const void* w, int64_t n, int64_t k, const int32_t* rowptr,
                         void* colidx, bool colidx16, void* values, cudaStream_t stream) {
  using U = typename UIntOf<Bytes>::type;
  const int64_t grid = ceil_div(n * 32, kWarpRowThreads);
  if (colidx16) {
    pack_fill_kernel<U, int16_t><<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(
        static_cast<const U*>(w), n, k, rowptr, static_cast<int16_t*>(colidx), static_cast<U*>(values));
  } else {
    pack_fill_kernel<U, int32_t><<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(
        static_cast<const U*>(w), n, k, rowptr, static_cast<int32_t*>(colidx), static_cast<U*>(values));
  }
  return cudaGetLastError();
}

template <int Bytes>
cudaError_t densify_es(const int32_t* rowptr, const void* colidx, bool colidx16,
                       const void* values, int64_t row0, int64_t nrows, int64_t k, void* tile,
                       cudaStream_t stream) {
  using U = typename UIntOf<Bytes>::type;
  const int64_t grid = ceil_div(nrows * 32, kWarpRowThreads);
  if (colidx16) {
    densify_kernel<U, int16_t><<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(
        rowptr, static_cast<const int16_t*>(colidx), static_cast<const U*>(values), row0, nrows, k,
        static_cast<U*>(tile));
  } else {
    densify_kernel<U, int32_t><<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(
        rowptr, static_cast<const int32_t*>(colidx), static_cast<const U*>(values), row0, nrows, k,
        static_cast<U*>(tile));
  }
  return cudaGetLastError();
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

cudaError_t sparse_linear_skinny(DType dt, const void* x, int64_t m, int64_t k,
                                 const int32_t* rowptr, const void* colidx, bool colidx16,
                                 const void* values, const void* bias, void* out, int64_t ldo,
                                 int64_t n, cudaStream_t stream) {
  return detail::dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    if (colidx16) {
      return skinny_t<T, int16_t>(static_cast<const T*>(x), m, k, rowptr,
                                  static_cast<const int16_t*>(colidx), static_cast<const T*>(values),
                                  static_cast<const T*>(bias), static_cast<T*>(out), ldo, n, stream);
    }
    return skinny_t<T, int32_t>(static_cast<const T*>(x), m, k, rowptr,
                                static_cast<const int32_t*>(colidx), static_cast<const T*>(values),
                                static_cast<const T*>(bias), static_cast<T*>(out), ldo, n, stream);
  });
}

bool sparse_linear_spmm_supported(DType dt) { return dt == DType::kFloat32; }

cudaError_t sparse_linear_spmm_t(DType dt, const void* x, int64_t m, int64_t k,
                                 const int32_t* rowptr, const void* colidx, bool colidx16,
                                 const void* values, const void* bias, void* out_t, int64_t n,
                                 cudaStream_t stream) {
  if (dt != DType::kFloat32) return cudaErrorInvalidValue;
  const float* xf = static_cast<const float*>(x);
  const float* vf = static_cast<const float*>(values);
  const float* bf = static_cast<const float*>(bias);
  float* of = static_cast<float*>(out_t);
  if (colidx16) {
    return spmm_t_launch<int16_t>(xf, m, k, rowptr, static_cast<const int16_t*>(colidx), vf, bf, of, n, stream);
  }
  return spmm_t_launch<int32_t>(xf, m, k, rowptr, static_cast<const int32_t*>(colidx), vf, bf, of, n, stream);
}

cudaError_t sparse_densify_rows(DType dt, const int32_t* rowptr, const void* colidx,
                                bool colidx16, const void* values, int64_t row0, int64_t nrows,
                                int64_t k, void* tile, cudaStream_t stream) {
  if (nrows <= 0 || k <= 0) return cudaSuccess;
  const int es = dtype_size(dt);
  cudaError_t err = cudaMemsetAsync(tile, 0, static_cast<size_t>(nrows) * k * es, stream);
  if (err != cudaSuccess) return err;
  switch (es) {
    case 2: return densify_es<2>(rowptr, colidx, colidx16, values, row0, nrows, k, tile, stream);
    case 4: return densify_es<4>(rowptr, colidx, colidx16, values, row0, nrows, k, tile, stream);
    case 8: return densify_es<8>(rowptr, colidx, colidx16, values, row0, nrows, k, tile, stream);
  }
  return cudaErrorInvalidValue;
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
    apply_masks_kernel<<<static_cast<unsigned>(grid), kMaskThreads, 0, stream>>>(batch);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace pyengine

// Kernels of the tiled-bitmap sparse format (masked/bitmap_kernels.h): a small-batch product that
// loads W as sparse and multiplies it as dense on tensor cores, and a densify kernel for the GEMM
// path. Every tile's value range is checked on the device before it is read (a bad tile is
// reported and counted as zero). No torch headers here: see bitmap_kernels.h.
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common/device.cuh"
#include "common/env.h"
#include "masked/bitmap_kernels.h"

namespace pyengine {
namespace cuda {

using detail::aligned_to;
using detail::ceil_div;
using detail::current_device;
using detail::kFullMask;
using detail::Num;
using detail::Pack;
using detail::UIntOf;

namespace {

constexpr int kLd = kBmCols + 8;  // row pitch (elements) of the staged W tile and x slice
constexpr int kMaxWarps = 16;     // warps per block of the product kernel

// One warp's shared memory in the product kernel, for R row tiles that share each x slice. Offsets
// (multiples of 2304 bytes) and the size (6656 bytes for R = 1, 11008 for R = 2) are multiples of 32
// bytes, as WMMA loads and stores need.
template <typename T, int R>
struct WarpBuf {
  T a[R][kBmRows * kLd];      // the expanded W tiles, row-major: a[rr][r * kLd + c] = W[row, k0 + c]
  T b[kBmRows * kLd];         // the x slice: b[i * kLd + c] = x[m0 + i, k0 + c] (0 past m or k)
  T v[R * kBmRows * kBmCols];  // the group's stored values, staged by coalesced loads
};

// Lane's share of one tile: its word (row lane / 2, columns 32 (lane % 2) ...), the exclusive prefix
// of set bits over the lanes before it, and the tile's total. Whole warp.
__device__ __forceinline__ void tile_scan(uint32_t word, int lane, int& pre, int& total) {
  const int cnt = __popc(word);
  int inc = cnt;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(kFullMask, inc, o);
    if (lane >= o) inc += v;
  }
  total = __shfl_sync(kFullMask, inc, 31);
  pre = inc - cnt;
}

// Whether tile t's values [o0, o1) can be read: a range inside [0, nnz] holding exactly the
// tile's set bits. A bad tile is reported (by lane 0) and must be skipped. o0, o1 and total are
// the same on every lane, so the answer is too.
__device__ __forceinline__ bool tile_ok(int64_t t, int32_t o0, int32_t o1, int total, int64_t nnz,
                                        DeviceErrorRecord* rec, int lane) {
  if (o0 < 0 || o1 < o0 || static_cast<int64_t>(o1) > nnz) {
    if (lane == 0) report_device_error(rec, kOpSparseLinearBitmap, kDevErrTileRange, t, o0, o1);
    return false;
  }
  if (o1 - o0 != total) {
    if (lane == 0) report_device_error(rec, kOpSparseLinearBitmap, kDevErrTileCount, t, o1 - o0, total);
    return false;
  }
  return true;
}

// The bits of a lane's word that lie inside the matrix: columns c0 .. c0 + 31 against k, and the row.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
__device__ __forceinline__ uint32_t inside_bits(int64_t c0, int64_t k, bool row_inside) {
  if (!row_inside || c0 >= k) return 0u;
  const int64_t vc = k - c0;
  return vc >= 32 ? 0xffffffffu : ((1u << vc) - 1u);
}
#endif

// ============================================================================ product
// Block = R row tiles (16 R rows of W) and 16 rows of x (grid.y); warp w takes column tiles w,
// w + nwarps, ... in groups of up to kGroup, each column tile for all R row tiles at once (one load
// of the x slice serves R tiles). For a group, every tile's bitmap word and offsets are requested at
// once; the column tiles whose values fit the warp's value buffer together (the first always does:
// R tiles hold at most R x 16 x 64 values) are checked and their values staged with one round of
// coalesced loads, so a warp waits for memory about twice per group instead of twice per tile.
// Then per column tile: the x slice is stored in shared memory, the lane's 32 entries of each W
// tile are zeroed and its set bits alone are written (a loop over set bits: about 3 at 90% sparsity
// instead of 32 selects), and 4 WMMA 16x16x16 products per row tile accumulate
// C[rr][i][j] = sum_c W[row0 + 16 rr + i, c] x[m0 + j, c] in fp32. The warps' C are summed through
// shared memory at the end and written with the bias.
//
// R = 1, MinBlocks = 2 (the default) caps the registers so that two 16-warp blocks fit an SM: 256
// row tiles (a 4096-row W) then run in one wave on an H100 / H200. MinBlocks = 1 fits one block per
// SM (two waves for that W: 0.74x of dense on an H200 with the kernel before the groups). R = 2 (one
// block per SM, 128 blocks for that W) halves the reads of x, which at 16 rows of x are 2 KB per
// W tile of about 0.3 KB: 32 MB from L2 for that W at R = 1.
constexpr int kGroup = 4;                    // column tiles a warp stages together
constexpr int kStageBatch = 4;               // value loads per lane in flight

template <typename T, int MinBlocks, int R>
__global__ void __launch_bounds__(kMaxWarps * 32, MinBlocks)
    bitmap_mma_kernel(const T* __restrict__ x, int64_t m, int64_t k, const uint32_t* __restrict__ bitmap,
                      const int32_t* __restrict__ offsets, const T* __restrict__ values, int64_t nnz,
                      const T* __restrict__ bias, T* __restrict__ out, int64_t ldo, int64_t n, int64_t kt_count,
                      bool x_vec, DeviceErrorRecord* rec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // WMMA on these element types needs compute capability 8.0: the host launches this only on such
  // a device and only from an image compiled for one (bitmap_mma_launch checks its ptxVersion).
#else
  namespace wmma = nvcuda::wmma;
  using XP = Pack<T, 8>;
  constexpr int kValueCap = R * kBmRows * kBmCols;  // values the warp's buffer holds
  PYENGINE_DYNAMIC_SMEM(smem_raw, 128);
  const int warp = static_cast<int>(threadIdx.x >> 5), lane = static_cast<int>(threadIdx.x & 31);
  const int nwarps = static_cast<int>(blockDim.x >> 5);
  WarpBuf<T, R>& buf = reinterpret_cast<WarpBuf<T, R>*>(smem_raw)[warp];
  const int64_t rt0 = static_cast<int64_t>(blockIdx.x) * R;  // the block's first row tile
  const int64_t nt = (n + kBmRows - 1) / kBmRows;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 16;
  const int mv = static_cast<int>(m - m0 < 16 ? m - m0 : 16);
  const int r = lane >> 1, h = lane & 1;
  const T zero = Num<T>::from_acc(0.0f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) wmma::fill_fragment(acc[rr], 0.0f);

  for (int64_t kt0 = warp; kt0 < kt_count;) {
    uint32_t words[kGroup][R];
    int32_t o0s[kGroup][R], o1s[kGroup][R];
#pragma unroll
    for (int j = 0; j < kGroup; ++j)
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        const int64_t kt = kt0 + static_cast<int64_t>(j) * nwarps;
        words[j][rr] = 0;
        o0s[j][rr] = 0;
        o1s[j][rr] = 0;
        if (kt < kt_count && rt0 + rr < nt) {
          const int64_t t = (rt0 + rr) * kt_count + kt;
          words[j][rr] = bitmap[t * kBmWords + lane];
          o0s[j][rr] = offsets[t];
          o1s[j][rr] = offsets[t + 1];
        }
      }
    // which column tiles join (warp-uniform) and each tile's place in buf.v; a bad tile joins with no
    // values (reported once, here) and is multiplied as zero; a row tile past n has no bits
    int bases[kGroup][R];
    unsigned good = 0;  // bit j R + rr: tile (j, rr)'s values are staged
    int count = 0, used = 0;
    bool open = true;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int64_t kt = kt0 + static_cast<int64_t>(j) * nwarps;
      int totals[R], need = 0;
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        totals[rr] = (open && kt < kt_count) ? detail::warp_sum(__popc(words[j][rr])) : 0;  // uniform
        need += totals[rr];
      }
      open = open && kt < kt_count && used + need <= kValueCap;
      if (open) ++count;
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        bases[j][rr] = used;
        if (open && rt0 + rr < nt &&
            tile_ok((rt0 + rr) * kt_count + kt, o0s[j][rr], o1s[j][rr], totals[rr], nnz, rec, lane)) {
          good |= 1u << (j * R + rr);
          used += totals[rr];
        }
      }
    }
    // stage the group's values: element i of buf.v comes from the last good tile whose base <= i
    // (offsets are int32 and a good tile lies inside [0, nnz], so int32 indices suffice)
    for (int i0 = 0; i0 < used; i0 += 32 * kStageBatch) {
      T vr[kStageBatch];
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int i = i0 + 32 * u + lane;
        int src = 0;
#pragma unroll
        for (int j = 0; j < kGroup; ++j)
#pragma unroll
          for (int rr = 0; rr < R; ++rr) {
            if (((good >> (j * R + rr)) & 1u) && i >= bases[j][rr]) src = o0s[j][rr] + (i - bases[j][rr]);
          }
        vr[u] = i < used ? values[src] : zero;
      }
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int i = i0 + 32 * u + lane;
        if (i < used) buf.v[i] = vr[u];
      }
    }
    __syncwarp();
    // the column tiles in turn, each taking the front of words / bases / good, which then shift
    // down (a run-time index would put the arrays in local memory)
    for (int j = 0; j < count; ++j) {  // warp-uniform
      const int64_t kt = kt0 + static_cast<int64_t>(j) * nwarps;
      const int64_t c0 = kt * kBmCols + 32 * h;  // this lane's first column
      // x[m0 + r, c0 .. c0 + 31] into the lane's row of the B buffer (0 past m and k)
      XP zp;
#pragma unroll
      for (int e = 0; e < 8; ++e) zp.v[e] = zero;
      T* const b_mine = buf.b + r * kLd + 32 * h;
      const bool x_row = r < mv && c0 < k;
      const T* xp = x_row ? x + (m0 + r) * k + c0 : x;
      if (x_row && x_vec && c0 + 32 <= k) {
#pragma unroll
        for (int q = 0; q < 4; ++q) reinterpret_cast<XP*>(b_mine)[q] = reinterpret_cast<const XP*>(xp)[q];
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          XP v = zp;
          if (x_row) {
#pragma unroll
            for (int e = 0; e < 8; ++e) v.v[e] = (c0 + 8 * q + e < k) ? xp[8 * q + e] : zero;
          }
          reinterpret_cast<XP*>(b_mine)[q] = v;
        }
      }
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        // the lane's 32 entries of row tile rr cleared, then its set bits written; a set bit outside
        // the matrix takes its value slot but stays 0
        T* const a_mine = buf.a[rr] + r * kLd + 32 * h;
#pragma unroll
        for (int q = 0; q < 4; ++q) reinterpret_cast<XP*>(a_mine)[q] = zp;
        const bool ok = (good >> rr) & 1u;
        int pre = 0, total = 0;
        tile_scan(words[0][rr], lane, pre, total);
        const uint32_t keep = ok ? inside_bits(c0, k, (rt0 + rr) * kBmRows + r < n) : 0u;
        uint32_t bits = ok ? words[0][rr] : 0u;
        int p = bases[0][rr] + pre;
        while (bits != 0u) {
          const int b = __ffs(static_cast<int>(bits)) - 1;
          if ((keep >> b) & 1u) a_mine[b] = buf.v[p];
          ++p;
          bits &= bits - 1u;
        }
      }
      __syncwarp();
#pragma unroll
      for (int kk = 0; kk < kBmCols / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, buf.b + 16 * kk, kLd);
#pragma unroll
        for (int rr = 0; rr < R; ++rr) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, buf.a[rr] + 16 * kk, kLd);
          wmma::mma_sync(acc[rr], fa, fb, acc[rr]);
        }
      }
      __syncwarp();  // the buffers are rewritten by the next column tile (or group)
#pragma unroll
      for (int q = 0; q + 1 < kGroup; ++q)
#pragma unroll
        for (int rr = 0; rr < R; ++rr) {
          words[q][rr] = words[q + 1][rr];
          bases[q][rr] = bases[q + 1][rr];
        }
      good >>= R;
    }
    kt0 += static_cast<int64_t>(count) * nwarps;
  }
  // sum the warps' C (each stored in its own, now idle, buffer) and write out[m0 + j, row]
  float* cw = reinterpret_cast<float*>(&buf);
  // column-major, so that the threads below, which take consecutive i, read consecutive words (row
  // major gave them a stride of 16 words: 8-way bank conflicts on every read of the sum)
#pragma unroll
  for (int rr = 0; rr < R; ++rr)  // cw[rr * 256 + j * 16 + i] = C[rr][i][j]
    wmma::store_matrix_sync(cw + rr * 256, acc[rr], 16, wmma::mem_col_major);
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < R * 256; e += static_cast<int>(blockDim.x)) {
    const int rr = e >> 8, j = (e >> 4) & 15, i = e & 15;  // consecutive threads: consecutive rows of W
    const int64_t row = (rt0 + rr) * kBmRows + i;
    if (j < mv && row < n) {
      float s = 0.0f;
      for (int w = 0; w < nwarps; ++w)
        s += reinterpret_cast<const float*>(smem_raw + static_cast<size_t>(w) * sizeof(WarpBuf<T, R>))[(rr << 8) + (e & 255)];
      if (bias != nullptr) s += Num<T>::to_acc(bias[row]);
      out[(m0 + j) * ldo + row] = Num<T>::from_acc(s);
    }
  }
#endif
}

// ============================================================================ densify
// One warp per tile of the row range [row0, row0 + nrows): every element of the tile inside the
// matrix is written (zeros included), so the destination needs no clearing.
constexpr int kDensifyThreads = 256;

template <typename U>
__global__ void __launch_bounds__(kDensifyThreads)
    bitmap_densify_kernel(const uint32_t* __restrict__ bitmap, const int32_t* __restrict__ offsets,
                          const U* __restrict__ values, int64_t nnz, int64_t n, int64_t k, int64_t kt_count,
                          int64_t row0, int64_t nrows, U* __restrict__ tile, DeviceErrorRecord* rec) {
  const int64_t wid = (static_cast<int64_t>(blockIdx.x) * kDensifyThreads + threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t local_tiles = (nrows + kBmRows - 1) / kBmRows * kt_count;
  if (wid >= local_tiles) return;  // whole warp
  const int64_t lrt = wid / kt_count, kt = wid % kt_count;
  const int64_t t = (row0 / kBmRows + lrt) * kt_count + kt;
  const uint32_t word = bitmap[t * kBmWords + lane];
  const int32_t o0 = offsets[t], o1 = offsets[t + 1];
  int pre, total;
  tile_scan(word, lane, pre, total);
  const bool ok = tile_ok(t, o0, o1, total, nnz, rec, lane);
  const int r = lane >> 1, h = lane & 1;
  const int64_t row = lrt * kBmRows + r;  // row of the destination
  if (row >= nrows || row0 + row >= n) return;
  const int64_t c0 = kt * kBmCols + 32 * h;
  U* dst = tile + row * k;
  int64_t p = static_cast<int64_t>(o0) + pre;
  for (int j = 0; j < 32; ++j) {
    const int64_t c = c0 + j;
    const bool set = (word >> j) & 1u;
    if (c < k) dst[c] = (ok && set) ? values[p] : U(0);
    p += set ? 1 : 0;
  }
}

}  // namespace

// ============================================================================ launchers
namespace {

template <typename T, int MinBlocks, int R>
cudaError_t bitmap_mma_launch(const T* x, int64_t m, int64_t k, const int32_t* bitmap, const int32_t* offsets,
                              const T* values, int64_t nnz, const T* bias, T* out, int64_t ldo, int64_t n,
                              DeviceErrorRecord* rec, cudaStream_t stream) {
  using Buf = WarpBuf<T, R>;
  const int dev = current_device();
  const int64_t nt = ceil_div(n, kBmRows), kt = ceil_div(k, kBmCols);
  // as many warps as there are column tiles, up to 16 and to what the device's shared memory holds
  const int64_t fit = std::max<int64_t>(1, detail::max_smem_optin(dev) / static_cast<int64_t>(sizeof(Buf)));
  const int max_warps = static_cast<int>(std::min<int64_t>(kMaxWarps, fit));
  const int warps = static_cast<int>(std::min<int64_t>(max_warps, kt));
  const size_t smem = static_cast<size_t>(warps) * sizeof(Buf);
  auto kernel = bitmap_mma_kernel<T, MinBlocks, R>;
  // Once per device (the attributes belong to the kernel in each device's context): the image the
  // device runs must hold WMMA code - one JIT-compiled from PTX older than compute capability 8.0
  // (a build for "7.5+PTX" on a newer card) has an empty body and would leave the output unwritten,
  // so it is refused - and the opt-in shared-memory limit is raised for the largest block.
  static std::atomic<uint64_t> ready{0};
  const uint64_t bit = (dev >= 0 && dev < 64) ? (uint64_t(1) << dev) : 0;
  if (bit == 0 || (ready.load(std::memory_order_relaxed) & bit) == 0) {
    cudaFuncAttributes attr{};
    cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    if (attr.ptxVersion < 80) return cudaErrorInvalidDeviceFunction;
    const size_t largest = static_cast<size_t>(max_warps) * sizeof(Buf);
    if (largest > 48 * 1024) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(largest));
      if (err != cudaSuccess) return err;
    }
    ready.fetch_or(bit, std::memory_order_relaxed);
  }
  const bool x_vec = aligned_to(x, 16) && k % 8 == 0;
  constexpr int64_t kMaxGridY = 65535;
  for (int64_t mb = 0; mb < m; mb += kMaxGridY * 16) {
    const int64_t rows = std::min<int64_t>(m - mb, kMaxGridY * 16);
    const dim3 grid(static_cast<unsigned>(ceil_div(nt, R)), static_cast<unsigned>(ceil_div(rows, 16)));
    PYENGINE_LAUNCH(grid, warps * 32, smem, stream, kernel)(x + mb * k, rows, k, reinterpret_cast<const uint32_t*>(bitmap),
                                               offsets, values, nnz, bias, out + mb * ldo, ldo, n, kt, x_vec, rec);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Which build of the product kernel runs, read per call (bench_gpu.py times the three side by side):
//   PYENGINE_BITMAP_ROW_TILES = 1 (default) | 2: row tiles per block sharing each x slice (2: one
//     block per SM);
//   PYENGINE_BITMAP_BLOCKS_PER_SM = 2 (default) | 1: the register budget of the one-row-tile build.
template <typename T>
cudaError_t bitmap_mma_t(const T* x, int64_t m, int64_t k, const int32_t* bitmap, const int32_t* offsets,
                         const T* values, int64_t nnz, const T* bias, T* out, int64_t ldo, int64_t n,
                         DeviceErrorRecord* rec, cudaStream_t stream) {
  if (env_equals("PYENGINE_BITMAP_ROW_TILES", "2"))
    return bitmap_mma_launch<T, 1, 2>(x, m, k, bitmap, offsets, values, nnz, bias, out, ldo, n, rec, stream);
  if (env_equals("PYENGINE_BITMAP_BLOCKS_PER_SM", "1"))
    return bitmap_mma_launch<T, 1, 1>(x, m, k, bitmap, offsets, values, nnz, bias, out, ldo, n, rec, stream);
  return bitmap_mma_launch<T, 2, 1>(x, m, k, bitmap, offsets, values, nnz, bias, out, ldo, n, rec, stream);
}

template <int Bytes>
cudaError_t densify_es(const int32_t* bitmap, const int32_t* offsets, const void* values, int64_t nnz, int64_t n,
                       int64_t k, int64_t row0, int64_t nrows, void* tile, DeviceErrorRecord* rec,
                       cudaStream_t stream) {
  using U = typename UIntOf<Bytes>::type;
  const int64_t kt = ceil_div(k, kBmCols);
  const int64_t warps = ceil_div(nrows, kBmRows) * kt;
  const int64_t grid = ceil_div(warps * 32, kDensifyThreads);
  PYENGINE_LAUNCH(static_cast<unsigned>(grid), kDensifyThreads, 0, stream, bitmap_densify_kernel<U>)(
      reinterpret_cast<const uint32_t*>(bitmap), offsets, static_cast<const U*>(values), nnz, n, k, kt, row0, nrows,
      static_cast<U*>(tile), rec);
  return cudaGetLastError();
}

}  // namespace

bool bitmap_mma_supported(DType dt, int device) {
  return (dt == DType::kFloat16 || dt == DType::kBFloat16) && detail::compute_major(device) >= 8;
}

cudaError_t sparse_linear_bitmap_mma(DType dt, const void* x, int64_t m, int64_t k, const int32_t* bitmap,
                                     const int32_t* offsets, const void* values, int64_t nnz, const void* bias,
                                     void* out, int64_t ldo, int64_t n, DeviceErrorRecord* rec, cudaStream_t stream) {
  if (m <= 0 || n <= 0 || k <= 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat16:
      return bitmap_mma_t<__half>(static_cast<const __half*>(x), m, k, bitmap, offsets,
                                  static_cast<const __half*>(values), nnz, static_cast<const __half*>(bias),
                                  static_cast<__half*>(out), ldo, n, rec, stream);
    case DType::kBFloat16:
      return bitmap_mma_t<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), m, k, bitmap, offsets,
                                         static_cast<const __nv_bfloat16*>(values), nnz,
                                         static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(out),
                                         ldo, n, rec, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t bitmap_densify_rows(DType dt, const int32_t* bitmap, const int32_t* offsets, const void* values,
                                int64_t nnz, int64_t n, int64_t k, int64_t row0, int64_t nrows, void* tile,
                                DeviceErrorRecord* rec, cudaStream_t stream) {
  if (nrows <= 0 || k <= 0) return cudaSuccess;
  if (row0 % kBmRows != 0) return cudaErrorInvalidValue;
  switch (dtype_size(dt)) {
    case 2: return densify_es<2>(bitmap, offsets, values, nnz, n, k, row0, nrows, tile, rec, stream);
    case 4: return densify_es<4>(bitmap, offsets, values, nnz, n, k, row0, nrows, tile, rec, stream);
    case 8: return densify_es<8>(bitmap, offsets, values, nnz, n, k, row0, nrows, tile, rec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pyengine

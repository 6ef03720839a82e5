// Kernels of sliced_wasserstein_grouped on CUDA (LaCoOT's block pairs): the projections of all G
// pairs in two launches, and the max's backward for all pairs in one. No torch headers here: see
// sliced_kernels.h. The sort / cost / reduce stage is the single op's (sliced_cuda.cu,
// sliced_fused_cuda.cu), on the (2, K, G, n) projections written here.
//
// Projection: P[t, k, g, i] = sum_j theta[k, col_g + j] z_{t,g}[i, j] - a product with few
// outputs (K directions x n points per pair) and a long reduction (d_g = C*H*W of a feature map),
// so the reduction is cut into chunks: one block per (chunk, x or y, 64 directions, 64 points)
// writes its partial product to a workspace, and a second kernel sums a pair's chunks in a fixed
// order (deterministic), scales by the block norms and writes P. The squared norms of theta's
// blocks are summed (in float64) by the blocks that stage theta for the x side.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "sliced/sliced_device.cuh"

namespace pyengine {
namespace cuda {

using detail::ceil_div;
using detail::current_device;
using detail::sm_count;
using sw_detail::dispatch_sw;

namespace {

constexpr int kTile = 64;          // directions and points per block of the partial kernel
constexpr int kStep = 32;          // reduction columns staged in shared memory per round
constexpr int kThreads = 256;      // 16 x 16 threads, 4 x 4 outputs each
constexpr int64_t kMinChunk = 512;  // reduction columns per chunk, at least
constexpr int kReduceThreads = 128;
constexpr int kRank1Threads = 256;

__device__ __forceinline__ int pair_of_chunk(const GroupedPairs& pairs, int64_t c) {
  int g = 0;
  while (g + 1 < pairs.G && pairs.chunk0[g + 1] <= c) ++g;
  return g;
}

// Block (x: chunk * 2 + t, y: direction tile, z: point tile). part (chunks, 2, K, n);
// nsq (chunks, K): the chunk's squared norm of each direction's block (normalize only).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_partial_kernel(const __grid_constant__ GroupedPairs pairs, const T* __restrict__ theta, int64_t ldt,
                           int64_t K, int64_t n, bool normalize, T* __restrict__ part, double* __restrict__ nsq) {
  __shared__ T ths[kTile][kStep + 1];  // pitch kStep + 1: a thread per row reads without bank conflicts
  __shared__ T zs[kTile][kStep + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) >> 1;
  const int t = static_cast<int>(blockIdx.x & 1u);
  const int g = pair_of_chunk(pairs, c);
  const int64_t d = pairs.dim[g];
  const int64_t jb = (c - pairs.chunk0[g]) * pairs.chunk;
  const int64_t je = std::min<int64_t>(d, jb + pairs.chunk);
  const T* __restrict__ z = static_cast<const T*>(pairs.z[t][g]);
  const T* __restrict__ th = theta + pairs.col[g];
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTile, i0 = static_cast<int64_t>(blockIdx.z) * kTile;
  const int tid = static_cast<int>(threadIdx.x), tx = tid & 15, ty = tid >> 4;
  const bool norm_block = normalize && t == 0 && blockIdx.z == 0;
  T acc[4][4];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[q][r] = T(0);
  double sq = 0.0;
  for (int64_t j0 = jb; j0 < je; j0 += kStep) {
    // 32 consecutive threads read 32 consecutive columns of one row: coalesced
    for (int e = tid; e < kTile * kStep; e += kThreads) {
      const int r = e / kStep, cc = e % kStep;
      const int64_t j = j0 + cc;
      const bool jin = j < je;
      ths[r][cc] = (jin && k0 + r < K) ? th[(k0 + r) * ldt + j] : T(0);
      zs[r][cc] = (jin && i0 + r < n) ? z[(i0 + r) * d + j] : T(0);
    }
    __syncthreads();
    if (norm_block && tid < kTile) {
      for (int cc = 0; cc < kStep; ++cc) {
        const double v = static_cast<double>(ths[tid][cc]);
        sq += v * v;
      }
    }
#pragma unroll 8
    for (int cc = 0; cc < kStep; ++cc) {
      T a[4], b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        a[q] = ths[ty * 4 + q][cc];
        b[q] = zs[tx * 4 + q][cc];
      }
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[q][r] += a[q] * b[r];
    }
    __syncthreads();  // the tiles are rewritten by the next round
  }
  T* out = part + (c * 2 + t) * K * n;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t k = k0 + ty * 4 + q;
    if (k >= K) continue;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t i = i0 + tx * 4 + r;
      if (i < n) out[k * n + i] = acc[q][r];
    }
  }
  if (norm_block && tid < kTile && k0 + tid < K) nsq[c * K + k0 + tid] = sq;
}

// Block = (pair g, direction k) = blockIdx.x / K, % K: the pair's chunks summed in order for x and
// y, times 1 / |block g of theta_k| when normalize (written to scale[g, k] too).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    grouped_reduce_kernel(const __grid_constant__ GroupedPairs pairs, int64_t K, int64_t n, bool normalize,
                          const T* __restrict__ part, const double* __restrict__ nsq, T* __restrict__ P,
                          T* __restrict__ scale) {
  const int64_t row = blockIdx.x;
  const int g = static_cast<int>(row / K);
  const int64_t k = row % K;
  const int64_t G = pairs.G, c0 = pairs.chunk0[g], c1 = pairs.chunk0[g + 1];
  T s = T(1);
  if (normalize) {
    double q = 0.0;
    for (int64_t c = c0; c < c1; ++c) q += nsq[c * K + k];
    // the smallest normal number: a zero block gives zero projections, not 0 * inf
    const double norm = sqrt(q), tiny = static_cast<double>(std::numeric_limits<T>::min());
    s = static_cast<T>(1.0 / (norm > tiny ? norm : tiny));
    if (threadIdx.x == 0) scale[g * K + k] = s;
  }
  for (int t = 0; t < 2; ++t) {
    T* dst = P + ((t * K + k) * G + g) * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      T acc = T(0);
      for (int64_t c = c0; c < c1; ++c) acc += part[((c * 2 + t) * K + k) * n + i];
      dst[i] = acc * s;
    }
  }
}

// Row r of the 2 G n output rows: t = r / (G n), pair g, point i; columns spread over the grid's x.
template <typename T>
__global__ void __launch_bounds__(kRank1Threads)
    grouped_rank1_kernel(const __grid_constant__ GroupedPairs pairs, const __grid_constant__ GroupedGrads grads,
                         const T* __restrict__ grad, const T* __restrict__ cx, const T* __restrict__ cy,
                         const T* __restrict__ theta, int64_t ldt, const T* __restrict__ scale,
                         const int64_t* __restrict__ win, int64_t K, int64_t n, DeviceErrorRecord* rec) {
  const int64_t G = pairs.G, rows = 2 * G * n;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int t = static_cast<int>(r / (G * n));
    const int64_t rem = r % (G * n);
    const int g = static_cast<int>(rem / n);
    const int64_t i = rem % n;
    T* out = static_cast<T*>(grads.out[t][g]);
    if (out == nullptr) continue;
    const int64_t w = win[g];
    const bool bad = w < 0 || w >= K;
    if (bad && blockIdx.x == 0 && threadIdx.x == 0 && i == 0)
      report_device_error(rec, kOpSlicedGrouped, kDevErrWin, g, w, K);
    T f = grad[g];
    if (scale != nullptr && !bad) f = f * scale[g * K + w];
    const T a = (t == 0 ? cx : cy)[g * n + i] * f;  // the order of the ATen path: c * (grad * scale)
    const int64_t d = pairs.dim[g];
    const T* __restrict__ th = theta + (bad ? 0 : w) * ldt + pairs.col[g];
    T* __restrict__ o = out + i * d;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x)
      o[j] = bad ? T(0) : a * th[j];
  }
}

// Workspace layout: the partial products (chunks, 2, K, n) of element size es, padded to 8 bytes,
// then the squared norms (chunks, K) in float64.
size_t partial_bytes(int64_t chunks, int64_t K, int64_t n, size_t es) {
  return static_cast<size_t>(ceil_div(static_cast<int64_t>(chunks * 2 * K * n * static_cast<int64_t>(es)), 8) * 8);
}

}  // namespace

bool sw_grouped_supported(int64_t G, int64_t K, int64_t n) {
  return G >= 1 && G <= kGroupedMaxPairs && K >= 1 && n >= 1 && ceil_div(K, kTile) <= 65535 &&
         ceil_div(n, kTile) <= 65535 && G * K <= 0x7fffffffLL;
}

size_t sw_grouped_plan(DType dt, GroupedPairs& pairs, int64_t K, int64_t n) {
  const int G = std::max(0, std::min(pairs.G, kGroupedMaxPairs));
  int64_t total = 0;
  for (int g = 0; g < G; ++g) total += pairs.dim[g];
  // about four blocks per multiprocessor: the output tiles times the chunks
  const int64_t tiles = ceil_div(std::max<int64_t>(K, 1), kTile) * ceil_div(std::max<int64_t>(n, 1), kTile);
  const int64_t want = std::max<int64_t>(G, ceil_div(4 * int64_t(sm_count(current_device())), 2 * tiles));
  int64_t chunk = std::max<int64_t>(kMinChunk, ceil_div(std::max<int64_t>(total, 1), want));
  pairs.chunk = ceil_div(chunk, kStep) * kStep;
  pairs.chunk0[0] = 0;
  for (int g = 0; g < G; ++g) pairs.chunk0[g + 1] = pairs.chunk0[g] + ceil_div(pairs.dim[g], pairs.chunk);
  const int64_t chunks = pairs.chunk0[G];
  return partial_bytes(chunks, K, n, dtype_size(dt)) + static_cast<size_t>(chunks * K) * sizeof(double);
}

cudaError_t sw_grouped_project(DType dt, const GroupedPairs& pairs, const void* theta, int64_t ldt, int64_t K,
                               int64_t n, bool normalize, void* workspace, void* P, void* scale,
                               cudaStream_t stream) {
  if (!sw_grouped_supported(pairs.G, K, n) || pairs.chunk < kStep) return cudaErrorInvalidConfiguration;
  if (normalize && scale == nullptr) return cudaErrorInvalidValue;
  const int64_t chunks = pairs.chunk0[pairs.G];
  if (2 * chunks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    T* part = static_cast<T*>(workspace);
    double* nsq = reinterpret_cast<double*>(static_cast<unsigned char*>(workspace) + partial_bytes(chunks, K, n, sizeof(T)));
    const dim3 grid(static_cast<unsigned>(2 * chunks), static_cast<unsigned>(ceil_div(K, kTile)),
                    static_cast<unsigned>(ceil_div(n, kTile)));
    PYENGINE_LAUNCH(grid, kThreads, 0, stream, grouped_partial_kernel<T>)(pairs, static_cast<const T*>(theta), ldt, K,
                                                                          n, normalize, part, nsq);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    PYENGINE_LAUNCH(static_cast<unsigned>(pairs.G * K), kReduceThreads, 0, stream, grouped_reduce_kernel<T>)(
        pairs, K, n, normalize, part, nsq, static_cast<T*>(P), static_cast<T*>(scale));
    return cudaGetLastError();
  });
}

cudaError_t sw_grouped_rank1(DType dt, const GroupedPairs& pairs, const GroupedGrads& grads, const void* grad,
                             const void* cx, const void* cy, const void* theta, int64_t ldt, const void* scale,
                             const int64_t* win, int64_t K, int64_t n, DeviceErrorRecord* rec,
                             cudaStream_t stream) {
  if (!sw_grouped_supported(pairs.G, K, n)) return cudaErrorInvalidConfiguration;
  int64_t dmax = 1;
  for (int g = 0; g < pairs.G; ++g) dmax = std::max(dmax, pairs.dim[g]);
  const int64_t rows = 2 * int64_t(pairs.G) * n;
  const int64_t gy = std::min<int64_t>(rows, 65535);
  // enough column blocks that the grid holds a few waves
  const int64_t want = std::max<int64_t>(1, int64_t(sm_count(current_device())) * 16 / gy);
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>(ceil_div(dmax, kRank1Threads), want));
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    PYENGINE_LAUNCH(dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kRank1Threads, 0, stream,
                    grouped_rank1_kernel<T>)(pairs, grads, static_cast<const T*>(grad), static_cast<const T*>(cx),
                                             static_cast<const T*>(cy), static_cast<const T*>(theta), ldt,
                                             static_cast<const T*>(scale), win, K, n, rec);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace pyengine

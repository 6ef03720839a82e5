// The fast paths of the sliced Wasserstein forward (n <= 8192 float32, n <= 4096 float64):
//  * sort + cost fused: one block per (pair, direction) sorts the x and the y projections in
//    shared memory (CUB block radix sort, keys only), keeps both sorted rows in registers in the
//    same striped order, and reduces |sx_j - sy_j|^p to S[b, k]. The projections are read once
//    and nothing is written but S: no sorted copy, no permutation.
//  * the max's gradient touches only the winning direction: one block per pair sorts that
//    direction's two rows again, now with their permutations, and scatters the gradient with
//    respect to the projections straight into cx / cy.
// No torch headers here: see sliced_kernels.h.
#include <cstdint>

#include <cub/block/block_load.cuh>
#include <cub/block/block_radix_sort.cuh>

#include "sliced/sliced_device.cuh"

namespace pyengine {
namespace cuda {

using sw_detail::block_sum;
using sw_detail::dispatch_sw;
using sw_detail::dpow_abs;
using sw_detail::pad_key;
using sw_detail::pow_abs;

namespace {

template <typename T, int THREADS, int IPT>
__global__ void __launch_bounds__(THREADS)
    sort_cost_kernel(const T* __restrict__ proj, int n, int64_t B, int64_t K, double p, double* __restrict__ S) {
  using Load = cub::BlockLoad<T, THREADS, IPT, cub::BLOCK_LOAD_WARP_TRANSPOSE>;
  using Sort = cub::BlockRadixSort<T, THREADS, IPT>;
  __shared__ union {
    typename Load::TempStorage load;
    typename Sort::TempStorage sort;
  } tmp;
  __shared__ double red[THREADS / 32];
  const int64_t s = blockIdx.x;  // = k * B + b
  const int64_t segs = B * K;
  T xs[IPT], ys[IPT];
  Load(tmp.load).Load(proj + s * n, xs, n, pad_key<T>());
  __syncthreads();
  Sort(tmp.sort).SortBlockedToStriped(xs);
  __syncthreads();
  Load(tmp.load).Load(proj + (segs + s) * n, ys, n, pad_key<T>());
  __syncthreads();
  Sort(tmp.sort).SortBlockedToStriped(ys);
  double acc = 0.0;
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int j = static_cast<int>(threadIdx.x) + i * THREADS;  // striped: rank j in both
    if (j < n) acc += pow_abs(static_cast<double>(xs[i]) - static_cast<double>(ys[i]), p);
  }
  const double tot = block_sum<THREADS>(acc, red);
  if (threadIdx.x == 0) S[(s % B) * K + s / B] = tot / static_cast<double>(n);
}

template <typename T, int THREADS, int IPT>
__global__ void __launch_bounds__(THREADS)
    winner_grad_kernel(const T* __restrict__ proj, int n, int64_t B, int64_t K, double p,
                       const int64_t* __restrict__ win, const double* __restrict__ coef, T* __restrict__ cx,
                       T* __restrict__ cy) {
  using Load = cub::BlockLoad<T, THREADS, IPT, cub::BLOCK_LOAD_WARP_TRANSPOSE>;
  using Sort = cub::BlockRadixSort<T, THREADS, IPT, int>;
  __shared__ union {
    typename Load::TempStorage load;
    typename Sort::TempStorage sort;
  } tmp;
  const int64_t b = blockIdx.x;
  int64_t k = win[b];  // written by the reduction: always in range
  if (k < 0 || k >= K) k = 0;
  const int64_t s = k * B + b;
  const int64_t segs = B * K;
  T xs[IPT], ys[IPT];
  int xi[IPT], yi[IPT];
#pragma unroll
  for (int i = 0; i < IPT; ++i) xi[i] = yi[i] = static_cast<int>(threadIdx.x) * IPT + i;  // blocked order
  Load(tmp.load).Load(proj + s * n, xs, n, pad_key<T>());
  __syncthreads();
  Sort(tmp.sort).SortBlockedToStriped(xs, xi);
  __syncthreads();
  Load(tmp.load).Load(proj + (segs + s) * n, ys, n, pad_key<T>());
  __syncthreads();
  Sort(tmp.sort).SortBlockedToStriped(ys, yi);
  const double c = coef[b] / static_cast<double>(n);
  T* ox = cx + b * n;
  T* oy = cy + b * n;
#pragma unroll
  for (int i = 0; i < IPT; ++i) {
    const int j = static_cast<int>(threadIdx.x) + i * THREADS;
    if (j < n) {  // ranks below n hold real points (the padding sorts last)
      const double g = dpow_abs(static_cast<double>(xs[i]) - static_cast<double>(ys[i]), p) * c;
      ox[xi[i]] = static_cast<T>(g);
      oy[yi[i]] = static_cast<T>(-g);
    }
  }
}

template <typename T, int THREADS, int IPT>
cudaError_t launch_cost(const T* proj, int64_t n, int64_t B, int64_t K, double p, double* S, cudaStream_t stream) {
  sort_cost_kernel<T, THREADS, IPT><<<static_cast<unsigned>(B * K), THREADS, 0, stream>>>(proj, static_cast<int>(n),
                                                                                        B, K, p, S);
  return cudaGetLastError();
}

template <typename T, int THREADS, int IPT>
cudaError_t launch_winner(const T* proj, int64_t n, int64_t B, int64_t K, double p, const int64_t* win,
                          const double* coef, T* cx, T* cy, cudaStream_t stream) {
  winner_grad_kernel<T, THREADS, IPT><<<static_cast<unsigned>(B), THREADS, 0, stream>>>(
      proj, static_cast<int>(n), B, K, p, win, coef, cx, cy);
  return cudaGetLastError();
}

// The block shapes of the in-shared-memory sorts: n <= THREADS * IPT.
template <typename T>
cudaError_t cost_t(const T* proj, int64_t n, int64_t B, int64_t K, double p, double* S, cudaStream_t stream) {
  if (n <= 512) return launch_cost<T, 128, 4>(proj, n, B, K, p, S, stream);
  if (n <= 2048) return launch_cost<T, 256, 8>(proj, n, B, K, p, S, stream);
  if constexpr (sizeof(T) == 4) {
    if (n <= 8192) return launch_cost<T, 1024, 8>(proj, n, B, K, p, S, stream);
  } else {
    if (n <= 4096) return launch_cost<T, 1024, 4>(proj, n, B, K, p, S, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t winner_t(const T* proj, int64_t n, int64_t B, int64_t K, double p, const int64_t* win,
                     const double* coef, T* cx, T* cy, cudaStream_t stream) {
  if (n <= 512) return launch_winner<T, 128, 4>(proj, n, B, K, p, win, coef, cx, cy, stream);
  if (n <= 2048) return launch_winner<T, 256, 8>(proj, n, B, K, p, win, coef, cx, cy, stream);
  if constexpr (sizeof(T) == 4) {
    if (n <= 8192) return launch_winner<T, 1024, 8>(proj, n, B, K, p, win, coef, cx, cy, stream);
  } else {
    if (n <= 4096) return launch_winner<T, 1024, 4>(proj, n, B, K, p, win, coef, cx, cy, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t sw_sort_cost(DType dt, const void* proj, int64_t n, int64_t B, int64_t K, double p, double* S,
                         cudaStream_t stream) {
  if (n <= 0 || B <= 0 || K <= 0) return cudaSuccess;
  if (B * K > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    return cost_t<T>(static_cast<const T*>(proj), n, B, K, p, S, stream);
  });
}

cudaError_t sw_winner_grad(DType dt, const void* proj, int64_t n, int64_t B, int64_t K, double p,
                           const int64_t* win, const double* coef, void* cx, void* cy, cudaStream_t stream) {
  if (n <= 0 || B <= 0 || K <= 0) return cudaSuccess;
  if (B > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    return winner_t<T>(static_cast<const T*>(proj), n, B, K, p, win, coef, static_cast<T*>(cx), static_cast<T*>(cy),
                       stream);
  });
}

}  // namespace cuda
}  // namespace pyengine

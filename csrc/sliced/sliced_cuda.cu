// Sliced Wasserstein kernels: per-segment sorts of the projections with their permutations (in
// shared memory with CUB's block radix sort; the mean's gradient needs every direction's), the
// per-direction cost S[b, k], the max / mean reduction, the gradient with respect to the
// projections and the max's rank-1 backward. The fused sort + cost and the winner-only gradient
// are in sliced_fused_cuda.cu, CUB's segmented sort for long segments in sliced_segsort_cuda.cu.
// No torch headers here: see sliced_kernels.h.
//
// Layout: the projections of x are `segs` contiguous segments of n values, segment s = k * B + b
// holding x_b,i . theta_k for i < n (the glue computes them as theta @ x.view(B * n, d)^T, a
// (K, B * n) matrix); the y segments follow the x segments in the same buffer.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cub/block/block_load.cuh>
#include <cub/block/block_radix_sort.cuh>

#include "sliced/sliced_device.cuh"

namespace pyengine {
namespace cuda {

using detail::ceil_div;
using detail::current_device;
using detail::sm_count;
using sw_detail::dispatch_sw;
using sw_detail::dpow_abs;
using sw_detail::pad_key;
using sw_detail::pow_abs;

namespace {

// One block sorts one segment of n <= THREADS * IPT keys in place; with WITH_PERM it also writes
// the permutation (perm[j] = original position of the j-th smallest).
template <typename T, int THREADS, int IPT, bool WITH_PERM>
__global__ void __launch_bounds__(THREADS)
    block_sort_kernel(T* __restrict__ keys, int n, int32_t* __restrict__ perm) {
  using Load = cub::BlockLoad<T, THREADS, IPT, cub::BLOCK_LOAD_WARP_TRANSPOSE>;
  using Sort = cub::BlockRadixSort<T, THREADS, IPT, std::conditional_t<WITH_PERM, int, cub::NullType>>;
  __shared__ union {
    typename Load::TempStorage load;
    typename Sort::TempStorage sort;
  } tmp;
  const int64_t seg = blockIdx.x;
  T* k = keys + seg * n;
  T items[IPT];
  Load(tmp.load).Load(k, items, n, pad_key<T>());  // blocked: thread t holds t*IPT .. t*IPT+IPT-1
  __syncthreads();
  if constexpr (WITH_PERM) {
    int idx[IPT];
#pragma unroll
    for (int i = 0; i < IPT; ++i) idx[i] = static_cast<int>(threadIdx.x) * IPT + i;
    Sort(tmp.sort).SortBlockedToStriped(items, idx);
    int32_t* p = perm + seg * n;
#pragma unroll
    for (int i = 0; i < IPT; ++i) {
      const int j = static_cast<int>(threadIdx.x) + i * THREADS;  // striped: rank j
      if (j < n) {
        k[j] = items[i];
        p[j] = idx[i];
      }
    }
  } else {
    Sort(tmp.sort).SortBlockedToStriped(items);
#pragma unroll
    for (int i = 0; i < IPT; ++i) {
      const int j = static_cast<int>(threadIdx.x) + i * THREADS;
      if (j < n) k[j] = items[i];
    }
  }
}

// Only the permutation-writing variant is launched (the mean's gradient); sorts without a
// permutation are fused with the cost (sliced_fused_cuda.cu).
template <typename T, int THREADS, int IPT>
cudaError_t launch_block_sort(T* keys, int64_t n, int64_t segs2, int32_t* perm, cudaStream_t stream) {
  if (perm == nullptr) return cudaErrorInvalidValue;
  block_sort_kernel<T, THREADS, IPT, true><<<static_cast<unsigned>(segs2), THREADS, 0, stream>>>(
      keys, static_cast<int>(n), perm);
  return cudaGetLastError();
}

template <typename T>
cudaError_t block_sort_t(T* keys, int64_t n, int64_t segs2, int32_t* perm, cudaStream_t stream) {
  if (n <= 512) return launch_block_sort<T, 128, 4>(keys, n, segs2, perm, stream);
  if (n <= 2048) return launch_block_sort<T, 256, 8>(keys, n, segs2, perm, stream);
  // 1024 threads keep the register count at <= 64 so one block fills a multiprocessor's warps
  if constexpr (sizeof(T) == 4) {
    if (n <= 8192) return launch_block_sort<T, 1024, 8>(keys, n, segs2, perm, stream);
  } else {
    if (n <= 4096) return launch_block_sort<T, 1024, 4>(keys, n, segs2, perm, stream);
  }
  return cudaErrorInvalidValue;
}

constexpr int kCostThreads = 256;

template <typename V>
__device__ __forceinline__ V block_sum_all(V v, V* sh) {  // sh: kCostThreads / 32 entries
  v = detail::warp_sum(v);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  V r = V(0);
  if (threadIdx.x == 0) {
    for (int i = 0; i < kCostThreads / 32; ++i) r += sh[i];
  }
  return r;  // valid on thread 0
}

// One block per segment pair s: S[b * K + k] = mean_j |sx_j - sy_j|^p.
template <typename T>
__global__ void __launch_bounds__(kCostThreads)
    pair_cost_kernel(const T* __restrict__ sorted, int64_t n, int64_t B, int64_t K, double p,
                     double* __restrict__ S) {
  __shared__ double sh[kCostThreads / 32];
  const int64_t s = blockIdx.x;
  const int64_t segs = B * K;
  const T* sx = sorted + s * n;
  const T* sy = sorted + (segs + s) * n;
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += kCostThreads) {
    acc += pow_abs(static_cast<double>(sx[j]) - static_cast<double>(sy[j]), p);
  }
  const double tot = block_sum_all(acc, sh);
  if (threadIdx.x == 0) {
    const int64_t b = s % B;
    const int64_t k = s / B;
    S[b * K + k] = tot / static_cast<double>(n);
  }
}

constexpr int kReduceThreads = 256;

// One block per b: the max (first index wins, NaN wins) or the mean of S[b, :].
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_kernel(const double* __restrict__ S, int64_t K, double p, bool use_max,
                  T* __restrict__ dist, int64_t* __restrict__ win, double* __restrict__ coef) {
  __shared__ double sv[kReduceThreads];
  __shared__ int64_t si[kReduceThreads];
  const int64_t b = blockIdx.x;
  const double* row = S + b * K;
  double best = 0.0;
  int64_t bi = -1;  // -1: nothing seen
  double sum = 0.0;
  // A candidate (v, i) beats (best, bi) when it is NaN and best is not, or v > best, or it ties
  // with a smaller index (NaN ties NaN).
  auto better = [](double v, int64_t i, double bv, int64_t bidx) {
    if (i < 0) return false;
    if (bidx < 0) return true;
    const bool vn = v != v, bn = bv != bv;
    if (vn || bn) {
      if (vn && bn) return i < bidx;
      return vn;
    }
    if (v > bv) return true;
    return v == bv && i < bidx;
  };
  for (int64_t k = threadIdx.x; k < K; k += kReduceThreads) {
    const double v = row[k];
    sum += v;
    if (better(v, k, best, bi)) {
      best = v;
      bi = k;
    }
  }
  if (use_max) {
    sv[threadIdx.x] = best;
    si[threadIdx.x] = bi;
  } else {
    sv[threadIdx.x] = sum;
  }
  __syncthreads();
  for (int off = kReduceThreads / 2; off > 0; off >>= 1) {
    if (static_cast<int>(threadIdx.x) < off) {
      if (use_max) {
        const double v = sv[threadIdx.x + off];
        const int64_t i = si[threadIdx.x + off];
        if (better(v, i, sv[threadIdx.x], si[threadIdx.x])) {
          sv[threadIdx.x] = v;
          si[threadIdx.x] = i;
        }
      } else {
        sv[threadIdx.x] += sv[threadIdx.x + off];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double red = use_max ? sv[0] : sv[0] / static_cast<double>(K);
    const double inv_p = 1.0 / p;
    double dv;
    if (p == 1.0) dv = red;
    else if (p == 2.0) dv = sqrt(red);
    else dv = pow(red, inv_p);
    dist[b] = static_cast<T>(dv);
    if (win != nullptr) win[b] = si[0] < 0 ? 0 : si[0];
    double c = 0.0;
    if (red > 0.0) c = inv_p * (p == 1.0 ? 1.0 : pow(red, inv_p - 1.0));
    if (!use_max) c /= static_cast<double>(K);
    coef[b] = c;
  }
}

// One thread per (b, kk, j): writes cx[b, perm_x[j], kk] and cy[b, perm_y[j], kk].
template <typename T>
__global__ void grad_kernel(const T* __restrict__ sorted, const int32_t* __restrict__ perm,
                            const int64_t* __restrict__ win, const double* __restrict__ coef,
                            int64_t B, int64_t K, int64_t n, int64_t kg, double p,
                            T* __restrict__ cx, T* __restrict__ cy) {
  const int64_t total = B * kg * n;
  const int64_t segs = B * K;
  const double inv_n = 1.0 / static_cast<double>(n);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % n;
    const int64_t t = idx / n;
    const int64_t kk = t % kg;
    const int64_t b = t / kg;
    const int64_t k = win != nullptr ? win[b] : kk;
    const int64_t s = k * B + b;
    const int64_t ox = s * n + j;
    const int64_t oy = (segs + s) * n + j;
    const double d = static_cast<double>(sorted[ox]) - static_cast<double>(sorted[oy]);
    const double g = dpow_abs(d, p) * inv_n * coef[b];
    const int64_t ix = perm[ox];
    const int64_t iy = perm[oy];
    cx[(b * n + ix) * kg + kk] = static_cast<T>(g);
    cy[(b * n + iy) * kg + kk] = static_cast<T>(-g);
  }
}


// ---------------------------------------------------------------------------- max backward
// gx[b, i, :] = grad[b] * cx[b, i] * theta[win[b], :]: a rank-1 product per pair, VEC elements
// per 16-byte access. A win outside [0, K) is reported and its rows become zeros.
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
    rank1_kernel(const T* __restrict__ grad, const T* __restrict__ cx, const T* __restrict__ cy,
                 const T* __restrict__ theta, const int64_t* __restrict__ win, int64_t B, int64_t n,
                 int64_t dvec, int64_t K, T* __restrict__ gx, T* __restrict__ gy,
                 DeviceErrorRecord* rec) {
  using P = detail::Pack<T, VEC>;
  const int64_t rows = B * n;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t b = r / n;
    const int64_t k = win[b];
    const bool bad = k < 0 || k >= K;
    if (bad && blockIdx.x == 0 && threadIdx.x == 0 && r == b * n)
      report_device_error(rec, kOpSlicedBwd, kDevErrWin, b, k, K);
    const T g = grad[b];
    const T a = cx[r] * g;
    const T c = cy[r] * g;
    const P* th = reinterpret_cast<const P*>(theta) + (bad ? 0 : k) * dvec;
    P* ox = gx != nullptr ? reinterpret_cast<P*>(gx) + r * dvec : nullptr;
    P* oy = gy != nullptr ? reinterpret_cast<P*>(gy) + r * dvec : nullptr;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < dvec;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      P t;
      if (bad) {
#pragma unroll
        for (int q = 0; q < VEC; ++q) t.v[q] = T(0);
      } else {
        t = th[j];
      }
      P u, w;
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        u.v[q] = bad ? T(0) : a * t.v[q];
        w.v[q] = bad ? T(0) : c * t.v[q];
      }
      if (ox != nullptr) ox[j] = u;
      if (oy != nullptr) oy[j] = w;
    }
  }
}

template <typename T, int VEC>
cudaError_t rank1_launch(const T* grad, const T* cx, const T* cy, const T* theta, const int64_t* win, int64_t B,
                         int64_t n, int64_t d, int64_t K, T* gx, T* gy, DeviceErrorRecord* rec,
                         cudaStream_t stream) {
  const int64_t dvec = d / VEC;
  const int64_t rows = B * n;
  const int64_t gy_dim = std::min<int64_t>(rows, 65535);
  // enough x-blocks that the whole grid holds a few waves, each thread a few vectors per row
  const int64_t want = std::max<int64_t>(1, static_cast<int64_t>(sm_count(current_device())) * 16 / gy_dim);
  const int64_t gx_dim = std::max<int64_t>(1, std::min<int64_t>(ceil_div(dvec, 256), want));
  rank1_kernel<T, VEC><<<dim3(static_cast<unsigned>(gx_dim), static_cast<unsigned>(gy_dim)), 256, 0, stream>>>(
      grad, cx, cy, theta, win, B, n, dvec, K, gx, gy, rec);
  return cudaGetLastError();
}

}  // namespace

bool sw_block_sort_supported(DType dt, int64_t n) {
  if (dt == DType::kFloat32) return n >= 1 && n <= 8192;
  if (dt == DType::kFloat64) return n >= 1 && n <= 4096;
  return false;
}

cudaError_t sw_block_sort(DType dt, void* keys, int64_t n, int64_t segs2, int32_t* perm,
                          cudaStream_t stream) {
  if (n <= 0 || segs2 <= 0) return cudaSuccess;
  if (segs2 > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    return block_sort_t<T>(static_cast<T*>(keys), n, segs2, perm, stream);
  });
}

cudaError_t sw_pair_cost(DType dt, const void* sorted, int64_t n, int64_t B, int64_t K, double p,
                         double* S, cudaStream_t stream) {
  const int64_t segs = B * K;
  if (segs <= 0 || n <= 0) return cudaSuccess;
  if (segs > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    pair_cost_kernel<T><<<static_cast<unsigned>(segs), kCostThreads, 0, stream>>>(
        static_cast<const T*>(sorted), n, B, K, p, S);
    return cudaGetLastError();
  });
}

cudaError_t sw_reduce(DType dt, const double* S, int64_t B, int64_t K, double p, bool use_max,
                      void* dist, int64_t* win, double* coef, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (B > 0x7fffffffLL || K <= 0) return cudaErrorInvalidConfiguration;
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    reduce_kernel<T><<<static_cast<unsigned>(B), kReduceThreads, 0, stream>>>(
        S, K, p, use_max, static_cast<T*>(dist), use_max ? win : nullptr, coef);
    return cudaGetLastError();
  });
}

cudaError_t sw_grad(DType dt, const void* sorted, const int32_t* perm, const int64_t* win,
                    const double* coef, int64_t B, int64_t K, int64_t n, double p, bool use_max,
                    void* cx, void* cy, cudaStream_t stream) {
  const int64_t kg = use_max ? 1 : K;
  const int64_t total = B * kg * n;
  if (total <= 0) return cudaSuccess;
  if (use_max && win == nullptr) return cudaErrorInvalidValue;
  const int64_t grid = std::min<int64_t>(ceil_div(total, 256), static_cast<int64_t>(sm_count(current_device())) * 16);
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    grad_kernel<T><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
        static_cast<const T*>(sorted), perm, use_max ? win : nullptr, coef, B, K, n, kg, p,
        static_cast<T*>(cx), static_cast<T*>(cy));
    return cudaGetLastError();
  });
}

cudaError_t sw_bwd_rank1(DType dt, const void* grad, const void* cx, const void* cy, const void* theta,
                         const int64_t* win, int64_t B, int64_t n, int64_t d, int64_t K, void* gx, void* gy,
                         DeviceErrorRecord* rec, cudaStream_t stream) {
  if (B <= 0 || n <= 0 || d <= 0 || (gx == nullptr && gy == nullptr)) return cudaSuccess;
  return dispatch_sw(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / static_cast<int>(sizeof(T));
    const bool vec = d % VEC == 0 && detail::aligned_to(theta, 16) && (gx == nullptr || detail::aligned_to(gx, 16)) &&
                     (gy == nullptr || detail::aligned_to(gy, 16));
    auto* tgx = static_cast<T*>(gx);
    auto* tgy = static_cast<T*>(gy);
    if (vec)
      return rank1_launch<T, VEC>(static_cast<const T*>(grad), static_cast<const T*>(cx), static_cast<const T*>(cy),
                                  static_cast<const T*>(theta), win, B, n, d, K, tgx, tgy, rec, stream);
    return rank1_launch<T, 1>(static_cast<const T*>(grad), static_cast<const T*>(cx), static_cast<const T*>(cy),
                              static_cast<const T*>(theta), win, B, n, d, K, tgx, tgy, rec, stream);
  });
}

}  // namespace cuda
}  // namespace pyengine

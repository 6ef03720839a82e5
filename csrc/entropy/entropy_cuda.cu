// Entropy statistics kernels: one streaming pass that counts ON values per neuron (optionally
// writing relu(x) on the way: the fused activation + count), and the per-neuron binary entropy +
// per-layer summary. No torch headers here: see entropy_kernels.h.
//
// The count sees its input as `rows` rows of `row_len` contiguous elements; column c of every row
// belongs to neuron c / channel_div. That one view covers NCHW (row = one sample's C*H*W,
// channel_div = H*W), channels-last and (B, T, C) (row = one position's C channels,
// channel_div = 1) and per-position neurons (row = one sample, channel_div = 1).
//
// Work split: the columns are cut into tiles of tile_w 16-byte vectors; the (tile, row) pairs
// form one flat work space that a persistent grid (every block resident at once) splits into
// equal contiguous shares, so no block waits on a straggler. In a share, each thread owns one
// vector column of a tile and walks down its rows with kUnroll independent 16-byte loads in
// flight, counting in registers; at the end of each tile piece a block merges its counts per
// neuron (one warp-wide sum when the warp's columns are one neuron, else shared atomics) and adds
// them to the int64 output with one atomic per neuron.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common/device.cuh"
#include "entropy/entropy_kernels.h"

namespace pyengine {
namespace cuda {

using detail::aligned_to;
using detail::ceil_div;
using detail::current_device;
using detail::kFullMask;
using detail::Num;
using detail::Pack;
using detail::sm_count;

namespace {

constexpr int kCountThreads = 512;
constexpr int kUnroll = 8;
constexpr int64_t kMaxSegRows = int64_t(1) << 19;  // keeps every 32-bit partial count exact

// Read-only load of one pack: a single 16-byte load when the pack is 16 bytes.
template <typename T, int VEC>
__device__ __forceinline__ void load_pack(Pack<T, VEC>& dst, const Pack<T, VEC>* src) {
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(src));
    *reinterpret_cast<uint4*>(&dst) = u;
  } else {
    dst = *src;
  }
}

template <typename T, int VEC, bool INCLUSIVE, bool RELU>
__global__ void __launch_bounds__(kCountThreads)
    entropy_rows_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t row_len,
                        int64_t cvec, int tile_w, int rows_par, int64_t total_work,
                        int64_t channel_div, unsigned long long* __restrict__ counts,
                        unsigned long long* __restrict__ nan_count) {
  using P = Pack<T, VEC>;
  using A = typename Num<T>::acc;
  __shared__ unsigned s_cnt[kCountThreads * VEC];
  __shared__ unsigned s_nan;

  const int tcol = threadIdx.x % tile_w;
  const int trow = threadIdx.x / tile_w;
  const int lane = threadIdx.x & 31;
  const bool lane_rows = trow < rows_par;
  const int64_t G = gridDim.x;
  const int64_t w_begin = static_cast<int64_t>((static_cast<unsigned long long>(total_work) * blockIdx.x) / G);
  const int64_t w_end = static_cast<int64_t>((static_cast<unsigned long long>(total_work) * (blockIdx.x + 1)) / G);

  for (int64_t w = w_begin; w < w_end;) {  // block-uniform: one tile piece per iteration
    const int64_t tile = w / rows;
    const int64_t rs = w - tile * rows;
    int64_t re = rs + (w_end - w);
    if (re > rows) re = rows;
    if (re > rs + kMaxSegRows) re = rs + kMaxSegRows;
    w += re - rs;

    const int64_t v = tile * tile_w + tcol;  // this thread's vector column
    const bool active = lane_rows && v < cvec;
    unsigned cnt[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) cnt[j] = 0;
    unsigned nans = 0;
    if (active) {
      const P* base = reinterpret_cast<const P*>(x) + v;
      P* ybase = RELU ? reinterpret_cast<P*>(y) + v : nullptr;
      for (int64_t r = rs + trow; r < re; r += static_cast<int64_t>(kUnroll) * rows_par) {
        P a[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {  // every load of the batch issued before any use
          ok[u] = r + static_cast<int64_t>(u) * rows_par < re;
          if (ok[u]) load_pack(a[u], base + (r + static_cast<int64_t>(u) * rows_par) * cvec);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A f = Num<T>::to_acc(a[u].v[j]);
            cnt[j] += INCLUSIVE ? (f >= A(0) ? 1u : 0u) : (f > A(0) ? 1u : 0u);
            nans += (f != f) ? 1u : 0u;
            if constexpr (RELU) {
              if (!(f > A(0)) && f == f) a[u].v[j] = Num<T>::from_acc(A(0));
            }
          }
          if constexpr (RELU) ybase[(r + static_cast<int64_t>(u) * rows_par) * cvec] = a[u];
        }
      }
    }

    // merge this piece's counts per neuron
    const int64_t col_first = tile * static_cast<int64_t>(tile_w) * VEC;
    int64_t col_last = (tile + 1) * static_cast<int64_t>(tile_w) * VEC;
    if (col_last > row_len) col_last = row_len;
    col_last -= 1;
    const int64_t ch_first = col_first / channel_div;
    const int nch = static_cast<int>(col_last / channel_div - ch_first + 1);  // <= tile_w * VEC
    __syncthreads();  // the previous piece's flush has read s_cnt
    for (int i = threadIdx.x; i < nch; i += kCountThreads) s_cnt[i] = 0;
    if (threadIdx.x == 0) s_nan = 0;
    __syncthreads();
    const long long c0 = active ? (v * VEC) / channel_div : -1;
    const long long c1 = active ? (v * VEC + VEC - 1) / channel_div : -1;
    const unsigned act = __ballot_sync(kFullMask, active);
    if (act != 0u) {
      const int leader = __ffs(act) - 1;
      const long long ref = __shfl_sync(kFullMask, c0, leader);
      const bool same = !active || (c0 == c1 && c0 == ref);
      if (__all_sync(kFullMask, same)) {  // the warp's columns are one neuron: one sum
        unsigned tot = 0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) tot += cnt[j];
        tot = detail::warp_sum(tot);
        if (lane == leader && tot) atomicAdd(&s_cnt[ref - ch_first], tot);
      } else if (active) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (cnt[j]) atomicAdd(&s_cnt[(v * VEC + j) / channel_div - ch_first], cnt[j]);
        }
      }
    }
    nans = detail::warp_sum(nans);
    if (lane == 0 && nans) atomicAdd(&s_nan, nans);
    __syncthreads();
    for (int i = threadIdx.x; i < nch; i += kCountThreads) {
      const unsigned c = s_cnt[i];
      if (c) atomicAdd(counts + ch_first + i, static_cast<unsigned long long>(c));
    }
    if (threadIdx.x == 0 && s_nan) atomicAdd(nan_count, static_cast<unsigned long long>(s_nan));
  }
}

template <typename T, int VEC, bool INCLUSIVE, bool RELU>
cudaError_t launch_rows(const T* x, T* y, int64_t rows, int64_t row_len, int64_t channel_div,
                        unsigned long long* counts, unsigned long long* nan_count,
                        cudaStream_t stream) {
  auto kernel = entropy_rows_kernel<T, VEC, INCLUSIVE, RELU>;
  const int64_t cvec = row_len / VEC;
  const int tile_w = static_cast<int>(std::min<int64_t>(cvec, kCountThreads));
  const int rows_par = kCountThreads / tile_w;
  const int64_t ntiles = ceil_div(cvec, tile_w);
  const int64_t total_work = ntiles * rows;  // (tile, row) pairs
  // blocks per multiprocessor, asked once per kernel (a training step calls this per activation)
  static std::atomic<int> occ_cache{0};
  int occ = occ_cache.load(std::memory_order_relaxed);
  if (occ <= 0) {
    const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kCountThreads, 0);
    if (err != cudaSuccess) return err;
    if (occ < 1) occ = 1;
    occ_cache.store(occ, std::memory_order_relaxed);
  }
  // every block resident at once, each with at least kUnroll rows per thread
  const int64_t resident = static_cast<int64_t>(sm_count(current_device())) * occ;
  const int64_t useful = std::max<int64_t>(1, total_work / (static_cast<int64_t>(kUnroll) * rows_par));
  const int64_t grid = std::max<int64_t>(1, std::min(resident, useful));
  PYENGINE_LAUNCH(static_cast<unsigned>(grid), kCountThreads, 0, stream, kernel)(
      x, y, rows, row_len, cvec, tile_w, rows_par, total_work, channel_div, counts, nan_count);
  return cudaGetLastError();
}

template <typename T, int VEC, bool RELU>
cudaError_t launch_incl(const T* x, T* y, int64_t rows, int64_t row_len, int64_t channel_div, bool inclusive,
                        unsigned long long* counts, unsigned long long* nan_count, cudaStream_t stream) {
  return inclusive ? launch_rows<T, VEC, true, RELU>(x, y, rows, row_len, channel_div, counts, nan_count, stream)
                   : launch_rows<T, VEC, false, RELU>(x, y, rows, row_len, channel_div, counts, nan_count, stream);
}

template <typename T>
cudaError_t entropy_rows_t(const T* x, T* y, int64_t rows, int64_t row_len, int64_t channel_div,
                           bool inclusive, unsigned long long* counts,
                           unsigned long long* nan_count, cudaStream_t stream) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  const bool vec = aligned_to(x, 16) && (y == nullptr || aligned_to(y, 16)) && row_len % VEC == 0;
  if (y != nullptr) {
    return vec ? launch_incl<T, VEC, true>(x, y, rows, row_len, channel_div, inclusive, counts, nan_count, stream)
               : launch_incl<T, 1, true>(x, y, rows, row_len, channel_div, inclusive, counts, nan_count, stream);
  }
  return vec ? launch_incl<T, VEC, false>(x, nullptr, rows, row_len, channel_div, inclusive, counts, nan_count, stream)
             : launch_incl<T, 1, false>(x, nullptr, rows, row_len, channel_div, inclusive, counts, nan_count, stream);
}

// ---------------------------------------------------------------------------- entropy
constexpr int kEntThreads = 256;
constexpr double kLn2 = 0.693147180559945309417232121458176568;

__device__ __forceinline__ double plogq(double p, double q) { return p != 0.0 ? p * log(q) : 0.0; }

template <typename V>
__device__ __forceinline__ V block_sum(V v, V* sh) {  // sh: kEntThreads / 32 entries
  v = detail::warp_sum(v);
  const int w = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) sh[w] = v;
  __syncthreads();
  V r = V(0);
  if (threadIdx.x == 0) {
    for (int i = 0; i < kEntThreads / 32; ++i) r += sh[i];  // fixed order: deterministic
  }
  __syncthreads();
  return r;  // valid on thread 0
}

// partials[blk * 5 + {0..4}] = {sum h, sum h over non-constant, #non-constant, #on, #off}
__global__ void __launch_bounds__(kEntThreads)
    entropy_h_kernel(const int64_t* __restrict__ counts, int64_t numel, int64_t n_samples,
                     double eps, float* __restrict__ h, double* __restrict__ partials) {
  __shared__ double sh_d[kEntThreads / 32];
  __shared__ long long sh_i[kEntThreads / 32];
  double sum_h = 0.0, sum_nc = 0.0;
  long long n_nc = 0, n_on = 0, n_off = 0;
  const double n = static_cast<double>(n_samples);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kEntThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kEntThreads) {
    const int64_t c = counts[i];
    const bool on = c == n_samples;
    const bool off = c == 0;
    const double p = static_cast<double>(c) / n;
    const double hv = (on || off) ? 0.0 : -(plogq(p, p + eps) + plogq(1.0 - p, 1.0 - p + eps)) / kLn2;
    h[i] = static_cast<float>(hv);
    sum_h += hv;
    n_on += on ? 1 : 0;
    n_off += off ? 1 : 0;
    if (!on && !off) {
      sum_nc += hv;
      n_nc += 1;
    }
  }
  const double a = block_sum(sum_h, sh_d);
  const double b = block_sum(sum_nc, sh_d);
  const long long c = block_sum(n_nc, sh_i);
  const long long d = block_sum(n_on, sh_i);
  const long long e = block_sum(n_off, sh_i);
  if (threadIdx.x == 0) {
    double* out = partials + static_cast<int64_t>(blockIdx.x) * 5;
    out[0] = a;
    out[1] = b;
    out[2] = static_cast<double>(c);
    out[3] = static_cast<double>(d);
    out[4] = static_cast<double>(e);
  }
}

__global__ void __launch_bounds__(kEntThreads)
    entropy_summary_kernel(const double* __restrict__ partials, int nblocks, int64_t numel,
                           double* __restrict__ summary) {
  __shared__ double sh[kEntThreads / 32];
  double v[5] = {0, 0, 0, 0, 0};
  for (int i = threadIdx.x; i < nblocks; i += kEntThreads) {
#pragma unroll
    for (int q = 0; q < 5; ++q) v[q] += partials[static_cast<int64_t>(i) * 5 + q];
  }
  double r[5];
#pragma unroll
  for (int q = 0; q < 5; ++q) r[q] = block_sum(v[q], sh);
  if (threadIdx.x == 0) {
    summary[0] = numel > 0 ? r[0] / static_cast<double>(numel) : 0.0;
    summary[1] = r[2] > 0.0 ? r[1] / r[2] : 0.0;
    summary[2] = r[3];
    summary[3] = r[4];
  }
}

}  // namespace

cudaError_t entropy_counts_rows(DType dt, const void* x, void* y, int64_t rows, int64_t row_len,
                                int64_t channel_div, bool inclusive, int64_t* counts,
                                int64_t* nan_count, cudaStream_t stream) {
  if (rows <= 0 || row_len <= 0) return cudaSuccess;
  if (channel_div <= 0) return cudaErrorInvalidValue;
  auto* c = reinterpret_cast<unsigned long long*>(counts);
  auto* nc = reinterpret_cast<unsigned long long*>(nan_count);
  return detail::dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    return entropy_rows_t<T>(static_cast<const T*>(x), static_cast<T*>(y), rows, row_len, channel_div,
                             inclusive, c, nc, stream);
  });
}

cudaError_t entropy_from_counts(const int64_t* counts, int64_t numel, int64_t n_samples,
                                double eps, float* h, double* summary, double* scratch,
                                cudaStream_t stream) {
  const int64_t nb = numel > 0 ? std::min<int64_t>(ceil_div(numel, kEntThreads), kEntropyMaxBlocks) : 0;
  if (nb > 0) {
    PYENGINE_LAUNCH(static_cast<unsigned>(nb), kEntThreads, 0, stream, entropy_h_kernel)(counts, numel, n_samples,
                                                                            eps, h, scratch);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  PYENGINE_LAUNCH(1, kEntThreads, 0, stream, entropy_summary_kernel)(scratch, static_cast<int>(nb), numel, summary);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyengine

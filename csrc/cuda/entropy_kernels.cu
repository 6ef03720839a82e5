// Entropy statistics kernels: one streaming pass that counts ON values per neuron, and the
// per-neuron binary entropy + per-layer summary. No torch headers here: see launchers.h.
//
// entropy_counts sees the input as `rows` rows of `row_len` contiguous elements; column c of every
// row belongs to neuron c / channel_div. That one view covers NCHW (row = one sample's C*H*W,
// channel_div = H*W), channels-last and (B, T, C) (row = one position's C channels,
// channel_div = 1) and per-position neurons (row = one sample, channel_div = 1).
// Each thread owns VEC consecutive columns (one 16-byte vector) and walks down a range of rows,
// counting in int32 registers; a block then merges its columns per neuron in shared memory and
// adds one atomic per neuron it covers into the int64 output.
#include <algorithm>
#include <cstdint>

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

namespace {

constexpr int kCountThreads = 512;

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
constexpr int kMaxRowsPerBlock = 1 << 19;  // keeps every int32 / uint32 partial count exact

template <typename T, int VEC, bool INCLUSIVE>
__global__ void __launch_bounds__(kCountThreads)
    entropy_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t row_len, int64_t cvec,
                        int tile_w, int rows_par, int64_t ntiles, int64_t rows_per_block,
                        int64_t channel_div, unsigned long long* __restrict__ counts,
                        unsigned long long* __restrict__ nan_count) {
  using P = Pack<T, VEC>;
  using A = typename Num<T>::acc;
  __shared__ unsigned s_cnt[kCountThreads * (VEC > 8 ? VEC : 8)];
  __shared__ unsigned s_nan;

  const int64_t tile = blockIdx.x % ntiles;
  const int64_t chunk = blockIdx.x / ntiles;
  const int tcol = threadIdx.x % tile_w;
  const int trow = threadIdx.x / tile_w;
  const int64_t v = tile * tile_w + tcol;  // this thread's vector column
  const bool active = trow < rows_par && v < cvec;
  const int64_t r0 = chunk * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;

  unsigned cnt[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) cnt[j] = 0;
  unsigned nans = 0;
  auto count = [&](const P& p) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A f = Num<T>::to_acc(p.v[j]);
      cnt[j] += INCLUSIVE ? (f >= A(0) ? 1u : 0u) : (f > A(0) ? 1u : 0u);
      nans += (f != f) ? 1u : 0u;
    }
  };

  if (active) {
    const P* base = reinterpret_cast<const P*>(x) + v;  // column v of row 0, in vectors
    const int64_t step = cvec;                            // one row, in vectors
    int64_t r = r0 + trow;
    if (r + 3 * rows_par < r1) {
      // software pipeline: the next four rows are in flight while these four are counted
      P a, b, c, d;
      load_pack(a, base + r * step);
      load_pack(b, base + (r + rows_par) * step);
      load_pack(c, base + (r + 2 * rows_par) * step);
      load_pack(d, base + (r + 3 * rows_par) * step);
      r += 4 * rows_par;
      for (; r + 3 * rows_par < r1; r += 4 * rows_par) {
        P e, f, g, h;
        load_pack(e, base + r * step);
        load_pack(f, base + (r + rows_par) * step);
        load_pack(g, base + (r + 2 * rows_par) * step);
        load_pack(h, base + (r + 3 * rows_par) * step);
        count(a);
        count(b);
        count(c);
        count(d);
        a = e;
        b = f;
        c = g;
        d = h;
      }
      count(a);
      count(b);
      count(c);
      count(d);
    }
    for (; r < r1; r += rows_par) {
      P a;
      load_pack(a, base + r * step);
      count(a);
    }
  }

  // Neurons covered by this block's columns.
  const int64_t col_first = tile * tile_w * VEC;
  int64_t col_last = (tile + 1) * tile_w * VEC;
  if (col_last > row_len) col_last = row_len;
  col_last -= 1;
  const int64_t ch_first = col_first / channel_div;
  const int nch = static_cast<int>(col_last / channel_div - ch_first + 1);  // <= tile_w * VEC

  for (int i = threadIdx.x; i < nch; i += kCountThreads) s_cnt[i] = 0;
  if (threadIdx.x == 0) s_nan = 0;
  __syncthreads();
  if (active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (cnt[j]) atomicAdd(&s_cnt[(v * VEC + j) / channel_div - ch_first], cnt[j]);
    }
  }
  nans = detail::warp_sum(nans);
  if ((threadIdx.x & 31) == 0 && nans) atomicAdd(&s_nan, nans);
  __syncthreads();
  for (int i = threadIdx.x; i < nch; i += kCountThreads) {
    const unsigned c = s_cnt[i];
    if (c) atomicAdd(counts + ch_first + i, static_cast<unsigned long long>(c));
  }
  if (threadIdx.x == 0 && s_nan) atomicAdd(nan_count, static_cast<unsigned long long>(s_nan));
}

template <typename T, int VEC, bool INCLUSIVE>
cudaError_t launch_rows(const T* x, int64_t rows, int64_t row_len, int64_t channel_div,
                        unsigned long long* counts, unsigned long long* nan_count,
                        cudaStream_t stream) {
  auto kernel = entropy_rows_kernel<T, VEC, INCLUSIVE>;
  const int64_t cvec = row_len / VEC;
  const int tile_w = static_cast<int>(std::min<int64_t>(cvec, kCountThreads));
  const int rows_par = kCountThreads / tile_w;
  const int64_t ntiles = ceil_div(cvec, tile_w);
  int occ = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kCountThreads, 0);
  if (err != cudaSuccess) return err;
  if (occ < 1) occ = 1;
  const int64_t target = static_cast<int64_t>(sm_count(current_device())) * occ;
  // Enough row chunks to fill the machine once (all blocks resident, equal work), but never
  // more chunks than rows_par-row groups, and never more than kMaxRowsPerBlock rows per block.
  int64_t chunks = std::max<int64_t>(1, target / ntiles);
  chunks = std::min<int64_t>(chunks, ceil_div(rows, rows_par));
  chunks = std::max<int64_t>(chunks, ceil_div(rows, kMaxRowsPerBlock));
  const int64_t rows_per_block = ceil_div(rows, chunks);
  chunks = ceil_div(rows, rows_per_block);
  const int64_t grid = ntiles * chunks;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(grid), kCountThreads, 0, stream>>>(
      x, rows, row_len, cvec, tile_w, rows_par, ntiles, rows_per_block, channel_div, counts,
      nan_count);
  return cudaGetLastError();
}

template <typename T>
cudaError_t entropy_rows_t(const T* x, int64_t rows, int64_t row_len, int64_t channel_div,
                           bool inclusive, unsigned long long* counts,
                           unsigned long long* nan_count, cudaStream_t stream) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  const bool vec = aligned_to(x, 16) && row_len % VEC == 0;
  if (vec) {
    return inclusive ? launch_rows<T, VEC, true>(x, rows, row_len, channel_div, counts, nan_count, stream)
                     : launch_rows<T, VEC, false>(x, rows, row_len, channel_div, counts, nan_count, stream);
  }
  return inclusive ? launch_rows<T, 1, true>(x, rows, row_len, channel_div, counts, nan_count, stream)
                   : launch_rows<T, 1, false>(x, rows, row_len, channel_div, counts, nan_count, stream);
}

// ---------------------------------------------------------------------------- entropy
constexpr int kEntThreads = 256;
constexpr double kLn2 = 0.693147180559945309417232121458176568;

__device__ __forceinline__ double xlogx(double v) { return v > 0.0 ? v * log(v) : 0.0; }

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
    double p = static_cast<double>(c) / n;
    if (eps > 0.0) p = fmin(fmax(p, eps), 1.0 - eps);
    const double hv = -(xlogx(p) + xlogx(1.0 - p)) / kLn2;
    h[i] = static_cast<float>(hv);
    sum_h += hv;
    const bool on = c == n_samples;
    const bool off = c == 0;
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

cudaError_t entropy_counts_rows(DType dt, const void* x, int64_t rows, int64_t row_len,
                                int64_t channel_div, int64_t n_neurons, bool inclusive,
                                int64_t* counts, int64_t* nan_count, cudaStream_t stream) {
  (void)n_neurons;
  if (rows <= 0 || row_len <= 0) return cudaSuccess;
  if (channel_div <= 0) return cudaErrorInvalidValue;
  auto* c = reinterpret_cast<unsigned long long*>(counts);
  auto* nc = reinterpret_cast<unsigned long long*>(nan_count);
  return detail::dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    return entropy_rows_t<T>(static_cast<const T*>(x), rows, row_len, channel_div, inclusive, c, nc,
                             stream);
  });
}

cudaError_t entropy_from_counts(const int64_t* counts, int64_t numel, int64_t n_samples,
                                double eps, float* h, double* summary, double* scratch,
                                cudaStream_t stream) {
  const int64_t nb = numel > 0 ? std::min<int64_t>(ceil_div(numel, kEntThreads), kEntropyMaxBlocks) : 0;
  if (nb > 0) {
    entropy_h_kernel<<<static_cast<unsigned>(nb), kEntThreads, 0, stream>>>(counts, numel, n_samples,
                                                                            eps, h, scratch);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  entropy_summary_kernel<<<1, kEntThreads, 0, stream>>>(scratch, static_cast<int>(nb), numel, summary);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyengine

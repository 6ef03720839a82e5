// Entropy statistics kernels: one streaming pass that counts ON values per neuron (optionally
// writing relu(x) on the way: the fused activation + count), and the per-neuron binary entropy +
// per-layer summary. No torch headers here: see entropy_kernels.h.
//
// The count sees its input as `rows` rows of `row_len` contiguous elements; column c of every row
// belongs to neuron c / channel_div. That one view covers NCHW (row = one sample's C*H*W,
// channel_div = H*W), channels-last and (B, T, C) (row = one position's C channels,
// channel_div = 1) and per-position neurons (row = one sample, channel_div = 1).
//
// Work split: the columns are cut into tiles of tile_w 16-byte vectors and the rows into groups of
// rows_par rows (tile_w * rows_par <= the block's threads); the (tile, row group) units of all the
// tensors of a launch form one flat work space that a persistent grid (every block resident at
// once) splits into equal contiguous shares, so no block waits on a straggler, and counting every
// activation of a forward pass takes one launch (entropy_counts_rows_many). In a share, each thread
// owns one vector column of a tile and walks down its rows with kUnroll independent 16-byte loads
// in flight, counting in registers; at the end of each tile piece a block merges its counts per
// neuron (one warp-wide sum when the warp's columns are one neuron, else shared atomics) and adds
// them to the int64 output with one atomic per neuron.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/device.cuh"
#include "common/env.h"
#include "entropy/entropy_kernels.h"

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

// One tensor of a launch: its (tile, row group) work units are work_begin .. work_begin +
// ntiles * groups - 1 of the launch's flat work space (a row group: the rows_par rows a block
// covers in one step, so every unit is tile_w * rows_par <= kCountThreads vectors, whatever the
// tensor's shape, and tensors of different shapes share a launch evenly).
struct RowSeg {
  const void* x;
  void* y;  // relu(x) goes here when the kernel is the fused one
  unsigned long long* counts;
  int64_t rows, row_len, cvec, channel_div;
  int64_t groups;      // ceil(rows / rows_par)
  int64_t work_begin;  // the tensor's first unit in the launch
  int32_t tile_w, rows_par;
};
constexpr int kMaxRowSegs = 32;
struct RowBatch {  // the kernel's parameter (~2.6 KB), passed by value
  int32_t count;
  int32_t packed;  // fp16 / bf16: count one-neuron vectors on raw bits (raw_bits_enabled())
  int64_t total_work;
  unsigned long long* nan_count;
  RowSeg s[kMaxRowSegs];
};

// fp16 / bf16 two values per 32-bit word, compared with the packed half-precision compares
// (HSET2: bf16x2 needs sm_90, fp16x2 sm_53). ON: > 0 (an ordered compare: NaN and -0 are not ON)
// or >= 0 (-0 is); a NaN is a value unequal to itself (an unordered compare). The first version
// compared raw bits with the SIMD video intrinsics, which sm_90 runs as several integer
// instructions each (about 30 per 16-byte vector against about 16 this way). Measured with
// benchmarks/micro/ on an H200 (2026-11-27, (256, 512, 28, 28) bf16, count kernel alone): 53.7 us
// video intrinsics, 53.1 packed compares, 52.5 packed compares with the loads in rotation (below),
// against 51.8 us for the same loads with no counting.
template <typename T>
struct HalfBits;
template <>
struct HalfBits<__half> {
  static constexpr unsigned kInf = kFloat16InfBits;
  using Pair = __half2;
};
template <>
struct HalfBits<__nv_bfloat16> {
  static constexpr unsigned kInf = kBFloat16InfBits;
  using Pair = __nv_bfloat162;
};

// Per half of w: 0xffff where the value is ON, else 0.
template <typename T, bool INCLUSIVE>
__device__ __forceinline__ unsigned on_mask(unsigned w) {
  using P2 = typename HalfBits<T>::Pair;
  P2 h, zero;
  static_assert(sizeof(P2) == sizeof(unsigned), "two halves per word");
  memcpy(&h, &w, sizeof(w));
  const unsigned z = 0u;
  memcpy(&zero, &z, sizeof(z));
  if constexpr (INCLUSIVE) {
    return __hge2_mask(h, zero);
  } else {
    return __hgt2_mask(h, zero);
  }
}
// Per half of w: 0xffff where the value is NaN, else 0.
template <typename T>
__device__ __forceinline__ unsigned nan_mask(unsigned w) {
  using P2 = typename HalfBits<T>::Pair;
  P2 h;
  memcpy(&h, &w, sizeof(w));
  return __hneu2_mask(h, h);
}

// fp16 / bf16: adds the ON flags of the 8 values of the 16-byte vector q to the per-half sums pk
// (one count in each 16-bit half of the word) and flags their NaNs in nm.
template <typename T, bool INCLUSIVE>
__device__ __forceinline__ void add_on_halves(const uint4& q, unsigned& pk, unsigned& nm) {
  const unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    pk += on_mask<T, INCLUSIVE>(w[i]) & 0x00010001u;
    nm |= nan_mask<T>(w[i]);
  }
}
// fp16 / bf16: the NaNs among the 8 values of q, counted exactly (only when a batch has one).
template <typename T>
__device__ __forceinline__ unsigned nans_of_halves(const uint4& q) {
  constexpr unsigned inf2 = HalfBits<T>::kInf * 0x00010001u;
  const unsigned w[4] = {q.x, q.y, q.z, q.w};
  unsigned n = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) n += __popc(__vsetgtu2(w[i] & 0x7FFF7FFFu, inf2));
  return n;
}

template <typename T, int VEC>
constexpr bool kPackedHalf = (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) && VEC == 8;

// One thread's column of one-neuron fp16 / bf16 vectors, rows r0, r0 + step, ... below re: the
// loads go in two half batches of kUnroll / 2 in rotation, so the loads of one half are in flight
// while the other is counted (a thread that loads all kUnroll and then counts has none in flight
// while it counts; same registers). Adds the ON count to cnt and the NaN count to nans.
template <typename T, bool INCLUSIVE>
__device__ __forceinline__ void count_packed_rotating(const uint4* __restrict__ base, int64_t r0, int64_t re,
                                                      int64_t step, int64_t cvec, unsigned& cnt, unsigned& nans) {
  constexpr int H = kUnroll / 2;
  uint4 a[H], b[H];
  auto load_half = [&](uint4 (&d)[H], int64_t r) {
#pragma unroll
    for (int u = 0; u < H; ++u) {
      const int64_t ru = r + static_cast<int64_t>(u) * step;
      if (ru < re) d[u] = __ldg(base + ru * cvec);
    }
  };
  auto count_half = [&](const uint4 (&d)[H], int64_t r) {
    unsigned pk = 0, nm = 0;  // per-half ON sums (at most 4 * H each), NaN mask
#pragma unroll
    for (int u = 0; u < H; ++u)
      if (r + static_cast<int64_t>(u) * step < re) add_on_halves<T, INCLUSIVE>(d[u], pk, nm);
    cnt += (pk & 0xFFFFu) + (pk >> 16);
    if (nm != 0u) {  // a NaN in this half batch: count them exactly
#pragma unroll
      for (int u = 0; u < H; ++u)
        if (r + static_cast<int64_t>(u) * step < re) nans += nans_of_halves<T>(d[u]);
    }
  };
  const int64_t hs = static_cast<int64_t>(H) * step;
  int64_t r = r0;
  load_half(a, r);
  while (r < re) {
    const int64_t rb = r + hs;
    load_half(b, rb);
    count_half(a, r);
    const int64_t ra = rb + hs;
    load_half(a, ra);
    count_half(b, rb);
    r = ra;
  }
}

template <typename T, int VEC, bool INCLUSIVE, bool RELU>
__global__ void __launch_bounds__(kCountThreads) entropy_rows_kernel(const __grid_constant__ RowBatch b) {
  using P = Pack<T, VEC>;
  using A = typename Num<T>::acc;
  __shared__ unsigned s_cnt[kCountThreads * VEC];
  __shared__ unsigned s_nan;

  const int lane = threadIdx.x & 31;
  const int64_t G = gridDim.x;
  const int64_t w_begin = static_cast<int64_t>((static_cast<unsigned long long>(b.total_work) * blockIdx.x) / G);
  const int64_t w_end = static_cast<int64_t>((static_cast<unsigned long long>(b.total_work) * (blockIdx.x + 1)) / G);

  int seg = 0;  // the block's share runs through the tensors in order
  for (int64_t w = w_begin; w < w_end;) {  // block-uniform: one tile piece per iteration
    while (seg + 1 < b.count && b.s[seg + 1].work_begin <= w) ++seg;
    const RowSeg& sg = b.s[seg];
    const int64_t seg_end = seg + 1 < b.count ? b.s[seg + 1].work_begin : b.total_work;
    const int64_t lw = w - sg.work_begin;
    const int64_t tile = lw / sg.groups;
    const int64_t gs = lw - tile * sg.groups;
    int64_t ge = gs + ((w_end < seg_end ? w_end : seg_end) - w);
    if (ge > sg.groups) ge = sg.groups;
    const int64_t max_groups = kMaxSegRows / sg.rows_par;
    if (ge > gs + max_groups) ge = gs + max_groups;
    w += ge - gs;
    const int tile_w = sg.tile_w;
    const int rows_par = sg.rows_par;
    const int64_t rows = sg.rows;
    const int64_t cvec = sg.cvec;
    const int64_t rs = gs * rows_par;
    const int64_t re = ge * rows_par < rows ? ge * rows_par : rows;
    const int tcol = threadIdx.x % tile_w;
    const int trow = threadIdx.x / tile_w;

    const int64_t v = tile * tile_w + tcol;  // this thread's vector column
    const bool active = trow < rows_par && v < cvec;
    const int64_t channel_div = sg.channel_div;
    const long long c0 = active ? (v * VEC) / channel_div : -1;
    const long long c1 = active ? (v * VEC + VEC - 1) / channel_div : -1;
    unsigned cnt[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) cnt[j] = 0;
    unsigned nans = 0;
    if (active) {
      const P* base = static_cast<const P*>(sg.x) + v;
      P* ybase = RELU ? static_cast<P*>(sg.y) + v : nullptr;
      bool counted = false;
      if constexpr (kPackedHalf<T, VEC> && !RELU) {
        if (b.packed && c0 == c1) {  // the vector is one neuron's: packed compares, the total into cnt[0]
          count_packed_rotating<T, INCLUSIVE>(reinterpret_cast<const uint4*>(base), rs + trow, re, rows_par, cvec,
                                              cnt[0], nans);
          counted = true;
        }
      }
      for (int64_t r = rs + trow; !counted && r < re; r += static_cast<int64_t>(kUnroll) * rows_par) {
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
    if (col_last > sg.row_len) col_last = sg.row_len;
    col_last -= 1;
    const int64_t ch_first = col_first / channel_div;
    const int nch = static_cast<int>(col_last / channel_div - ch_first + 1);  // <= tile_w * VEC
    __syncthreads();  // the previous piece's flush has read s_cnt
    for (int i = threadIdx.x; i < nch; i += kCountThreads) s_cnt[i] = 0;
    if (threadIdx.x == 0) s_nan = 0;
    __syncthreads();
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
    unsigned long long* counts = sg.counts;
    for (int i = threadIdx.x; i < nch; i += kCountThreads) {
      const unsigned c = s_cnt[i];
      if (c) atomicAdd(counts + ch_first + i, static_cast<unsigned long long>(c));
    }
    if (threadIdx.x == 0 && s_nan) atomicAdd(b.nan_count, static_cast<unsigned long long>(s_nan));
  }
}

// ---- stream order (PYENGINE_ENTROPY_ORDER=stream; the strips above stay the default until it is
// measured): the tensor read as one flat array the way a plain copy reads it - every block takes
// 64 KB (kUnroll loads of 16 bytes per thread, 512 vectors apart) and the grid strides over the
// tensor together. benchmarks/micro/ on an H100 (2026-11-27, (256, 512, 28, 28) bf16, loads only):
// 69.0-69.9 us for this order against 72.0-72.8 us for the strips and 72.6-74.9 us for strips 2-8x
// wider; the count kernel took 74.3 us. For neurons of at least 32 whole vectors (channel_div a
// multiple of VEC and >= 32 * VEC: NCHW planes of >= 512 bytes) and rows of whole neurons, the 32
// vectors of one warp-wide load belong to at most two neurons: the warp sums its ON counts for
// each with one reduction (redux.sync) and a lane adds them to the block's shared counters, which
// are flushed to the output at the end. The neuron of the warp's first vector is tracked, not
// divided for: each step adds a fixed number of vectors, whose quotient and remainder by the
// neuron's vector count are worked out on the host (StreamStep).
constexpr int kStreamMaxNeurons = 4096;
constexpr int64_t kStreamChunk = static_cast<int64_t>(kCountThreads) * kUnroll;  // vectors per block per step

// Moving a position on by `step` vectors: neuron += q (mod neurons), offset += r (mod div_vec).
struct StreamStep {
  uint32_t q, r;
};
inline StreamStep stream_step(int64_t step, int64_t div_vec, int64_t neurons) {
  return {static_cast<uint32_t>((step / div_vec) % neurons), static_cast<uint32_t>(step % div_vec)};
}
__device__ __forceinline__ void stream_advance(uint32_t& ch, uint32_t& off, StreamStep s, uint32_t div_vec,
                                               uint32_t neurons) {
  off += s.r;  // both < div_vec < 2^31: no wrap
  uint32_t carry = 0;
  if (off >= div_vec) {
    off -= div_vec;
    carry = 1;
  }
  ch += s.q + carry;  // < 2 * neurons
  if (ch >= neurons) ch -= neurons;
}

// ON count of one 16-byte vector of T (each value once), and its NaNs flagged in nm.
template <typename T, bool INCLUSIVE>
__device__ __forceinline__ unsigned count_vector(const uint4& q, unsigned& nm) {
  if constexpr (sizeof(T) == 2) {
    unsigned pk = 0;
    add_on_halves<T, INCLUSIVE>(q, pk, nm);
    return (pk & 0xFFFFu) + (pk >> 16);
  } else {
    const unsigned w[4] = {q.x, q.y, q.z, q.w};
    static_assert(std::is_same<T, float>::value, "16- and 32-bit floats");
    unsigned c = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float f = __int_as_float(static_cast<int>(w[i]));
      c += INCLUSIVE ? (f >= 0.0f ? 1u : 0u) : (f > 0.0f ? 1u : 0u);
      nm |= f != f ? 1u : 0u;
    }
    return c;
  }
}
// NaNs of one 16-byte vector of T, counted exactly (only when a batch has one).
template <typename T>
__device__ __forceinline__ unsigned count_vector_nans(const uint4& q) {
  if constexpr (sizeof(T) == 2) {
    return nans_of_halves<T>(q);
  } else {
    const unsigned w[4] = {q.x, q.y, q.z, q.w};
    unsigned n = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) n += (w[i] & 0x7FFFFFFFu) > 0x7F800000u ? 1u : 0u;
    return n;
  }
}

template <typename T, bool INCLUSIVE>
__global__ void __launch_bounds__(kCountThreads)
    entropy_stream_kernel(const uint4* __restrict__ x, int64_t nvec, uint32_t div_vec, uint32_t neurons,
                          StreamStep in_chunk, StreamStep next_chunk, unsigned long long* __restrict__ counts,
                          unsigned long long* __restrict__ nan_count) {
  __shared__ unsigned s_cnt[kStreamMaxNeurons];
  __shared__ unsigned s_nan;
  for (uint32_t i = threadIdx.x; i < neurons; i += kCountThreads) s_cnt[i] = 0;
  if (threadIdx.x == 0) s_nan = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kStreamChunk;
  // the neuron and offset (in vectors) of this warp's first vector of the current load
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kStreamChunk + (threadIdx.x & ~31);
  uint32_t ch = static_cast<uint32_t>((first / div_vec) % neurons);
  uint32_t off = static_cast<uint32_t>(first % div_vec);
  unsigned nans = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kStreamChunk + threadIdx.x; base - threadIdx.x < nvec;
       base += stride) {
    uint4 a[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load of the step in flight before any count
      const int64_t i = base + static_cast<int64_t>(u) * kCountThreads;
      if (i < nvec) a[u] = __ldg(x + i);
    }
    unsigned nm = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * kCountThreads;
      const unsigned c = i < nvec ? count_vector<T, INCLUSIVE>(a[u], nm) : 0u;
      // lanes off + lane < div_vec hold neuron ch, the others (if any) the next neuron
      const bool in_first = off + static_cast<uint32_t>(lane) < div_vec;
      const unsigned s0 = __reduce_add_sync(kFullMask, in_first ? c : 0u);
      const unsigned s1 = __reduce_add_sync(kFullMask, in_first ? 0u : c);
      if (lane == 0) {
        if (s0) atomicAdd(&s_cnt[ch], s0);
        if (s1) atomicAdd(&s_cnt[ch + 1 == neurons ? 0u : ch + 1], s1);
      }
      stream_advance(ch, off, u + 1 < kUnroll ? in_chunk : next_chunk, div_vec, neurons);
    }
    if (nm != 0u) {  // a NaN in this step: count them exactly
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + static_cast<int64_t>(u) * kCountThreads;
        if (i < nvec) nans += count_vector_nans<T>(a[u]);
      }
    }
  }
  nans = detail::warp_sum(nans);
  if (lane == 0 && nans) atomicAdd(&s_nan, nans);
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < neurons; i += kCountThreads) {
    const unsigned c = s_cnt[i];
    if (c) atomicAdd(counts + i, static_cast<unsigned long long>(c));
  }
  if (threadIdx.x == 0 && s_nan) atomicAdd(nan_count, static_cast<unsigned long long>(s_nan));
}

// PYENGINE_ENTROPY_ORDER = strips (default) | stream: the order of the single-tensor count. Read
// per call.
bool stream_order_enabled() { return env_equals("PYENGINE_ENTROPY_ORDER", "stream"); }

// The stream-order count of one contiguous, 16-byte aligned tensor, when its shape allows it (see
// above); false: not taken (the caller counts in strips).
template <typename T>
bool launch_stream(const T* x, int64_t rows, int64_t row_len, int64_t channel_div, bool inclusive, int64_t* counts,
                   unsigned long long* nan_count, cudaStream_t stream, cudaError_t& err) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  if constexpr (sizeof(T) == 8) {
    return false;
  } else {
    if (channel_div % VEC != 0 || row_len % channel_div != 0) return false;
    const int64_t div_vec = channel_div / VEC, neurons = row_len / channel_div;
    if (div_vec < 32 || div_vec >= (int64_t(1) << 30) || neurons > kStreamMaxNeurons) return false;
    const int64_t nvec = rows * (row_len / VEC);
    auto kernel = inclusive ? entropy_stream_kernel<T, true> : entropy_stream_kernel<T, false>;
    int occ = 0;
    err = inclusive ? cached_occupancy<entropy_stream_kernel<T, true>>(kCountThreads, occ)
                    : cached_occupancy<entropy_stream_kernel<T, false>>(kCountThreads, occ);
    if (err != cudaSuccess) return true;
    const int64_t resident = static_cast<int64_t>(sm_count(current_device())) * occ;
    const int64_t grid = std::max<int64_t>(1, std::min(resident, ceil_div(nvec, kStreamChunk)));
    // a block's 32-bit shared counters hold at most its share of the values
    if (ceil_div(nvec, grid * kStreamChunk) * kStreamChunk * VEC >= (int64_t(1) << 31)) return false;
    const StreamStep in_chunk = stream_step(kCountThreads, div_vec, neurons);
    const StreamStep next_chunk = stream_step(grid * kStreamChunk - (kUnroll - 1) * kCountThreads, div_vec, neurons);
    PYENGINE_LAUNCH(static_cast<unsigned>(grid), kCountThreads, 0, stream, kernel)(
        reinterpret_cast<const uint4*>(x), nvec, static_cast<uint32_t>(div_vec), static_cast<uint32_t>(neurons), in_chunk,
        next_chunk, reinterpret_cast<unsigned long long*>(counts), nan_count);
    err = cudaGetLastError();
    return true;
  }
}

// Vectors per row piece of a tensor whose rows are cvec vectors long. A block's 512 threads take
// rows_par = 512 / tile_w rows of one tile at a time, and the grid's share of the work counts every
// (tile, row group) unit alike, so the width should keep threads busy in every unit: the widest of
// min(cvec, 512), 512, 256, ..., 32 whose useful thread share (rows_par * tile_w / 512 threads
// used, of them cvec / (tiles * tile_w) on real columns) is at least 7/8, else the best of them.
// E.g. cvec = 640: 512 would give a full and a 128-wide tile (62% useful), 128 gives 5 full ones;
// cvec = 192 (a (B, T, 768) float32 tensor): 192 leaves 128 threads idle (75%), 64 none.
int32_t pick_tile_w(int64_t cvec) {
  const auto useful = [cvec](int64_t tw) {
    const int64_t rows_par = kCountThreads / tw;
    return static_cast<double>(rows_par * tw) / kCountThreads * static_cast<double>(cvec) /
           static_cast<double>(ceil_div(cvec, tw) * tw);
  };
  int64_t best = std::min<int64_t>(cvec, kCountThreads);
  if (useful(best) >= 0.875) return static_cast<int32_t>(best);
  for (int64_t tw = kCountThreads; tw >= 32; tw /= 2) {
    if (useful(tw) >= 0.875) return static_cast<int32_t>(tw);
    if (useful(tw) > useful(best)) best = tw;
  }
  return static_cast<int32_t>(best);
}

// Appends one tensor (`vec` elements per load) to the batch.
void add_segment(RowBatch& b, int vec, const void* x, void* y, int64_t rows, int64_t row_len, int64_t channel_div,
                    int64_t* counts) {
  RowSeg& sg = b.s[b.count++];
  sg.x = x;
  sg.y = y;
  sg.counts = reinterpret_cast<unsigned long long*>(counts);
  sg.rows = rows;
  sg.row_len = row_len;
  sg.cvec = row_len / vec;
  sg.channel_div = channel_div;
  sg.tile_w = pick_tile_w(sg.cvec);
  sg.rows_par = kCountThreads / sg.tile_w;
  sg.groups = ceil_div(rows, static_cast<int64_t>(sg.rows_par));
  sg.work_begin = b.total_work;
  b.total_work += ceil_div(sg.cvec, static_cast<int64_t>(sg.tile_w)) * sg.groups;
}

template <typename T, int VEC, bool INCLUSIVE, bool RELU>
cudaError_t launch_rows(const RowBatch& b, cudaStream_t stream) {
  if (b.count == 0 || b.total_work == 0) return cudaSuccess;
  auto kernel = entropy_rows_kernel<T, VEC, INCLUSIVE, RELU>;
  int occ = 0;  // a training step may call this per activation: asked once per kernel
  const cudaError_t err = cached_occupancy<entropy_rows_kernel<T, VEC, INCLUSIVE, RELU>>(kCountThreads, occ);
  if (err != cudaSuccess) return err;
  // every block resident at once, each thread with at least kUnroll rows
  const int64_t resident = static_cast<int64_t>(sm_count(current_device())) * occ;
  const int64_t useful = std::max<int64_t>(1, b.total_work / kUnroll);
  const int64_t grid = std::max<int64_t>(1, std::min(resident, useful));
  PYENGINE_LAUNCH(static_cast<unsigned>(grid), kCountThreads, 0, stream, kernel)(b);
  return cudaGetLastError();
}

template <typename T, int VEC, bool RELU>
cudaError_t launch_incl(const RowBatch& b, bool inclusive, cudaStream_t stream) {
  return inclusive ? launch_rows<T, VEC, true, RELU>(b, stream) : launch_rows<T, VEC, false, RELU>(b, stream);
}

// Loads of 16 bytes need 16-byte aligned rows: x (and y) aligned, row_len a multiple of VEC.
template <typename T>
bool vector_loads(const void* x, const void* y, int64_t row_len) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  return aligned_to(x, 16) && (y == nullptr || aligned_to(y, 16)) && row_len % VEC == 0;
}

// PYENGINE_ENTROPY_RAW_BITS = 1 (default) | 0: whether fp16 / bf16 vectors are counted on raw
// bits or value by value (0 is kept for comparison in benchmarks/bench_gpu.py). Read per call.
bool raw_bits_enabled() { return !env_equals("PYENGINE_ENTROPY_RAW_BITS", "0"); }

template <typename T>
cudaError_t entropy_rows_t(const T* x, T* y, int64_t rows, int64_t row_len, int64_t channel_div,
                           bool inclusive, int64_t* counts, unsigned long long* nan_count, cudaStream_t stream) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  const bool vec = vector_loads<T>(x, y, row_len);
  if (vec && y == nullptr && stream_order_enabled() && (sizeof(T) == 4 || raw_bits_enabled())) {
    cudaError_t err = cudaSuccess;
    if (launch_stream<T>(x, rows, row_len, channel_div, inclusive, counts, nan_count, stream, err)) return err;
  }
  RowBatch b;
  b.count = 0;
  b.packed = raw_bits_enabled() ? 1 : 0;
  b.total_work = 0;
  b.nan_count = nan_count;
  add_segment(b, vec ? VEC : 1, x, y, rows, row_len, channel_div, counts);
  if (y != nullptr)
    return vec ? launch_incl<T, VEC, true>(b, inclusive, stream) : launch_incl<T, 1, true>(b, inclusive, stream);
  return vec ? launch_incl<T, VEC, false>(b, inclusive, stream) : launch_incl<T, 1, false>(b, inclusive, stream);
}

// The tensors of `descs` with element type T and the given load width, kMaxRowSegs per launch.
template <typename T>
cudaError_t entropy_rows_many_t(const CountRowsDesc* descs, int64_t n, DType dt, bool vec, bool inclusive,
                                unsigned long long* nan_count, cudaStream_t stream) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  RowBatch b;
  b.packed = raw_bits_enabled() ? 1 : 0;
  b.nan_count = nan_count;
  int64_t i = 0;
  while (i < n) {
    b.count = 0;
    b.total_work = 0;
    for (; i < n && b.count < kMaxRowSegs; ++i) {
      const CountRowsDesc& d = descs[i];
      if (d.dtype != dt || d.rows <= 0 || d.row_len <= 0 || vector_loads<T>(d.x, nullptr, d.row_len) != vec) continue;
      add_segment(b, vec ? VEC : 1, d.x, nullptr, d.rows, d.row_len, d.channel_div, d.counts);
    }
    const cudaError_t err = vec ? launch_incl<T, VEC, false>(b, inclusive, stream)
                                : launch_incl<T, 1, false>(b, inclusive, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
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
                     double eps, float* __restrict__ h, double* __restrict__ partials, DeviceErrorRecord* rec) {
  __shared__ double sh_d[kEntThreads / 32];
  __shared__ long long sh_i[kEntThreads / 32];
  double sum_h = 0.0, sum_nc = 0.0;
  long long n_nc = 0, n_on = 0, n_off = 0;
  const double n = static_cast<double>(n_samples);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kEntThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kEntThreads) {
    const int64_t c = counts[i];
    if (c < 0 || c > n_samples) {  // not a count of n_samples: reported, h NaN, left out of the summary
      report_device_error(rec, kOpEntropyFromCounts, kDevErrCount, i, c, n_samples);
      h[i] = __int_as_float(0x7fc00000);
      continue;
    }
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

__global__ void __launch_bounds__(kEntThreads) zero_counts_kernel(int64_t* __restrict__ counts, int64_t n,
                                                                  int64_t* __restrict__ nan_count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kEntThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kEntThreads + threadIdx.x; i < n; i += stride) counts[i] = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) *nan_count = 0;
}

}  // namespace

cudaError_t zero_counts(int64_t* counts, int64_t n, int64_t* nan_count, cudaStream_t stream) {
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kEntThreads), kEntropyMaxBlocks));
  PYENGINE_LAUNCH(static_cast<unsigned>(nb), kEntThreads, 0, stream, zero_counts_kernel)(counts, n, nan_count);
  return cudaGetLastError();
}

cudaError_t entropy_counts_rows(DType dt, const void* x, void* y, int64_t rows, int64_t row_len,
                                int64_t channel_div, bool inclusive, int64_t* counts,
                                int64_t* nan_count, cudaStream_t stream) {
  if (rows <= 0 || row_len <= 0) return cudaSuccess;
  if (channel_div <= 0) return cudaErrorInvalidValue;
  auto* nc = reinterpret_cast<unsigned long long*>(nan_count);
  return detail::dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    return entropy_rows_t<T>(static_cast<const T*>(x), static_cast<T*>(y), rows, row_len, channel_div,
                             inclusive, counts, nc, stream);
  });
}

cudaError_t entropy_counts_rows_many(const CountRowsDesc* descs, int64_t n, bool inclusive, int64_t* nan_count,
                                     cudaStream_t stream) {
  for (int64_t i = 0; i < n; ++i)
    if (descs[i].rows > 0 && descs[i].row_len > 0 && descs[i].channel_div <= 0) return cudaErrorInvalidValue;
  auto* nc = reinterpret_cast<unsigned long long*>(nan_count);
  for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16, DType::kFloat64}) {
    bool present = false;
    for (int64_t i = 0; i < n && !present; ++i) present = descs[i].dtype == dt;
    if (!present) continue;
    for (bool vec : {true, false}) {
      const cudaError_t err = detail::dispatch_float(dt, [&](auto tag) {
        using T = decltype(tag);
        return entropy_rows_many_t<T>(descs, n, dt, vec, inclusive, nc, stream);
      });
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

cudaError_t entropy_from_counts(const int64_t* counts, int64_t numel, int64_t n_samples,
                                double eps, float* h, double* summary, double* scratch,
                                DeviceErrorRecord* rec, cudaStream_t stream) {
  const int64_t nb = numel > 0 ? std::min<int64_t>(ceil_div(numel, kEntThreads), kEntropyMaxBlocks) : 0;
  if (nb > 0) {
    PYENGINE_LAUNCH(static_cast<unsigned>(nb), kEntThreads, 0, stream, entropy_h_kernel)(counts, numel, n_samples,
                                                                            eps, h, scratch, rec);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  PYENGINE_LAUNCH(1, kEntThreads, 0, stream, entropy_summary_kernel)(scratch, static_cast<int>(nb), numel, summary);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyengine

// Plain C++ interface of the sliced Wasserstein CUDA kernels (sliced_cuda.cu and
// sliced_segsort_cuda.cu, compiled without torch headers) for the torch glue (sliced_glue.cpp).
//
// Projections come as `2 * segs` contiguous segments of n values (the x segments, then the y
// segments; segment s = k * B + b holds x_b . theta_k for the n points).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/device_error.h"
#include "common/dtype.h"

namespace pyengine {
namespace cuda {

// Whether the in-shared-memory sorts handle segments of n (float32: n <= 8192, float64: n <= 4096).
bool sw_block_sort_supported(DType dt, int64_t n);

// Fused sort + cost, no permutations, nothing written but S: one block per (b, k) sorts the x and
// the y segment in shared memory and reduces S[b * K + k] = (1/n) sum_j |sx_j - sy_j|^p.
cudaError_t sw_sort_cost(DType dt, const void* proj, int64_t n, int64_t B, int64_t K, double p,
                         double* S, cudaStream_t stream);

// The max's gradient from the winning direction only: one block per pair b sorts the x and y
// segments of direction win[b] with their permutations and writes
// cx[b, perm_x[j]] = coef[b] * d|sx_j - sy_j|^p / dsx_j / n and cy[b, perm_y[j]] = -(same).
cudaError_t sw_winner_grad(DType dt, const void* proj, int64_t n, int64_t B, int64_t K, double p,
                           const int64_t* win, const double* coef, void* cx, void* cy, cudaStream_t stream);

// In-place sort of every segment with perm[s * n + j] = original index of the j-th smallest
// (perm may be nullptr).
cudaError_t sw_block_sort(DType dt, void* keys, int64_t n, int64_t segs2, int32_t* perm,
                          cudaStream_t stream);

// Fallback for longer segments: CUB's segmented radix sort from keys_in to keys_out (and the
// permutation into perm_out when perm_out != nullptr). Needs segs2 * n < 2^31 and a scratch of
// sw_segmented_sort_temp_bytes(...) bytes plus an int32 scratch (index_scratch) of
// segs2 * n + segs2 + 1 entries.
size_t sw_segmented_sort_temp_bytes(DType dt, int64_t n, int64_t segs2, bool with_perm);
cudaError_t sw_segmented_sort(DType dt, void* temp, size_t temp_bytes, const void* keys_in,
                              void* keys_out, int32_t* perm_out, int32_t* index_scratch,
                              int64_t n, int64_t segs2, cudaStream_t stream);

// S[b * K + k] = (1/n) sum_j |sx[s, j] - sy[s, j]|^p for sorted segments (s = k * B + b;
// sx = sorted, sy = sorted + B * K * n).
cudaError_t sw_pair_cost(DType dt, const void* sorted, int64_t n, int64_t B, int64_t K, double p,
                         double* S, cudaStream_t stream);

// dist[b] = (max_k S[b, k])^(1/p) (first index wins; NaN wins) or (mean_k S[b, k])^(1/p);
// win[b] = argmax when win != nullptr (max only); coef[b] = d dist / d S[b, k] for the reducing
// direction(s): (1/p) S_red^(1/p - 1) (divided by K for the mean), 0 where S_red == 0.
cudaError_t sw_reduce(DType dt, const double* S, int64_t B, int64_t K, double p, bool use_max,
                      void* dist, int64_t* win, double* coef, cudaStream_t stream);

// cx, cy (B, n, Kg) with Kg = 1 (max: direction win[b]) or K (mean) from sorted segments and
// their permutations.
cudaError_t sw_grad(DType dt, const void* sorted, const int32_t* perm, const int64_t* win,
                    const double* coef, int64_t B, int64_t K, int64_t n, double p, bool use_max,
                    void* cx, void* cy, cudaStream_t stream);

// The max's backward: gx[b, i, :] = grad[b] * cx[b, i] * theta[win[b], :] (and gy from cy), for
// the outputs that are not nullptr. A win[b] outside [0, K) is reported in rec and its rows are
// written as zeros.
cudaError_t sw_bwd_rank1(DType dt, const void* grad, const void* cx, const void* cy, const void* theta,
                         const int64_t* win, int64_t B, int64_t n, int64_t d, int64_t K, void* gx, void* gy,
                         DeviceErrorRecord* rec, cudaStream_t stream);

// ---------------------------------------------------------------------------- grouped pairs
// sliced_wasserstein_grouped on CUDA (sliced_grouped_cuda.cu): G pairs of point sets with one count
// n and dimensions d_g, pair g projected on its column block [col[g], col[g] + dim[g]) of one
// (K, ldt) direction matrix. Up to kGroupedMaxPairs pairs per launch (the pointers travel in the
// kernel parameters); the glue takes the ATen path beyond.
constexpr int kGroupedMaxPairs = 32;

struct GroupedPairs {
  int32_t G = 0;
  const void* z[2][kGroupedMaxPairs] = {};  // x_g, y_g: (n, dim[g]) contiguous
  int64_t dim[kGroupedMaxPairs] = {};
  int64_t col[kGroupedMaxPairs] = {};
  // filled by sw_grouped_plan: the reduction is cut into chunks of `chunk` columns; pair g owns
  // chunks [chunk0[g], chunk0[g + 1])
  int64_t chunk = 0;
  int64_t chunk0[kGroupedMaxPairs + 1] = {};
};

// Whether the kernels take G pairs of n points on K directions (else the ATen path).
bool sw_grouped_supported(int64_t G, int64_t K, int64_t n);

// Chooses the chunks (enough blocks to fill the device, a workspace of a few MB) and returns the
// workspace size in bytes for sw_grouped_project.
size_t sw_grouped_plan(DType dt, GroupedPairs& pairs, int64_t K, int64_t n);

// P (2, K, G, n) contiguous - the x segments, then the y segments, segment s = k * G + g, as the
// sort / cost functions above take them with B = G - holds z_{t,g} . theta_k over pair g's block,
// divided by that block's norm when normalize; scale (G, K) = 1 / max(|block g of theta_k|, the
// dtype's smallest normal) (normalize only; may be nullptr otherwise). Deterministic: partial
// products per chunk in a workspace, summed in a fixed order by a second kernel.
cudaError_t sw_grouped_project(DType dt, const GroupedPairs& pairs, const void* theta, int64_t ldt, int64_t K,
                               int64_t n, bool normalize, void* workspace, void* P, void* scale,
                               cudaStream_t stream);

// The max's backward for all pairs in one launch: out[t][g] (n, dim[g]) =
// grad[g] * c_t[g, i] * theta[win[g], col[g] + j] (* scale[g, win[g]] when scale != nullptr),
// with c_0 = cx, c_1 = cy (G, n) contiguous; outputs that are nullptr are skipped. A win[g]
// outside [0, K) is reported in rec and its rows are written as zeros.
struct GroupedGrads {
  void* out[2][kGroupedMaxPairs] = {};
};
cudaError_t sw_grouped_rank1(DType dt, const GroupedPairs& pairs, const GroupedGrads& grads, const void* grad,
                             const void* cx, const void* cy, const void* theta, int64_t ldt, const void* scale,
                             const int64_t* win, int64_t K, int64_t n, DeviceErrorRecord* rec,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace pyengine

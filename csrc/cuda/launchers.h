// Plain C++ interface between the torch-facing glue (bindings.cpp, compiled by the host
// compiler with the torch headers) and the raw CUDA kernels (*.cu, compiled by nvcc without any
// torch header). Every launcher takes raw device pointers, sizes in elements, and the stream to
// run on; it launches nothing when there is nothing to do and returns the launch status
// (cudaGetLastError() after its launches), which the caller must check.
//
// Conventions: sizes are int64_t; "ld" arguments are row strides in elements; masks are bool
// tensors (one byte per element, 0 or 1); every pointer is a device pointer unless said otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace pyengine {
namespace cuda {

// The floating dtypes the kernels support (the glue maps at::ScalarType onto these).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline int dtype_size(DType d) {
  switch (d) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

// ------------------------------------------------------------------ masked / sparse linear
// dst[r, c] = src[r, c] * mask[r, c] for r < rows, c < cols (exactly the reference W * M,
// computed per element in the dtype). dst may equal src (in-place masking, same ld).
cudaError_t masked_copy(DType dt, void* dst, int64_t ldd, const void* src, int64_t lds,
                        const bool* mask, int64_t ldm, int64_t rows, int64_t cols,
                        cudaStream_t stream);

// pack_sparse, step 1: counts[r] = number of nonzero entries (w != 0, NaN counts as nonzero) of
// row r of the contiguous (n, k) matrix w.
cudaError_t pack_count_rows(DType dt, const void* w, int64_t n, int64_t k, int32_t* counts,
                            cudaStream_t stream);
// step 2: rowptr[0] = 0, rowptr[1 + r] = counts[0] + ... + counts[r] (a CUB device scan; the
// temporary storage comes from the caller, pack_scan_temp_bytes(n) bytes, may be 0).
size_t pack_scan_temp_bytes(int64_t n);
cudaError_t pack_scan(void* temp, size_t temp_bytes, const int32_t* counts, int32_t* rowptr,
                      int64_t n, cudaStream_t stream);
// step 3: writes the nonzeros of each row, columns ascending, at rowptr[r]...:
// colidx is int16_t when colidx16 else int32_t; values has w's dtype.
cudaError_t pack_fill(DType dt, const void* w, int64_t n, int64_t k, const int32_t* rowptr,
                      void* colidx, bool colidx16, void* values, cudaStream_t stream);

// out (m, n) row-major with row stride ldo = x (m, k) contiguous @ W^T (+ bias), W given as CSR
// (rowptr [n + 1], colidx int16/int32, values). fp32 accumulation. For any m; efficient for
// m <= 16 (processes m in chunks of at most 16 rows, re-reading W per chunk).
cudaError_t sparse_linear_skinny(DType dt, const void* x, int64_t m, int64_t k,
                                 const int32_t* rowptr, const void* colidx, bool colidx16,
                                 const void* values, const void* bias, void* out, int64_t ldo,
                                 int64_t n, cudaStream_t stream);
// Whether sparse_linear_spmm_t supports this dtype (float32 only).
bool sparse_linear_spmm_supported(DType dt);
// outT (n, m) row-major = W @ x^T (+ bias[:, None]): a sparse x dense product tiled through shared
// memory, for larger m. The caller transposes outT into the (m, n) result.
cudaError_t sparse_linear_spmm_t(DType dt, const void* x, int64_t m, int64_t k,
                                 const int32_t* rowptr, const void* colidx, bool colidx16,
                                 const void* values, const void* bias, void* out_t, int64_t n,
                                 cudaStream_t stream);
// tile (nrows, k) contiguous = dense rows [row0, row0 + nrows) of the CSR matrix (zeros + scatter).
cudaError_t sparse_densify_rows(DType dt, const int32_t* rowptr, const void* colidx,
                                bool colidx16, const void* values, int64_t row0, int64_t nrows,
                                int64_t k, void* tile, cudaStream_t stream);

// apply_masks_: data[j] = 0 where mask[j] == 0, for every tensor, in one launch per
// kMaxMaskBatch tensors. elem_size is 1, 2, 4 or 8 bytes; both buffers contiguous.
struct MaskTensorDesc {
  void* data;
  const bool* mask;
  int64_t numel;
  int32_t elem_size;
};
constexpr int kMaxMaskBatch = 256;
cudaError_t apply_masks(const MaskTensorDesc* descs, int64_t count, cudaStream_t stream);

// ------------------------------------------------------------------ entropy statistics
// x viewed as `rows` rows of `row_len` elements (row stride row_len, contiguous). Column c
// belongs to neuron c / channel_div (0 <= neuron < n_neurons). Adds, for every neuron, the
// number of its elements that are ON (x > 0, or x >= 0 when inclusive; NaN never) into
// counts[neuron] (int64, must be zeroed by the caller) and the number of NaNs into *nan_count.
cudaError_t entropy_counts_rows(DType dt, const void* x, int64_t rows, int64_t row_len,
                                int64_t channel_div, int64_t n_neurons, bool inclusive,
                                int64_t* counts, int64_t* nan_count, cudaStream_t stream);

// h[i] = binary entropy (bits) of counts[i] / n_samples (p clamped to [eps, 1 - eps] when
// eps > 0); summary[4] = {mean h, mean h over non-constant neurons (0 if none), #count == n,
// #count == 0}. scratch: kEntropyScratchDoubles doubles of device memory.
constexpr int kEntropyMaxBlocks = 1024;
constexpr int kEntropyScratchDoubles = 5 * kEntropyMaxBlocks;
cudaError_t entropy_from_counts(const int64_t* counts, int64_t numel, int64_t n_samples,
                                double eps, float* h, double* summary, double* scratch,
                                cudaStream_t stream);

// ------------------------------------------------------------------ sliced Wasserstein
// Projections come as `2 * segs` contiguous segments of n values (the x segments, then the y
// segments; segment s = k * B + b holds x_b . theta_k for the n points).
//
// In-shared-memory sort of every segment, in place (float32: n <= 8192, float64: n <= 4096);
// with perm != nullptr also perm[s * n + j] = original index of the j-th smallest
// (perm has 2 * segs * n entries, laid out like the keys).
bool sw_block_sort_supported(DType dt, int64_t n);
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
// S[b * K + k] = (1/n) sum_j |sx[s, j] - sy[s, j]|^p for the sorted segments (s = k * B + b;
// sx = sorted, sy = sorted + B * K * n).
cudaError_t sw_pair_cost(DType dt, const void* sorted, int64_t n, int64_t B, int64_t K, double p,
                         double* S, cudaStream_t stream);
// dist[b] = (max_k S[b, k])^(1/p) (first index wins; NaN wins) or (mean_k S[b, k])^(1/p);
// win[b] = argmax when win != nullptr (max only); coef[b] = d dist / d S[b, k] for the reducing
// direction(s): (1/p) S_red^(1/p - 1) (divided by K for the mean), 0 where S_red == 0.
cudaError_t sw_reduce(DType dt, const double* S, int64_t B, int64_t K, double p, bool use_max,
                      void* dist, int64_t* win, double* coef, cudaStream_t stream);
// cx, cy (B, n, Kg) with Kg = 1 (max: direction win[b]) or K (mean):
// cx[b, perm_x[j], kk] = coef[b] * dS/dsx_j, cy[b, perm_y[j], kk] = -(same).
cudaError_t sw_grad(DType dt, const void* sorted, const int32_t* perm, const int64_t* win,
                    const double* coef, int64_t B, int64_t K, int64_t n, double p, bool use_max,
                    void* cx, void* cy, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyengine

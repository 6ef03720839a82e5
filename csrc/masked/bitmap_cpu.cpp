// CPU implementation of sparse_linear_bitmap (schema in csrc/module.cpp; format in
// masked/bitmap_kernels.h): every tile's value range is checked before any value is read, with
// the words of the CUDA device check, then each row tile's 16 outputs are accumulated from the set
// bits of its words against a transposed block of up to 8 rows of x (the inner loop runs over them);
// larger batches densify W a block of rows at a time for the BLAS GEMM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "masked/bitmap_format.h"
#include "masked/masked_args.h"

namespace pyengine {
namespace {

constexpr int64_t kRows = kBmRows, kCols = kBmCols, kWords = kBmWords;
constexpr int64_t kWalkMaxRows = 8;  // beyond this many rows of x: densify W block by block for the GEMM

// Set bits of a word, in plain arithmetic: the baseline build has no popcnt instruction, and there
// __builtin_popcount becomes a library call that costs more than the walk over the tile.
inline int64_t popcount32(uint32_t v) {
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  v = (v + (v >> 4)) & 0x0F0F0F0Fu;
  return static_cast<int64_t>((v * 0x01010101u) >> 24);
}

// Tile t may be read when 0 <= offsets[t] <= offsets[t + 1] <= nnz and the range holds exactly
// the tile's set bits.
void check_tiles_cpu(const OpChecks& op, const int32_t* offsets, const uint32_t* bitmap, int64_t tiles,
                     int64_t nnz) {
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t a = offsets[t], b = offsets[t + 1];
    if (a < 0 || b < a || b > nnz) op.value_error(tile_range_message(t, a, b));
    int64_t bits = 0;
    for (int64_t w = 0; w < kWords; ++w) bits += popcount32(bitmap[t * kWords + w]);
    if (b - a != bits) op.value_error(tile_count_message(t, b - a, bits));
  }
}

// Rows [m0, m0 + MB) of x (xb: (K, MB), x^T of that block, zero-padded) against every row tile:
// a fixed block width lets the compiler keep the 16 x MB accumulators in vector registers.
template <typename scalar_t, int MB>
void bitmap_linear_block(const scalar_t* xb, int64_t m0, int64_t mb, int64_t K, int64_t N,
                         const uint32_t* bitmap, const int32_t* offsets, const scalar_t* values, const scalar_t* bias,
                         scalar_t* out) {
  const int64_t KT = (K + kCols - 1) / kCols, NT = (N + kRows - 1) / kRows;
  at::parallel_for(0, NT, 1, [&](int64_t begin, int64_t end) {
    for (int64_t rt = begin; rt < end; ++rt) {
      scalar_t acc[kRows][MB] = {};
      for (int64_t kt = 0; kt < KT; ++kt) {
        const int64_t t = rt * KT + kt;
        int64_t p = offsets[t];
        for (int64_t w = 0; w < kWords; ++w) {
          uint32_t bits = bitmap[t * kWords + w];
          const int64_t r = w >> 1, c0 = kt * kCols + 32 * (w & 1);
          // padding bits (rows >= N, columns >= K) take their value slot but are not multiplied
          const int64_t vc = rt * kRows + r < N ? std::min<int64_t>(32, K - c0) : 0;
          const uint32_t inside = vc >= 32 ? 0xffffffffu : (vc <= 0 ? 0u : ((1u << vc) - 1u));
          while (bits != 0) {
            const int j = __builtin_ctz(bits);
            bits &= bits - 1;
            const scalar_t v = values[p++];
            if (!((inside >> j) & 1u)) continue;
            const scalar_t* xc = xb + (c0 + j) * MB;
            for (int m = 0; m < MB; ++m) acc[r][m] += v * xc[m];
          }
        }
      }
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t row = rt * kRows + r;
        if (row >= N) break;
        const scalar_t b = bias != nullptr ? bias[row] : scalar_t(0);
        for (int64_t m = 0; m < mb; ++m) out[(m0 + m) * N + row] = acc[r][m] + b;
      }
    }
  });
}

// out (M, N) = x (M, K) @ W^T + bias, x taken MB rows at a time.
template <typename scalar_t, int MB>
void bitmap_linear_rows(const at::Tensor& x, int64_t N, const uint32_t* bitmap, const int32_t* offsets,
                        const scalar_t* values, const scalar_t* bias, scalar_t* out) {
  const int64_t M = x.size(0), K = x.size(1);
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t mb = std::min<int64_t>(MB, M - m0);
    at::Tensor xb = at::zeros({K, MB}, x.options());
    xb.narrow(1, 0, mb).copy_(x.narrow(0, m0, mb).t());
    bitmap_linear_block<scalar_t, MB>(xb.data_ptr<scalar_t>(), m0, mb, K, N, bitmap, offsets, values, bias, out);
  }
}

// Rows [rt0 * 16, min(N, rt1 * 16)) of W, dense, into w (those rows x K; every element written).
template <typename scalar_t>
void bitmap_densify_rows(int64_t N, int64_t K, int64_t rt0, int64_t rt1, const uint32_t* bitmap,
                         const int32_t* offsets, const scalar_t* values, scalar_t* w) {
  const int64_t KT = (K + kCols - 1) / kCols;
  at::parallel_for(rt0, rt1, 1, [&](int64_t begin, int64_t end) {
    const int64_t r0 = begin * kRows, r1 = std::min(N, end * kRows);
    std::fill(w + (r0 - rt0 * kRows) * K, w + (r1 - rt0 * kRows) * K, scalar_t(0));
    for (int64_t rt = begin; rt < end; ++rt) {
      for (int64_t kt = 0; kt < KT; ++kt) {
        const int64_t t = rt * KT + kt;
        int64_t p = offsets[t];
        for (int64_t wd = 0; wd < kWords; ++wd) {
          uint32_t bits = bitmap[t * kWords + wd];
          const int64_t row = rt * kRows + (wd >> 1), c0 = kt * kCols + 32 * (wd & 1);
          while (bits != 0) {
            const int j = __builtin_ctz(bits);
            bits &= bits - 1;
            const scalar_t v = values[p++];
            if (row < N && c0 + j < K) w[(row - rt0 * kRows) * K + c0 + j] = v;
          }
        }
      }
    }
  });
}

// out (M, N) = x @ W^T (+ bias) for larger batches: W densified a block of row tiles at a time
// (about 4 MB, reused) and multiplied by the BLAS GEMM, so no W-sized buffer is ever touched.
template <typename scalar_t>
void bitmap_linear_gemm(const at::Tensor& x, int64_t N, const uint32_t* bitmap, const int32_t* offsets,
                        const scalar_t* values, const at::Tensor& bias, at::Tensor& out) {
  const int64_t K = x.size(1), NT = (N + kRows - 1) / kRows;
  const int64_t block_tiles =
      std::max<int64_t>(1, (int64_t(4) << 20) / std::max<int64_t>(1, kRows * K * int64_t(sizeof(scalar_t))));
  at::Tensor buf = at::empty({std::min(NT, block_tiles) * kRows, K}, x.options());
  for (int64_t rt0 = 0; rt0 < NT; rt0 += block_tiles) {
    const int64_t rt1 = std::min(NT, rt0 + block_tiles);
    const int64_t n0 = rt0 * kRows, rows = std::min(N, rt1 * kRows) - n0;
    bitmap_densify_rows<scalar_t>(N, K, rt0, rt1, bitmap, offsets, values, buf.data_ptr<scalar_t>());
    const at::Tensor wt = buf.narrow(0, 0, rows).t();
    at::Tensor dst = out.narrow(1, n0, rows);
    if (bias.defined()) dst.copy_(at::addmm(bias.narrow(0, n0, rows), x, wt));
    else dst.copy_(at::mm(x, wt));
  }
}

at::Tensor sparse_linear_bitmap_cpu(const at::Tensor& x_, const at::Tensor& bitmap_, const at::Tensor& offsets_,
                                    const at::Tensor& values_, int64_t out_features,
                                    const std::optional<at::Tensor>& bias_) {
  const OpChecks op{"sparse_linear_bitmap"};
  const int64_t tiles = check_bitmap_linear_args(op, x_, bitmap_, offsets_, values_, out_features, bias_);
  const int64_t M = x_.size(0), N = out_features;
  const at::Tensor bitmap = bitmap_.contiguous();
  const at::Tensor offsets = offsets_.contiguous();
  const uint32_t* bm = reinterpret_cast<const uint32_t*>(bitmap.data_ptr<int32_t>());
  check_tiles_cpu(op, offsets.data_ptr<int32_t>(), bm, tiles, values_.numel());
  const auto dtype = x_.scalar_type();
  const auto work = dtype == at::kDouble ? at::kDouble : at::kFloat;  // half types compute in float32
  const at::Tensor x = x_.to(work);
  const at::Tensor values = values_.to(work).contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) bias = bias_->to(work).contiguous();
  at::Tensor out = at::empty({M, N}, x_.options().dtype(work));
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES(work, "sparse_linear_bitmap", [&] {
      const int32_t* off = offsets.data_ptr<int32_t>();
      const scalar_t* vp = values.data_ptr<scalar_t>();
      const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      scalar_t* op_ = out.data_ptr<scalar_t>();
      if (M == 1) bitmap_linear_rows<scalar_t, 1>(x, N, bm, off, vp, bp, op_);
      else if (M <= 4) bitmap_linear_rows<scalar_t, 4>(x, N, bm, off, vp, bp, op_);
      else if (M <= kWalkMaxRows) bitmap_linear_rows<scalar_t, 8>(x, N, bm, off, vp, bp, op_);
      else bitmap_linear_gemm<scalar_t>(x, N, bm, off, vp, bias, out);
    });
  }
  return dtype == work ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) { m.impl("sparse_linear_bitmap", &sparse_linear_bitmap_cpu); }

}  // namespace pyengine

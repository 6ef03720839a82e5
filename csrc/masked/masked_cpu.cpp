// CPU kernels: masked linear (forward/backward in row tiles, never a W-sized masked copy),
// CSR packing and sparse x dense product, and the multi-tensor mask upkeep.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/buffer_pool.h"
#include "masked/masked_args.h"

#define PYENGINE_SIMD_KERNELS "masked/masked_simd.inc"
#include "common/simd.h"

namespace pyengine {
namespace {

// Rows of W per tile: the tile holds about 1M elements (4 MB in fp32), so one GEMM per tile
// stays efficient while the masked copy stays small.
int64_t tile_rows(int64_t N, int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 20) / std::max<int64_t>(K, 1)));
}

// d = s * m elementwise over n contiguous entries (d may alias s), as the reference's W * M.
void mask_mul_any(const at::Tensor& src, const bool* mask, at::Tensor& dst, int64_t n) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "mask_mul", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 15, [&](int64_t a, int64_t b) {
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
        PYENGINE_SIMD(mask_mul(s + a, mask + a, d + a, b - a));
      } else {
        for (int64_t i = a; i < b; ++i) d[i] = s[i] * scalar_t(float(mask[i]));
      }
    });
  });
}

// dst[r, :] = src[r, :] * mask[r, :] for nb rows of length K (all contiguous).
void mask_rows(const at::Tensor& src, const bool* mask, at::Tensor& dst, int64_t nb, int64_t K) {
  mask_mul_any(src, mask, dst, nb * K);
}

// t *= mask, in place.
void zero_unmasked(at::Tensor& t, const bool* mask) { mask_mul_any(t, mask, t, t.numel()); }

at::Tensor masked_linear_cpu(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& mask_,
                             const c10::optional<at::Tensor>& bias) {
  check_masked_args(OpChecks{"masked_linear"}, x_, w_, mask_, bias);
  auto x = x_.contiguous();
  auto w = w_.contiguous();
  auto mask = mask_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) {
    out.zero_();
  } else {
    const int64_t nt = tile_rows(N, K);
    auto buf = at::empty({nt, K}, w.options());
    const bool* mp = mask.data_ptr<bool>();
    for (int64_t n0 = 0; n0 < N; n0 += nt) {
      const int64_t nb = std::min(nt, N - n0);
      auto tile = buf.narrow(0, 0, nb);
      mask_rows(w.narrow(0, n0, nb), mp + n0 * K, tile, nb, K);
      auto dst = out.narrow(1, n0, nb);
      at::mm_out(dst, x, tile.t());
    }
  }
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& mask_, bool need_x,
    bool need_w, bool need_b) {
  check_masked_bwd_args(OpChecks{"masked_linear_backward"}, dy_, x_, w_, mask_);
  auto dy = dy_.contiguous();
  auto x = x_.contiguous();
  auto w = w_.contiguous();
  auto mask = mask_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor dx = need_x ? at::zeros({M, K}, x.options()) : at::empty({0}, x.options());
  at::Tensor dw = need_w ? pooled_empty_cpu({N, K}, w.options()) : at::empty({0}, w.options());
  at::Tensor db = need_b ? dy.sum(0) : at::empty({0}, w.options());
  const bool* mp = mask.data_ptr<bool>();
  if ((need_x || need_w) && N > 0 && K > 0) {
    const int64_t nt = tile_rows(N, K);
    at::Tensor buf = need_x ? at::empty({nt, K}, w.options()) : at::Tensor();
    // dx sums one product per row tile: in float16 / bfloat16 a running sum rounded after every
    // tile loses precision with the tile count (nearly 6x PyTorch's error at 64 tiles), so half types
    // accumulate in float32 and round once at the end, as one GEMM would.
    const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
    const bool acc32 = need_x && M > 0 && half && nt < N;
    const at::Tensor dy32 = acc32 ? dy.to(at::kFloat) : at::Tensor();
    at::Tensor dx32 = acc32 ? at::zeros({M, K}, x.options().dtype(at::kFloat)) : at::Tensor();
    for (int64_t n0 = 0; n0 < N; n0 += nt) {
      const int64_t nb = std::min(nt, N - n0);
      auto dy_t = dy.narrow(1, n0, nb);  // (M, nb), row stride N
      if (need_x && M > 0) {
        auto tile = buf.narrow(0, 0, nb);
        mask_rows(w.narrow(0, n0, nb), mp + n0 * K, tile, nb, K);
        if (acc32)
          dx32.addmm_(dy32.narrow(1, n0, nb), tile.to(at::kFloat));
        else
          dx.addmm_(dy_t, tile);
      }
      if (need_w) {
        auto dw_t = dw.narrow(0, n0, nb);
        if (M > 0) {
          at::mm_out(dw_t, dy_t.t(), x);
          zero_unmasked(dw_t, mp + n0 * K);
        } else {
          dw_t.zero_();
        }
      }
    }
    if (acc32) dx.copy_(dx32);
  } else if (need_w) {
    dw.zero_();
  }
  return {dx, dw, db};
}

// ------------------------------------------------------------------------------ CSR

template <typename scalar_t, typename index_t>
void pack_fill(const scalar_t* w, int64_t N, int64_t K, const int32_t* rowptr, index_t* col, scalar_t* val) {
  at::parallel_for(0, N, 16, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      int64_t j = rowptr[n];
      const scalar_t* row = w + n * K;
      for (int64_t k = 0; k < K; ++k) {
        if (row[k] != scalar_t(0)) {
          col[j] = static_cast<index_t>(k);
          val[j] = row[k];
          ++j;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_sparse_cpu(const at::Tensor& w_) {
  check_pack_args(OpChecks{"pack_sparse"}, w_);
  auto w = w_.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto rowptr = at::zeros({N + 1}, w.options().dtype(at::kInt));
  int32_t* rp = rowptr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "pack_count", [&] {
    const scalar_t* p = w.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        int32_t c = 0;
        for (int64_t k = 0; k < K; ++k) c += p[n * K + k] != scalar_t(0);
        rp[n + 1] = c;
      }
    });
  });
  for (int64_t n = 0; n < N; ++n) rp[n + 1] += rp[n];
  const int64_t nnz = rp[N];
  const bool narrow = K < 32768;
  auto col = at::empty({nnz}, w.options().dtype(narrow ? at::kShort : at::kInt));
  auto val = at::empty({nnz}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "pack_fill", [&] {
    if (narrow)
      pack_fill<scalar_t, int16_t>(w.data_ptr<scalar_t>(), N, K, rp, col.data_ptr<int16_t>(), val.data_ptr<scalar_t>());
    else
      pack_fill<scalar_t, int32_t>(w.data_ptr<scalar_t>(), N, K, rp, col.data_ptr<int32_t>(), val.data_ptr<scalar_t>());
  });
  return {rowptr, col, val};
}

constexpr int kMB = 16;  // input rows per block: 16 accumulators of T per output row

// out (N, M) = W x^T with W in CSR (indices checked by the caller); T is float or double.
template <typename T, typename I>
void spmm_cpu(const int32_t* rp, const I* col, const T* val, const T* x, const T* bias, int64_t M, int64_t K,
              int64_t N, T* outT) {
  const int64_t nblocks = (M + kMB - 1) / kMB;
  std::vector<T> packed(size_t(nblocks) * K * kMB);
  // Pack x (M, K) into blocks xb[b][k][t] = x[b*MB + t, k] (zero padded).
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* xb = packed.data() + b * K * kMB;
      const int64_t m0 = b * kMB;
      const int mb = int(std::min<int64_t>(kMB, M - m0));
      for (int64_t k = 0; k < K; ++k) {
        for (int t = 0; t < kMB; ++t) xb[k * kMB + t] = t < mb ? x[(m0 + t) * K + k] : T(0);
      }
    }
  });
  const int64_t avg = std::max<int64_t>(1, rp[N] / std::max<int64_t>(N, 1));
  const int64_t grain = std::max<int64_t>(1, 4096 / avg);
  // Output is (N, M) row-major with blocks of kMB columns; rows n of block b are written at
  // outT[n * M + b * kMB].
  at::parallel_for(0, nblocks * N, grain, [&](int64_t a, int64_t e) {
    while (a < e) {
      const int64_t b = a / N;
      const int64_t n0 = a % N;
      const int64_t n1 = std::min<int64_t>(N, n0 + (e - a));
      const T* xb = packed.data() + b * K * kMB;
      const int64_t m0 = b * kMB;
      const int mb = int(std::min<int64_t>(kMB, M - m0));
      if (mb == kMB)
        PYENGINE_SIMD(spmm_rows<T, I, kMB>(rp, col, val, xb, bias, n0, n1, outT + m0, M));
      else
        PYENGINE_SIMD(spmm_rows_tail<T, I, kMB>(rp, col, val, xb, bias, n0, n1, outT + m0, M, mb));
      a += n1 - n0;
    }
  });
}

// The column indices of a CSR matrix with K columns lie in [0, K): one vectorised min/max pass;
// only when it fails is the first bad position looked for, for the message.
void check_colidx_cpu(const OpChecks& op, const at::Tensor& col, int64_t K) {
  const int64_t nnz = col.numel();
  if (nnz == 0) return;
  int64_t lo = 0, hi = 0;
  if (col.scalar_type() == at::kShort)
    PYENGINE_SIMD(index_range(col.data_ptr<int16_t>(), nnz, &lo, &hi));
  else
    PYENGINE_SIMD(index_range(col.data_ptr<int32_t>(), nnz, &lo, &hi));
  if (lo >= 0 && hi < K) return;
  int64_t v = 0;
  const int64_t pos = first_out_of_range(col, K, &v);
  op.value_error("colidx holds ", v, " at position ", pos, ", but in_features is ", K);
}

at::Tensor sparse_linear_cpu(const at::Tensor& x_, const at::Tensor& rowptr_, const at::Tensor& col_,
                             const at::Tensor& val_, int64_t in_features, const c10::optional<at::Tensor>& bias_) {
  const OpChecks op{"sparse_linear"};
  const int64_t N = check_sparse_linear_args(op, x_, rowptr_, col_, val_, in_features, bias_);
  const int64_t M = x_.size(0), K = in_features;
  auto rowptr = rowptr_.contiguous();
  check_rowptr_cpu(op, rowptr, val_.numel());  // O(N); the column indices below, in one pass
  const auto dtype = x_.scalar_type();
  // Half types compute in float32.
  const auto work = (dtype == at::kDouble) ? at::kDouble : at::kFloat;
  auto x = x_.to(work).contiguous();
  auto val = val_.to(work).contiguous();
  auto col = col_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) bias = bias_->to(work).contiguous();
  check_colidx_cpu(op, col, K);  // before any read of x through them
  auto outT = at::empty({N, M}, x.options());
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES(work, "sparse_linear", [&] {
      const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      if (col.scalar_type() == at::kShort)
        spmm_cpu<scalar_t, int16_t>(rowptr.data_ptr<int32_t>(), col.data_ptr<int16_t>(), val.data_ptr<scalar_t>(),
                                    x.data_ptr<scalar_t>(), bp, M, K, N, outT.data_ptr<scalar_t>());
      else
        spmm_cpu<scalar_t, int32_t>(rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(), val.data_ptr<scalar_t>(),
                                    x.data_ptr<scalar_t>(), bp, M, K, N, outT.data_ptr<scalar_t>());
    });
  }
  auto out = outT.t().contiguous();
  return dtype == work ? out : out.to(dtype);
}

// ------------------------------------------------------------------------------ mask upkeep

void apply_masks_cpu(at::TensorList tensors, at::TensorList masks, at::IntArrayRef mask_index) {
  check_apply_masks_args(OpChecks{"apply_masks_"}, tensors, masks, mask_index);
  struct Chunk {
    char* data;
    const bool* mask;
    int64_t begin, end;
    int elt;
  };
  constexpr int64_t kChunk = 1 << 16;
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    const auto& m = masks[mask_index[i]];
    const int elt = int(t.element_size());
    for (int64_t b = 0; b < t.numel(); b += kChunk)
      chunks.push_back({static_cast<char*>(t.data_ptr()), m.data_ptr<bool>(), b, std::min(t.numel(), b + kChunk), elt});
  }
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) {
      const Chunk& ch = chunks[c];
      // Zero bits are +0.0 in every floating format, so the element size is all that matters.
      const int64_t len = ch.end - ch.begin;
      const bool* m = ch.mask + ch.begin;
      switch (ch.elt) {
        case 1: {
          auto* d = reinterpret_cast<uint8_t*>(ch.data) + ch.begin;
          PYENGINE_SIMD(zero_masked_bits(d, m, len));
          break;
        }
        case 2: {
          auto* d = reinterpret_cast<uint16_t*>(ch.data) + ch.begin;
          PYENGINE_SIMD(zero_masked_bits(d, m, len));
          break;
        }
        case 4: {
          auto* d = reinterpret_cast<uint32_t*>(ch.data) + ch.begin;
          PYENGINE_SIMD(zero_masked_bits(d, m, len));
          break;
        }
        default: {
          auto* d = reinterpret_cast<uint64_t*>(ch.data) + ch.begin;
          PYENGINE_SIMD(zero_masked_bits(d, m, len));
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_backward", &masked_linear_backward_cpu);
  m.impl("pack_sparse", &pack_sparse_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("apply_masks_", &apply_masks_cpu);
}

}  // namespace pyengine

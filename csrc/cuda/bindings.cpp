// CUDA implementations of the torch.ops.pyengine operators (schemas in csrc/module.cpp):
// argument checks, output allocation, the current stream, GEMMs through ATen (cuBLAS) and calls
// into the raw kernels of csrc/cuda/*.cu through the plain interface of csrc/cuda/launchers.h.
// Compiled by the host compiler with the torch headers; no CUDA kernel code here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cuda/launchers.h"

namespace {

namespace pc = pyengine::cuda;

// ---------------------------------------------------------------------------------- helpers

pc::DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return pc::DType::kFloat32;
    case at::kHalf: return pc::DType::kFloat16;
    case at::kBFloat16: return pc::DType::kBFloat16;
    case at::kDouble: return pc::DType::kFloat64;
    default: break;
  }
  TORCH_CHECK(false, "pyengine: ", name, " has dtype ", t.scalar_type(),
              "; expected float32, float16, bfloat16 or float64");
  return pc::DType::kFloat32;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "pyengine: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "pyengine: ", name, " is on ", t.device(),
              " but the other arguments are on ", ref.device());
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pyengine: ", name, " has dtype ",
              t.scalar_type(), " but expected ", ref.scalar_type());
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
T* ptr_at(const at::Tensor& t, int64_t elem_offset) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + elem_offset * t.element_size());
}

// Events cached per thread and device (created once, reused; never destroyed). Slots:
// 0..4 the tile pipeline, 5..6 the dW pipeline.
constexpr int kEventSlots = 8;
cudaEvent_t cached_event(int device, int slot) {
  thread_local std::unordered_map<int, std::array<cudaEvent_t, kEventSlots>> cache;
  auto it = cache.find(device);
  if (it == cache.end()) {
    std::array<cudaEvent_t, kEventSlots> none{};
    none.fill(nullptr);
    it = cache.emplace(device, none).first;
  }
  cudaEvent_t& e = it->second[slot];
  if (e == nullptr) C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

// Extent of one tile along a dimension of `total` slices of `slice_bytes` bytes each, for a GEMM
// whose output tile is `other` x extent. Small matrices go in one tile; otherwise tiles of
// 8..32 MB (bigger when `other` is small, so each GEMM still has >= 2M outputs), at most about a
// quarter of the whole (the two tile buffers then hold at most half of it), a multiple of 8.
int64_t tile_extent(int64_t total, int64_t slice_bytes, int64_t other) {
  if (total <= 8 || total * slice_bytes <= (int64_t(2) << 20)) return total;
  const int64_t lo = std::max<int64_t>(1, (int64_t(8) << 20) / slice_bytes);
  const int64_t hi = std::max<int64_t>(lo, (int64_t(32) << 20) / slice_bytes);
  const int64_t want = ceil_div(int64_t(1) << 21, std::max<int64_t>(other, 1));
  int64_t t = std::min(std::max(want, lo), hi);
  t = std::min(t, ceil_div(total, 4));
  t = ceil_div(t, 8) * 8;
  return std::min(t, total);
}

// The first rows*cols elements of a contiguous buffer, as a contiguous (rows, cols) matrix.
at::Tensor buffer_view(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

// Tile pipeline: tile t is produced (a kernel writing buffer t % 2) on a side stream while the
// main (current) stream consumes tile t - 1 (a GEMM reading the other buffer). With one tile
// everything runs on the current stream. The side stream first waits for the current stream,
// and the current stream waits for every produced tile before consuming it, so all work is
// ordered before whatever the current stream does next (also under CUDA graph capture).
template <class Produce, class Consume>
void run_tile_pipeline(int64_t ntiles, const at::Tensor& buf0, const at::Tensor& buf1,
                       Produce&& produce, Consume&& consume) {
  c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
  if (ntiles <= 0) return;
  if (ntiles == 1) {
    produce(int64_t(0), buf0, main.stream());
    consume(int64_t(0), buf0);
    return;
  }
  const int dev = main.device_index();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, main.device_index());
  cudaEvent_t ready = cached_event(dev, 0);
  cudaEvent_t produced[2] = {cached_event(dev, 1), cached_event(dev, 2)};
  cudaEvent_t consumed[2] = {cached_event(dev, 3), cached_event(dev, 4)};

  C10_CUDA_CHECK(cudaEventRecord(ready, main.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), ready, 0));
  for (int64_t t = 0; t < ntiles; ++t) {
    const int b = static_cast<int>(t & 1);
    const at::Tensor& buf = b ? buf1 : buf0;
    if (t >= 2) C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), consumed[b], 0));
    produce(t, buf, side.stream());
    C10_CUDA_CHECK(cudaEventRecord(produced[b], side.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(main.stream(), produced[b], 0));
    consume(t, buf);
    C10_CUDA_CHECK(cudaEventRecord(consumed[b], main.stream()));
  }
}

// out (m, n) = x (m, k) @ W^T + bias, W given tile by tile: produce(n0, rows, tile, stream) must
// write rows [n0, n0 + rows) of W (or W * M) into the contiguous (rows, k) matrix `tile`.
template <class ProduceRows>
void tiled_linear(const at::Tensor& x, const std::optional<at::Tensor>& bias, at::Tensor& out,
                  int64_t n, int64_t k, ProduceRows&& produce_rows) {
  const int64_t m = x.size(0);
  const int64_t nt = tile_extent(n, k * x.element_size(), m);
  const int64_t ntiles = ceil_div(n, nt);
  at::Tensor buf0 = at::empty({nt * k}, x.options());
  at::Tensor buf1 = ntiles > 1 ? at::empty({nt * k}, x.options()) : buf0;
  run_tile_pipeline(
      ntiles, buf0, buf1,
      [&](int64_t t, const at::Tensor& buf, cudaStream_t stream) {
        const int64_t n0 = t * nt;
        const int64_t rows = std::min(nt, n - n0);
        produce_rows(n0, rows, buf, stream);
      },
      [&](int64_t t, const at::Tensor& buf) {
        const int64_t n0 = t * nt;
        const int64_t rows = std::min(nt, n - n0);
        const at::Tensor tile = buffer_view(buf, rows, k);
        at::Tensor dst = ntiles == 1 ? out : out.narrow(1, n0, rows);
        if (bias.has_value() && bias->defined()) {
          at::addmm_out(dst, bias->narrow(0, n0, rows), x, tile.t());
        } else {
          at::mm_out(dst, x, tile.t());
        }
      });
}

bool has_bias(const std::optional<at::Tensor>& bias) { return bias.has_value() && bias->defined(); }

// ---------------------------------------------------------------------------------- masked linear

void check_masked_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2, "pyengine.masked_linear: x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "pyengine.masked_linear: weight must be 2-D (N, K), got shape ",
              weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "pyengine.masked_linear: x has ", x.size(1),
              " features but weight expects ", weight.size(1));
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pyengine.masked_linear: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.sizes() == weight.sizes(), "pyengine.masked_linear: mask has shape ", mask.sizes(),
              " but weight has ", weight.sizes());
  check_cuda(x, "x", x);
  check_cuda(weight, "weight", x);
  check_cuda(mask, "mask", x);
  float_dtype(x, "x");
  check_same_dtype(weight, "weight", x);
}

at::Tensor masked_linear_cuda(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& mask_,
                              const std::optional<at::Tensor>& bias) {
  check_masked_args(x_, weight_, mask_);
  const pc::DType dt = float_dtype(x_, "x");
  if (has_bias(bias)) {
    check_cuda(*bias, "bias", x_);
    check_same_dtype(*bias, "bias", x_);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight_.size(0),
                "pyengine.masked_linear: bias must have shape (", weight_.size(0), ",), got ", bias->sizes());
  }
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor w = weight_.contiguous();
  const at::Tensor mask = mask_.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  if (k == 0) {
    if (has_bias(bias)) out.copy_(bias->unsqueeze(0).expand({m, n}));
    else out.zero_();
    return out;
  }
  const bool* mp = mask.data_ptr<bool>();
  tiled_linear(x, bias, out, n, k, [&](int64_t n0, int64_t rows, const at::Tensor& buf, cudaStream_t stream) {
    C10_CUDA_CHECK(pc::masked_copy(dt, buf.data_ptr(), k, ptr_at<const void>(w, n0 * k), k, mp + n0 * k, k,
                                   rows, k, stream));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& mask_,
    bool need_x, bool need_w, bool need_b) {
  check_masked_args(x_, weight_, mask_);
  const pc::DType dt = float_dtype(x_, "x");
  check_cuda(grad_out_, "grad_out", x_);
  check_same_dtype(grad_out_, "grad_out", x_);
  TORCH_CHECK(grad_out_.dim() == 2 && grad_out_.size(0) == x_.size(0) && grad_out_.size(1) == weight_.size(0),
              "pyengine.masked_linear_backward: grad_out must have shape (", x_.size(0), ", ", weight_.size(0),
              "), got ", grad_out_.sizes());
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor dy = grad_out_.contiguous();
  const int64_t m = x_.size(0), k = x_.size(1), n = weight_.size(0);
  const bool* mp = nullptr;
  at::Tensor mask, w, x;
  if (need_x || need_w) {
    mask = mask_.contiguous();
    mp = mask.data_ptr<bool>();
  }

  at::Tensor dx = at::empty({0}, x_.options());
  if (need_x) {
    dx = at::empty({m, k}, x_.options());
    if (m > 0 && k > 0) {
      if (n == 0) {
        dx.zero_();
      } else {
        // dx = dy (W*M), column tiles of W*M: dx[:, k0:k0+kc] = dy @ (W*M)[:, k0:k0+kc]
        w = weight_.contiguous();
        const int64_t kc = tile_extent(k, n * w.element_size(), m);
        const int64_t ntiles = ceil_div(k, kc);
        at::Tensor buf0 = at::empty({n * kc}, w.options());
        at::Tensor buf1 = ntiles > 1 ? at::empty({n * kc}, w.options()) : buf0;
        run_tile_pipeline(
            ntiles, buf0, buf1,
            [&](int64_t t, const at::Tensor& buf, cudaStream_t stream) {
              const int64_t k0 = t * kc;
              const int64_t cols = std::min(kc, k - k0);
              C10_CUDA_CHECK(pc::masked_copy(dt, buf.data_ptr(), cols, ptr_at<const void>(w, k0), k, mp + k0, k,
                                             n, cols, stream));
            },
            [&](int64_t t, const at::Tensor& buf) {
              const int64_t k0 = t * kc;
              const int64_t cols = std::min(kc, k - k0);
              const at::Tensor tile = buffer_view(buf, n, cols);
              at::Tensor dst = ntiles == 1 ? dx : dx.narrow(1, k0, cols);
              at::mm_out(dst, dy, tile);
            });
      }
    }
  }

  at::Tensor dw = at::empty({0}, weight_.options());
  if (need_w) {
    dw = at::empty({n, k}, weight_.options());
    if (n > 0 && k > 0) {
      if (m == 0) {
        dw.zero_();
      } else {
        // dW = (dy^T x) * M, row tiles: GEMM on the current stream, masking in place on a side
        // stream while the next tile's GEMM runs.
        x = x_.contiguous();
        const int64_t nt = tile_extent(n, k * dw.element_size(), k);
        const int64_t ntiles = ceil_div(n, nt);
        c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
        if (ntiles == 1) {
          at::mm_out(dw, dy.t(), x);
          C10_CUDA_CHECK(pc::masked_copy(dt, dw.data_ptr(), k, dw.data_ptr(), k, mp, k, n, k, main.stream()));
        } else {
          const int dev = main.device_index();
          c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, main.device_index());
          cudaEvent_t gemm_done = cached_event(dev, 5);
          cudaEvent_t side_done = cached_event(dev, 6);
          for (int64_t t = 0; t < ntiles; ++t) {
            const int64_t n0 = t * nt;
            const int64_t rows = std::min(nt, n - n0);
            at::Tensor dst = dw.narrow(0, n0, rows);
            at::mm_out(dst, dy.narrow(1, n0, rows).t(), x);
            C10_CUDA_CHECK(cudaEventRecord(gemm_done, main.stream()));
            C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), gemm_done, 0));
            void* p = ptr_at<void>(dw, n0 * k);
            C10_CUDA_CHECK(pc::masked_copy(dt, p, k, p, k, mp + n0 * k, k, rows, k, side.stream()));
          }
          C10_CUDA_CHECK(cudaEventRecord(side_done, side.stream()));
          C10_CUDA_CHECK(cudaStreamWaitEvent(main.stream(), side_done, 0));
        }
      }
    }
  }

  at::Tensor db = at::empty({0}, weight_.options());
  if (need_b) db = dy.sum(0);  // fp32 accumulation for half types, one rounding; zeros when m == 0
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------------- pack / sparse

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_sparse_cuda(const at::Tensor& weight_) {
  TORCH_CHECK(weight_.dim() == 2, "pyengine.pack_sparse: weight must be 2-D, got shape ", weight_.sizes());
  TORCH_CHECK(weight_.is_cuda(), "pyengine.pack_sparse: weight must be a CUDA tensor");
  const pc::DType dt = float_dtype(weight_, "weight");
  TORCH_CHECK(weight_.numel() < (int64_t(1) << 31), "pyengine.pack_sparse: weight has 2**31 or more entries");
  c10::cuda::CUDAGuard guard(weight_.device());
  const at::Tensor w = weight_.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const auto idx_type = k < 32768 ? at::kShort : at::kInt;
  const auto iopts = w.options().dtype(at::kInt);
  at::Tensor rowptr = at::empty({n + 1}, iopts);
  if (n == 0 || k == 0) {
    rowptr.zero_();
    return {rowptr, at::empty({0}, w.options().dtype(idx_type)), at::empty({0}, w.options())};
  }
  const cudaStream_t stream = current_stream();
  at::Tensor counts = at::empty({n}, iopts);
  C10_CUDA_CHECK(pc::pack_count_rows(dt, w.data_ptr(), n, k, counts.data_ptr<int32_t>(), stream));
  const size_t temp_bytes = pc::pack_scan_temp_bytes(n);
  at::Tensor temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 16))}, w.options().dtype(at::kByte));
  C10_CUDA_CHECK(pc::pack_scan(temp.data_ptr(), std::max<size_t>(temp_bytes, 16), counts.data_ptr<int32_t>(),
                               rowptr.data_ptr<int32_t>(), n, stream));
  const int64_t nnz = rowptr.select(0, n).item<int32_t>();  // synchronises
  at::Tensor colidx = at::empty({nnz}, w.options().dtype(idx_type));
  at::Tensor values = at::empty({nnz}, w.options());
  if (nnz > 0) {
    C10_CUDA_CHECK(pc::pack_fill(dt, w.data_ptr(), n, k, rowptr.data_ptr<int32_t>(), colidx.data_ptr(),
                                 idx_type == at::kShort, values.data_ptr(), stream));
  }
  return {rowptr, colidx, values};
}

at::Tensor sparse_linear_cuda(const at::Tensor& x_, const at::Tensor& rowptr_, const at::Tensor& colidx_,
                              const at::Tensor& values_, int64_t in_features,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_.dim() == 2, "pyengine.sparse_linear: x must be 2-D (M, K), got shape ", x_.sizes());
  TORCH_CHECK(x_.size(1) == in_features, "pyengine.sparse_linear: x has ", x_.size(1),
              " features but the packed weight expects ", in_features);
  TORCH_CHECK(rowptr_.dim() == 1 && rowptr_.numel() >= 1 && rowptr_.scalar_type() == at::kInt,
              "pyengine.sparse_linear: rowptr must be a non-empty 1-D int32 tensor");
  TORCH_CHECK(colidx_.dim() == 1 && (colidx_.scalar_type() == at::kShort || colidx_.scalar_type() == at::kInt),
              "pyengine.sparse_linear: colidx must be a 1-D int16 or int32 tensor");
  TORCH_CHECK(values_.dim() == 1 && values_.numel() == colidx_.numel(),
              "pyengine.sparse_linear: values must be 1-D with as many entries as colidx");
  const pc::DType dt = float_dtype(x_, "x");
  check_same_dtype(values_, "values", x_);
  check_cuda(x_, "x", x_);
  check_cuda(rowptr_, "rowptr", x_);
  check_cuda(colidx_, "colidx", x_);
  check_cuda(values_, "values", x_);
  const int64_t n = rowptr_.numel() - 1;
  if (has_bias(bias)) {
    check_cuda(*bias, "bias", x_);
    check_same_dtype(*bias, "bias", x_);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "pyengine.sparse_linear: bias must have shape (", n,
                ",), got ", bias->sizes());
  }
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor rowptr = rowptr_.contiguous();
  const at::Tensor colidx = colidx_.contiguous();
  const at::Tensor values = values_.contiguous();
  const at::Tensor b = has_bias(bias) ? bias->contiguous() : at::Tensor();
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  if (k == 0 || values.numel() == 0) {
    if (b.defined()) out.copy_(b.unsqueeze(0).expand({m, n}));
    else out.zero_();
    return out;
  }
  const cudaStream_t stream = current_stream();
  const bool idx16 = colidx.scalar_type() == at::kShort;
  TORCH_CHECK(!idx16 || k <= 32768, "pyengine.sparse_linear: int16 column indices cannot address ", k,
              " input features");
  const void* bp = b.defined() ? b.data_ptr() : nullptr;
  const int64_t skinny_max = dt == pc::DType::kFloat32 ? 32 : 64;
  if (m <= skinny_max) {
    C10_CUDA_CHECK(pc::sparse_linear_skinny(dt, x.data_ptr(), m, k, rowptr.data_ptr<int32_t>(), colidx.data_ptr(),
                                            idx16, values.data_ptr(), bp, out.data_ptr(), n, n, stream));
    return out;
  }
  const double density = static_cast<double>(values.numel()) / (static_cast<double>(n) * static_cast<double>(k));
  if (pc::sparse_linear_spmm_supported(dt) && density <= 0.3) {
    at::Tensor out_t = at::empty({n, m}, x.options());
    C10_CUDA_CHECK(pc::sparse_linear_spmm_t(dt, x.data_ptr(), m, k, rowptr.data_ptr<int32_t>(), colidx.data_ptr(),
                                            idx16, values.data_ptr(), bp, out_t.data_ptr(), n, stream));
    out.copy_(out_t.t());
    return out;
  }
  // Large batches in half precision / float64 (or dense-ish float32): densify W tile by tile and
  // let cuBLAS multiply.
  const std::optional<at::Tensor> bias_c = b.defined() ? std::optional<at::Tensor>(b) : std::nullopt;
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  tiled_linear(x, bias_c, out, n, k, [&](int64_t n0, int64_t rows, const at::Tensor& buf, cudaStream_t s) {
    C10_CUDA_CHECK(pc::sparse_densify_rows(dt, rp, colidx.data_ptr(), idx16, values.data_ptr(), n0, rows, k,
                                           buf.data_ptr(), s));
  });
  return out;
}

void apply_masks_cuda(at::TensorList tensors, at::TensorList masks, at::IntArrayRef mask_index) {
  TORCH_CHECK(tensors.size() == mask_index.size(), "pyengine.apply_masks_: mask_index has ", mask_index.size(),
              " entries for ", tensors.size(), " tensors");
  if (tensors.empty()) return;
  const at::Tensor& first = tensors[0];
  TORCH_CHECK(first.is_cuda(), "pyengine.apply_masks_: tensors[0] must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(first.device());
  std::vector<pc::MaskTensorDesc> descs;
  descs.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t mi = mask_index[i];
    TORCH_CHECK(mi >= 0 && mi < static_cast<int64_t>(masks.size()), "pyengine.apply_masks_: mask_index[", i,
                "] = ", mi, " is out of range for ", masks.size(), " masks");
    const at::Tensor& mk = masks[mi];
    TORCH_CHECK(t.is_cuda() && t.device() == first.device(), "pyengine.apply_masks_: tensors[", i,
                "] is on ", t.device(), " but tensors[0] is on ", first.device());
    TORCH_CHECK(mk.is_cuda() && mk.device() == first.device(), "pyengine.apply_masks_: masks[", mi, "] is on ",
                mk.device(), " but the tensors are on ", first.device());
    TORCH_CHECK(mk.scalar_type() == at::kBool, "pyengine.apply_masks_: masks[", mi, "] must be bool, got ",
                mk.scalar_type());
    TORCH_CHECK(mk.sizes() == t.sizes(), "pyengine.apply_masks_: tensors[", i, "] has shape ", t.sizes(),
                " but masks[", mi, "] has ", mk.sizes());
    TORCH_CHECK(t.is_contiguous() && mk.is_contiguous(), "pyengine.apply_masks_: tensors[", i, "] and masks[", mi,
                "] must be contiguous");
    const int64_t es = t.element_size();
    TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8, "pyengine.apply_masks_: tensors[", i,
                "] has an unsupported dtype ", t.scalar_type());
    if (t.numel() == 0) continue;
    descs.push_back({t.data_ptr(), mk.data_ptr<bool>(), t.numel(), static_cast<int32_t>(es)});
  }
  if (descs.empty()) return;
  C10_CUDA_CHECK(pc::apply_masks(descs.data(), static_cast<int64_t>(descs.size()), current_stream()));
}

// ---------------------------------------------------------------------------------- entropy

std::tuple<at::Tensor, at::Tensor> entropy_counts_cuda(const at::Tensor& x_, int64_t channel_dim,
                                                       bool per_position, bool inclusive) {
  TORCH_CHECK(x_.is_cuda(), "pyengine.entropy_counts: x must be a CUDA tensor");
  const pc::DType dt = float_dtype(x_, "x");
  TORCH_CHECK(x_.dim() >= 1, "pyengine.entropy_counts: x must have at least one dimension");
  const int64_t nd = x_.dim();
  if (per_position) {
    TORCH_CHECK(nd >= 2, "pyengine.entropy_counts: per_position needs at least 2 dimensions, got shape ",
                x_.sizes());
  } else {
    TORCH_CHECK(channel_dim >= -nd && channel_dim < nd, "pyengine.entropy_counts: channel_dim=", channel_dim,
                " is out of range for a tensor with ", nd, " dimensions");
  }
  const int64_t cd = per_position ? 1 : (channel_dim < 0 ? channel_dim + nd : channel_dim);
  c10::cuda::CUDAGuard guard(x_.device());
  const auto lopts = x_.options().dtype(at::kLong);
  at::Tensor nan_count = at::zeros({}, lopts);
  at::Tensor counts;
  at::Tensor x = x_;
  int64_t rows = 0, row_len = 0, div = 1, neurons = 0;
  if (per_position) {
    counts = at::zeros(x_.sizes().slice(1), lopts);
    x = x_.contiguous();
    rows = x.size(0);
    row_len = counts.numel();
    neurons = row_len;
  } else {
    const int64_t c = x_.size(cd);
    counts = at::zeros({c}, lopts);
    neurons = c;
    if (!x_.is_contiguous() && x_.is_non_overlapping_and_dense() && (c == 1 || x_.stride(cd) == 1)) {
      // channels-last and friends: memory holds numel / C positions of C contiguous channels
      row_len = c;
      rows = c > 0 ? x_.numel() / c : 0;
      div = 1;
    } else {
      x = x_.contiguous();
      int64_t outer = 1, inner = 1;
      for (int64_t i = 0; i < cd; ++i) outer *= x.size(i);
      for (int64_t i = cd + 1; i < nd; ++i) inner *= x.size(i);
      rows = outer;
      row_len = c * inner;
      div = inner;
    }
  }
  if (x.numel() == 0 || rows == 0 || row_len == 0) return {counts, nan_count};
  C10_CUDA_CHECK(pc::entropy_counts_rows(dt, x.data_ptr(), rows, row_len, div, neurons, inclusive,
                                         counts.data_ptr<int64_t>(), nan_count.data_ptr<int64_t>(),
                                         current_stream()));
  return {counts, nan_count};
}

std::tuple<at::Tensor, at::Tensor> entropy_from_counts_cuda(const at::Tensor& counts_, int64_t n_samples,
                                                            double eps) {
  TORCH_CHECK(counts_.is_cuda(), "pyengine.entropy_from_counts: counts must be a CUDA tensor");
  TORCH_CHECK(counts_.scalar_type() == at::kLong, "pyengine.entropy_from_counts: counts must be int64, got ",
              counts_.scalar_type());
  TORCH_CHECK(n_samples > 0, "pyengine.entropy_from_counts: n_samples must be positive, got ", n_samples);
  TORCH_CHECK(eps >= 0.0 && eps < 0.5, "pyengine.entropy_from_counts: eps must be in [0, 0.5), got ", eps);
  c10::cuda::CUDAGuard guard(counts_.device());
  const at::Tensor counts = counts_.contiguous();
  at::Tensor h = at::empty(counts.sizes(), counts.options().dtype(at::kFloat));
  at::Tensor summary = at::empty({4}, counts.options().dtype(at::kDouble));
  at::Tensor scratch = at::empty({pc::kEntropyScratchDoubles}, counts.options().dtype(at::kDouble));
  C10_CUDA_CHECK(pc::entropy_from_counts(counts.data_ptr<int64_t>(), counts.numel(), n_samples, eps,
                                         h.data_ptr<float>(), summary.data_ptr<double>(),
                                         scratch.data_ptr<double>(), current_stream()));
  return {h, summary};
}

// ---------------------------------------------------------------------------------- sliced W

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sliced_wasserstein_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& theta_, double p, bool use_max,
    bool need_grad) {
  TORCH_CHECK(x_.dim() == 3, "pyengine.sliced_wasserstein_fwd: x must be (B, n, d), got shape ", x_.sizes());
  TORCH_CHECK(y_.sizes() == x_.sizes(), "pyengine.sliced_wasserstein_fwd: y has shape ", y_.sizes(),
              " but x has ", x_.sizes());
  TORCH_CHECK(theta_.dim() == 2 && theta_.size(1) == x_.size(2),
              "pyengine.sliced_wasserstein_fwd: theta must be (K, d) with d = ", x_.size(2), ", got ", theta_.sizes());
  TORCH_CHECK(theta_.size(0) >= 1, "pyengine.sliced_wasserstein_fwd: theta holds no directions");
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble,
              "pyengine.sliced_wasserstein_fwd: x must be float32 or float64, got ", x_.scalar_type());
  check_same_dtype(y_, "y", x_);
  check_same_dtype(theta_, "theta", x_);
  check_cuda(x_, "x", x_);
  check_cuda(y_, "y", x_);
  check_cuda(theta_, "theta", x_);
  TORCH_CHECK(p >= 1.0, "pyengine.sliced_wasserstein_fwd: p must be >= 1, got ", p);
  const pc::DType dt = float_dtype(x_, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  const int64_t B = x_.size(0), n = x_.size(1), d = x_.size(2), K = theta_.size(0);
  const int64_t kg = use_max ? 1 : K;
  const auto opts = x_.options();
  at::Tensor dist = at::empty({B}, opts);
  at::Tensor cx = need_grad ? at::empty({B, n, kg}, opts) : at::empty({0}, opts);
  at::Tensor cy = need_grad ? at::empty({B, n, kg}, opts) : at::empty({0}, opts);
  at::Tensor win = at::empty({(need_grad && use_max) ? B : 0}, opts.dtype(at::kLong));
  if (B == 0) return {dist, cx, cy, win};
  TORCH_CHECK(n >= 1, "pyengine.sliced_wasserstein_fwd: x and y hold no points");
  const at::Tensor x = x_.contiguous();
  const at::Tensor y = y_.contiguous();
  const at::Tensor theta = theta_.contiguous();
  const cudaStream_t stream = current_stream();

  // Projections: P[0] = theta @ x.view(B n, d)^T, P[1] likewise for y; (K, B n) each, so segment
  // s = k B + b (n values) is direction k of pair b.
  const int64_t segs = B * K;
  TORCH_CHECK(2 * segs <= 0x7fffffffLL, "pyengine.sliced_wasserstein_fwd: B * K is too large");
  at::Tensor P = at::empty({2, K, B * n}, opts);
  {
    at::Tensor p0 = P.select(0, 0);
    at::Tensor p1 = P.select(0, 1);
    at::mm_out(p0, theta, x.view({B * n, d}).t());
    at::mm_out(p1, theta, y.view({B * n, d}).t());
  }
  at::Tensor perm = need_grad ? at::empty({2 * segs * n}, opts.dtype(at::kInt)) : at::Tensor();
  int32_t* perm_p = need_grad ? perm.data_ptr<int32_t>() : nullptr;
  at::Tensor sorted;
  if (pc::sw_block_sort_supported(dt, n)) {
    C10_CUDA_CHECK(pc::sw_block_sort(dt, P.data_ptr(), n, 2 * segs, perm_p, stream));
    sorted = P;
  } else {
    TORCH_CHECK(2 * segs * n < 0x7fffffffLL, "pyengine.sliced_wasserstein_fwd: 2 * B * K * n = ", 2 * segs * n,
                " projections is too many for one call (limit 2**31 - 1); split the batch");
    sorted = at::empty_like(P);
    const size_t bytes = pc::sw_segmented_sort_temp_bytes(dt, n, 2 * segs, need_grad);
    at::Tensor temp = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 16))}, opts.dtype(at::kByte));
    at::Tensor idx = at::empty({2 * segs * n + 2 * segs + 1}, opts.dtype(at::kInt));
    C10_CUDA_CHECK(pc::sw_segmented_sort(dt, temp.data_ptr(), std::max<size_t>(bytes, 16), P.data_ptr(),
                                         sorted.data_ptr(), perm_p, idx.data_ptr<int32_t>(), n, 2 * segs, stream));
  }
  at::Tensor S = at::empty({B, K}, opts.dtype(at::kDouble));
  C10_CUDA_CHECK(pc::sw_pair_cost(dt, sorted.data_ptr(), n, B, K, p, S.data_ptr<double>(), stream));
  at::Tensor coef = at::empty({B}, opts.dtype(at::kDouble));
  int64_t* win_p = (need_grad && use_max) ? win.data_ptr<int64_t>() : nullptr;
  C10_CUDA_CHECK(pc::sw_reduce(dt, S.data_ptr<double>(), B, K, p, use_max, dist.data_ptr(), win_p,
                               coef.data_ptr<double>(), stream));
  if (need_grad) {
    C10_CUDA_CHECK(pc::sw_grad(dt, sorted.data_ptr(), perm_p, win_p, coef.data_ptr<double>(), B, K, n, p, use_max,
                               cx.data_ptr(), cy.data_ptr(), stream));
  }
  return {dist, cx, cy, win};
}

// Gradients to the point sets from the forward's cx/cy (see module.cpp). On the GPU these are a
// rank-1 product (the max) or one GEMM (the mean): an elementwise pass or cuBLAS, written
// straight into the outputs.
std::tuple<at::Tensor, at::Tensor> sliced_wasserstein_bwd_cuda(const at::Tensor& grad, const at::Tensor& cx,
                                                               const at::Tensor& cy, const at::Tensor& theta,
                                                               const at::Tensor& win, bool use_max, bool need_x,
                                                               bool need_y) {
  TORCH_CHECK(theta.dim() == 2, "pyengine.sliced_wasserstein_bwd: theta must be (K, d), got ", theta.sizes());
  TORCH_CHECK(cx.dim() == 3 && cy.sizes() == cx.sizes(),
              "pyengine.sliced_wasserstein_bwd: cx and cy must be (B, n, k) of one shape");
  const int64_t B = cx.size(0), n = cx.size(1), K = theta.size(0), d = theta.size(1);
  TORCH_CHECK(cx.size(2) == (use_max ? 1 : K), "pyengine.sliced_wasserstein_bwd: cx has ", cx.size(2),
              " columns, expected ", use_max ? 1 : K);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == B, "pyengine.sliced_wasserstein_bwd: grad must be (B,) with B = ", B);
  TORCH_CHECK(!use_max || (win.dim() == 1 && win.size(0) == B && win.scalar_type() == at::kLong),
              "pyengine.sliced_wasserstein_bwd: win must be int64 (B,) for the max");
  float_dtype(theta, "theta");
  check_same_dtype(cx, "cx", theta);
  check_same_dtype(cy, "cy", theta);
  check_same_dtype(grad, "grad", theta);
  check_cuda(theta, "theta", theta);
  check_cuda(cx, "cx", theta);
  check_cuda(cy, "cy", theta);
  check_cuda(grad, "grad", theta);
  if (use_max) check_cuda(win, "win", theta);
  c10::cuda::CUDAGuard guard(theta.device());
  const auto opts = theta.options();
  const at::Tensor g = grad.view({B, 1, 1});
  const at::Tensor winner = use_max ? theta.index_select(0, win).unsqueeze(1) : at::Tensor();  // (B, 1, d)
  auto one = [&](const at::Tensor& c, bool need) {
    if (!need) return at::empty({0}, opts);
    at::Tensor out = at::empty({B, n, d}, opts);
    if (B * n * d == 0) return out;
    if (use_max) return at::mul_out(out, c * g, winner);
    // every pair shares theta: one (B n, K) x (K, d) GEMM
    at::Tensor flat = out.view({B * n, d});
    at::mm_out(flat, (c * g).reshape({B * n, K}), theta);
    return out;
  };
  return {one(cx, need_x), one(cy, need_y)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("masked_linear", &masked_linear_cuda);
  m.impl("masked_linear_backward", &masked_linear_backward_cuda);
  m.impl("pack_sparse", &pack_sparse_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("apply_masks_", &apply_masks_cuda);
  m.impl("entropy_counts", &entropy_counts_cuda);
  m.impl("entropy_from_counts", &entropy_from_counts_cuda);
  m.impl("sliced_wasserstein_fwd", &sliced_wasserstein_fwd_cuda);
  m.impl("sliced_wasserstein_bwd", &sliced_wasserstein_bwd_cuda);
}

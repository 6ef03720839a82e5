// CUDA implementations of pack_sparse and sparse_linear (schemas in csrc/module.cpp): argument
// checks shared with the CPU path (common/checks.h, masked_args.h) and the raw kernels of
// sparse_cuda.cu. The index checks of sparse_linear run inside the kernels (no host sync); a bad
// index surfaces as a ValueError at the next pyengine CUDA call or check_device_errors().
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "common/cuda_glue.h"
#include "masked/masked_args.h"
#include "masked/sparse_kernels.h"

namespace pyengine {
namespace {

namespace pc = pyengine::cuda;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Extent of one tile along a dimension of `total` slices of `slice_bytes` bytes each, for a GEMM
// whose output tile is `other` x extent: small matrices in one tile, else tiles of 8..32 MB (at
// most about a quarter of the whole), a multiple of 8.
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

// out (m, n) = x @ W^T + bias with W densified tile by tile: tile t is produced on a side stream
// (into buffer t % 2) while the current stream multiplies tile t - 1. The side stream first
// waits for the current stream, and the current stream waits for every produced tile, so all work
// is ordered before whatever the current stream does next (also under graph capture).
template <class ProduceRows>
void tiled_linear(const at::Tensor& x, const std::optional<at::Tensor>& bias, at::Tensor& out, int64_t n, int64_t k,
                  ProduceRows&& produce_rows) {
  const int64_t m = x.size(0);
  const int64_t nt = tile_extent(n, k * x.element_size(), m);
  const int64_t ntiles = ceil_div(n, nt);
  at::Tensor buf[2] = {at::empty({nt * k}, x.options()), ntiles > 1 ? at::empty({nt * k}, x.options()) : at::Tensor()};
  c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
  auto consume = [&](int64_t t, const at::Tensor& b) {
    const int64_t n0 = t * nt, rows = std::min(nt, n - n0);
    const at::Tensor tile = b.narrow(0, 0, rows * k).view({rows, k});
    at::Tensor dst = ntiles == 1 ? out : out.narrow(1, n0, rows);
    if (bias.has_value() && bias->defined()) at::addmm_out(dst, bias->narrow(0, n0, rows), x, tile.t());
    else at::mm_out(dst, x, tile.t());
  };
  if (ntiles == 1) {
    produce_rows(int64_t(0), n, buf[0], main.stream());
    consume(0, buf[0]);
    return;
  }
  const int dev = main.device_index();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, main.device_index());
  cudaEvent_t ready = pc::cached_event(dev, 0);
  cudaEvent_t produced[2] = {pc::cached_event(dev, 1), pc::cached_event(dev, 2)};
  cudaEvent_t consumed[2] = {pc::cached_event(dev, 3), pc::cached_event(dev, 4)};
  C10_CUDA_CHECK(cudaEventRecord(ready, main.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), ready, 0));
  for (int64_t t = 0; t < ntiles; ++t) {
    const int b = static_cast<int>(t & 1);
    if (t >= 2) C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), consumed[b], 0));
    const int64_t n0 = t * nt;
    produce_rows(n0, std::min(nt, n - n0), buf[b], side.stream());
    C10_CUDA_CHECK(cudaEventRecord(produced[b], side.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(main.stream(), produced[b], 0));
    consume(t, buf[b]);
    C10_CUDA_CHECK(cudaEventRecord(consumed[b], main.stream()));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_sparse_cuda(const at::Tensor& weight) {
  const OpChecks op{"pack_sparse"};
  pc::cuda_entry(op, weight, "weight");
  check_pack_args(op, weight);
  c10::cuda::CUDAGuard guard(weight.device());
  const pc::DType dt = pc::kernel_dtype(weight);
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const auto idx_type = k < 32768 ? at::kShort : at::kInt;
  const auto iopts = w.options().dtype(at::kInt);
  at::Tensor rowptr = at::empty({n + 1}, iopts);
  if (n == 0 || k == 0) {
    rowptr.zero_();
    return {rowptr, at::empty({0}, w.options().dtype(idx_type)), at::empty({0}, w.options())};
  }
  const cudaStream_t stream = pc::current_stream();
  at::Tensor counts = at::empty({n}, iopts);
  C10_CUDA_CHECK(pc::pack_count_rows(dt, w.data_ptr(), n, k, counts.data_ptr<int32_t>(), stream));
  const size_t temp_bytes = std::max<size_t>(pc::pack_scan_temp_bytes(n), 16);
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, w.options().dtype(at::kByte));
  C10_CUDA_CHECK(pc::pack_scan(temp.data_ptr(), temp_bytes, counts.data_ptr<int32_t>(), rowptr.data_ptr<int32_t>(), n,
                               stream));
  const int64_t nnz = rowptr.select(0, n).item<int32_t>();  // synchronises: the output size
  at::Tensor colidx = at::empty({nnz}, w.options().dtype(idx_type));
  at::Tensor values = at::empty({nnz}, w.options());
  if (nnz > 0) {
    C10_CUDA_CHECK(pc::pack_fill(dt, w.data_ptr(), n, k, rowptr.data_ptr<int32_t>(), colidx.data_ptr(),
                                 idx_type == at::kShort, values.data_ptr(), stream));
  }
  return {rowptr, colidx, values};
}

// PYENGINE_SPARSE_SKINNY = smem | global | auto (default): how the small-batch kernel reads x.
int skinny_mode() {
  const char* v = std::getenv("PYENGINE_SPARSE_SKINNY");
  if (v == nullptr) return 0;
  if (std::strcmp(v, "smem") == 0) return 1;
  if (std::strcmp(v, "global") == 0) return 2;
  return 0;
}

at::Tensor sparse_linear_cuda(const at::Tensor& x_, const at::Tensor& rowptr_, const at::Tensor& colidx_,
                              const at::Tensor& values_, int64_t in_features, const std::optional<at::Tensor>& bias) {
  const OpChecks op{"sparse_linear"};
  pc::cuda_entry(op, x_, "x");
  const int64_t n = check_sparse_linear_args(op, x_, rowptr_, colidx_, values_, in_features, bias);
  c10::cuda::CUDAGuard guard(x_.device());
  const pc::DType dt = pc::kernel_dtype(x_);
  const int64_t m = x_.size(0), k = in_features, nnz = values_.numel();
  at::Tensor out = at::empty({m, n}, x_.options());
  if (m == 0 || n == 0) return out;
  const bool hb = bias.has_value() && bias->defined();
  if (k == 0) {
    if (hb) out.copy_(bias->unsqueeze(0).expand({m, n}));
    else out.zero_();
    return out;
  }
  const at::Tensor x = x_.contiguous();
  const at::Tensor rowptr = rowptr_.contiguous();
  const at::Tensor colidx = colidx_.contiguous();
  const at::Tensor values = values_.contiguous();
  const at::Tensor b = hb ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = pc::current_stream();
  pc::DeviceErrorRecord* rec = pc::device_error_record(x.get_device());
  const bool idx16 = colidx.scalar_type() == at::kShort;
  const void* bp = b.defined() ? b.data_ptr() : nullptr;
  const int64_t skinny_max = dt == pc::DType::kFloat32 ? 32 : 64;
  // beyond 16 rows x is staged in shared memory in chunks: each row of x must fit there
  if (m <= skinny_max && (m <= 16 || k * x.element_size() <= (int64_t(96) << 10))) {
    const int64_t scratch = pc::sparse_skinny_scratch_elems(m, k);
    at::Tensor xt = scratch > 0 ? at::empty({scratch}, x.options()) : at::Tensor();
    C10_CUDA_CHECK(pc::sparse_linear_skinny(dt, x.data_ptr(), m, k, rowptr.data_ptr<int32_t>(), colidx.data_ptr(), idx16,
                                            values.data_ptr(), nnz, bp, out.data_ptr(), n, n,
                                            xt.defined() ? xt.data_ptr() : nullptr, skinny_mode(), rec, stream));
    return out;
  }
  const double density = static_cast<double>(nnz) / (static_cast<double>(n) * static_cast<double>(k));
  if (pc::sparse_linear_spmm_supported(dt) && density <= 0.3) {
    at::Tensor out_t = at::empty({n, m}, x.options());
    C10_CUDA_CHECK(pc::sparse_linear_spmm_t(dt, x.data_ptr(), m, k, rowptr.data_ptr<int32_t>(), colidx.data_ptr(), idx16,
                                            values.data_ptr(), nnz, bp, out_t.data_ptr(), n, rec, stream));
    out.copy_(out_t.t());
    return out;
  }
  // Large batches in half precision / float64 (or dense-ish float32): densify W tile by tile and
  // let cuBLAS multiply.
  const std::optional<at::Tensor> bias_c = hb ? std::optional<at::Tensor>(b) : std::nullopt;
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  tiled_linear(x, bias_c, out, n, k, [&](int64_t n0, int64_t rows, const at::Tensor& buf, cudaStream_t s) {
    C10_CUDA_CHECK(pc::sparse_densify_rows(dt, rp, colidx.data_ptr(), idx16, values.data_ptr(), nnz, n0, rows, k,
                                           buf.data_ptr(), rec, s));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("pack_sparse", &pack_sparse_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
}

}  // namespace pyengine

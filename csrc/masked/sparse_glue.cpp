// CUDA implementations of pack_sparse and sparse_linear (schemas in csrc/module.cpp): argument
// checks shared with the CPU path (common/checks.h, masked_args.h) and the raw kernels of
// sparse_cuda.cu. The index checks of sparse_linear run inside the kernels (no host sync); a bad
// index surfaces as a ValueError at the next pyengine CUDA call or check_device_errors().
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "common/cuda_glue.h"
#include "common/env.h"
#include "masked/masked_args.h"
#include "masked/sparse_kernels.h"
#include "masked/tiled_linear.h"

namespace pyengine {
namespace {

namespace pc = pyengine::cuda;

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
  if (env_equals("PYENGINE_SPARSE_SKINNY", "smem")) return 1;
  if (env_equals("PYENGINE_SPARSE_SKINNY", "global")) return 2;
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
  if (tiled::trivial_linear(out, k, bias)) return out;
  const bool hb = bias.has_value() && bias->defined();
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
  const int mode = skinny_mode();
  // beyond 16 rows x is staged in shared memory in chunks: rows of up to 96 KB, and each must fit
  // the device's opt-in limit (227 KB on an H100, 64 KB on a T4); else the paths below take it
  int64_t scratch = 0;
  if (m <= skinny_max && (m <= 16 || k * x.element_size() <= (int64_t(96) << 10)) &&
      pc::sparse_skinny_plan(dt, m, k, mode, &scratch)) {
    at::Tensor xt = scratch > 0 ? at::empty({scratch}, x.options()) : at::Tensor();
    C10_CUDA_CHECK(pc::sparse_linear_skinny(dt, x.data_ptr(), m, k, rowptr.data_ptr<int32_t>(), colidx.data_ptr(), idx16,
                                            values.data_ptr(), nnz, bp, out.data_ptr(), n, n,
                                            xt.defined() ? xt.data_ptr() : nullptr, mode, rec, stream));
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
  tiled::tiled_linear(x, bias_c, out, n, k, [&](int64_t n0, int64_t rows, const at::Tensor& buf, cudaStream_t s) {
    C10_CUDA_CHECK(pc::sparse_densify_rows(dt, rp, colidx.data_ptr(), idx16, values.data_ptr(), nnz, n0, rows, n, k,
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

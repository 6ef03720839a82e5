// CUDA implementation of sparse_linear_bitmap (schema in csrc/module.cpp): the argument checks
// shared with the CPU path (masked_args.h) and the raw kernels of bitmap_cuda.cu. The tile checks
// run inside the kernels (no host sync); a bad tile surfaces as a ValueError at the next pyengine
// CUDA call or check_device_errors().
//
// Paths: float16 / bfloat16 with up to 64 rows of x on compute capability >= 8.0 take the tensor-
// core kernel (W read as sparse, multiplied as dense); everything else densifies W tile by tile
// for cuBLAS (tiled_linear.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/cuda_glue.h"
#include "masked/bitmap_kernels.h"
#include "masked/masked_args.h"
#include "masked/tiled_linear.h"

namespace pyengine {
namespace {

namespace pc = pyengine::cuda;

constexpr int64_t kMmaMaxRows = 64;  // beyond this the GEMM on densified tiles reads W fewer times

at::Tensor sparse_linear_bitmap_cuda(const at::Tensor& x_, const at::Tensor& bitmap_, const at::Tensor& offsets_,
                                     const at::Tensor& values_, int64_t out_features,
                                     const std::optional<at::Tensor>& bias) {
  const OpChecks op{"sparse_linear_bitmap"};
  pc::cuda_entry(op, x_, "x");
  check_bitmap_linear_args(op, x_, bitmap_, offsets_, values_, out_features, bias);
  c10::cuda::CUDAGuard guard(x_.device());
  const pc::DType dt = pc::kernel_dtype(x_);
  const int64_t m = x_.size(0), k = x_.size(1), n = out_features, nnz = values_.numel();
  at::Tensor out = at::empty({m, n}, x_.options());
  if (tiled::trivial_linear(out, k, bias)) return out;
  const bool hb = bias.has_value() && bias->defined();
  const at::Tensor x = x_.contiguous();
  const at::Tensor bitmap = bitmap_.contiguous();
  const at::Tensor offsets = offsets_.contiguous();
  const at::Tensor values = values_.contiguous();
  const at::Tensor b = hb ? bias->contiguous() : at::Tensor();
  const cudaStream_t stream = pc::current_stream();
  pc::DeviceErrorRecord* rec = pc::device_error_record(x.get_device());
  if (m <= kMmaMaxRows && pc::bitmap_mma_supported(dt, x.get_device())) {
    const cudaError_t err = pc::sparse_linear_bitmap_mma(dt, x.data_ptr(), m, k, bitmap.data_ptr<int32_t>(),
                                                         offsets.data_ptr<int32_t>(), values.data_ptr(), nnz,
                                                         b.defined() ? b.data_ptr() : nullptr, out.data_ptr(), n, n,
                                                         rec, stream);
    TORCH_CHECK(err != cudaErrorInvalidDeviceFunction, "pyengine.", op.name,
                ": this build holds no tensor-core code this GPU can run (the kernel's image is older than compute "
                "capability 8.0, e.g. JIT-compiled from PTX); rebuild with TORCH_CUDA_ARCH_LIST naming this GPU's "
                "capability");
    C10_CUDA_CHECK(err);
    return out;
  }
  const std::optional<at::Tensor> bias_c = hb ? std::optional<at::Tensor>(b) : std::nullopt;
  const int32_t* bm = bitmap.data_ptr<int32_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  tiled::tiled_linear(
      x, bias_c, out, n, k,
      [&](int64_t n0, int64_t rows, const at::Tensor& buf, cudaStream_t s) {
        C10_CUDA_CHECK(pc::bitmap_densify_rows(dt, bm, off, values.data_ptr(), nnz, n, k, n0, rows, buf.data_ptr(),
                                               rec, s));
      },
      kBmRows);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) { m.impl("sparse_linear_bitmap", &sparse_linear_bitmap_cuda); }

}  // namespace pyengine

// CUDA implementations of the entropy ops (schemas in csrc/module.cpp): argument checks (shared
// with the CPU path, entropy_args.h), the layout plan, output allocation and the launch of the
// raw kernels in entropy_cuda.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "entropy/entropy_args.h"
#include "entropy/entropy_kernels.h"

namespace pyengine {
namespace {

namespace pc = pyengine::cuda;

// x as the kernels' rows view without a copy: `rows` rows of `row_len` contiguous elements, neuron
// = column / div. False for the layouts that need a copy or a scratch buffer first (not dense,
// dense but neither contiguous nor channel-innermost, channels-last per position).
bool rows_view(const at::Tensor& x, int64_t cd, bool per_position, int64_t* rows, int64_t* row_len, int64_t* div) {
  if (x.is_contiguous()) {
    if (per_position) {
      *rows = x.size(0);
      *row_len = *rows ? x.numel() / *rows : 0;
      *div = 1;
      return true;
    }
    int64_t outer = 1, inner = 1;
    for (int64_t i = 0; i < cd; ++i) outer *= x.size(i);
    for (int64_t i = cd + 1; i < x.dim(); ++i) inner *= x.size(i);
    *rows = outer;
    *row_len = x.size(cd) * inner;
    *div = inner;
    return true;
  }
  if (per_position || !x.is_non_overlapping_and_dense()) return false;
  const int64_t c = x.size(cd);
  if (c != 1 && x.stride(cd) != 1) return false;
  // channels-last and friends: memory holds numel / C positions of C contiguous channels
  *row_len = c;
  *rows = c ? x.numel() / c : 0;
  *div = 1;
  return true;
}

// Adds the counts of x into counts (contiguous int64, counts_shape) and the NaN count into
// nan_count; with y defined also writes y = relu(x) (y laid out like x's memory).
void count_into_cuda(const at::Tensor& x_, int64_t cd, bool per_position, bool inclusive, at::Tensor& counts,
                     const at::Tensor& nan_count, const at::Tensor& y) {
  if (x_.numel() == 0) return;
  at::Tensor x = x_;
  int64_t rows = 0, row_len = 0, div = 1;
  at::Tensor target = counts;  // where the kernel adds (a permuted buffer for cl per-position)
  if (!rows_view(x_, cd, per_position, &rows, &row_len, &div)) {
    const bool cl_pp = per_position && x_.dim() == 4 && x_.is_non_overlapping_and_dense() &&
                       x_.is_contiguous(at::MemoryFormat::ChannelsLast);
    if (cl_pp) {  // count in memory order (H, W, C) into a scratch buffer, then add as (C, H, W)
      target = at::zeros({x_.size(2), x_.size(3), x_.size(1)}, counts.options());
      rows = x_.size(0);
      row_len = x_.numel() / rows;
      div = 1;
    } else {
      x = x_.contiguous();
      rows_view(x, cd, per_position, &rows, &row_len, &div);
    }
  }
  if (rows == 0 || row_len == 0) return;
  void* yp = nullptr;
  if (y.defined()) {
    TORCH_CHECK(y.strides() == x.strides(), "pyengine.relu_count: internal error (output layout)");
    yp = y.data_ptr();
  }
  C10_CUDA_CHECK(pc::entropy_counts_rows(pc::kernel_dtype(x), x.data_ptr(), yp, rows, row_len, div, inclusive,
                                         target.data_ptr<int64_t>(), nan_count.data_ptr<int64_t>(),
                                         pc::current_stream()));
  if (!target.is_same(counts)) counts.add_(target.permute({2, 0, 1}));
}

std::tuple<at::Tensor, at::Tensor> entropy_counts_cuda(const at::Tensor& x, int64_t channel_dim,
                                                       bool per_position, bool inclusive) {
  const OpChecks op{"entropy_counts"};
  pc::cuda_entry(op, x, "x");
  const int64_t cd = check_count_input(op, x, channel_dim, per_position);
  c10::cuda::CUDAGuard guard(x.device());
  const auto lopts = x.options().dtype(at::kLong);
  at::Tensor counts = at::empty(counts_shape(x, cd, per_position), lopts);
  at::Tensor nan_count = at::empty({}, lopts);
  C10_CUDA_CHECK(pc::zero_counts(counts.data_ptr<int64_t>(), counts.numel(), nan_count.data_ptr<int64_t>(),
                                 pc::current_stream()));
  count_into_cuda(x, cd, per_position, inclusive, counts, nan_count, at::Tensor());
  return {counts, nan_count};
}

void entropy_counts_add_cuda(const at::Tensor& counts, const at::Tensor& nan_count, const at::Tensor& x,
                             int64_t channel_dim, bool per_position, bool inclusive) {
  const OpChecks op{"entropy_counts_add_"};
  pc::cuda_entry(op, x, "x");
  const int64_t cd = check_count_input(op, x, channel_dim, per_position);
  check_accumulators(op, counts, nan_count, x, cd, per_position);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor c = counts;
  count_into_cuda(x, cd, per_position, inclusive, c, nan_count, at::Tensor());
}

// One launch per dtype for the tensors whose memory is the rows view as it is; the others one by one.
void entropy_counts_add_many_cuda(at::TensorList counts, const at::Tensor& nan_count, at::TensorList xs,
                                  at::IntArrayRef channel_dims, bool per_position, bool inclusive) {
  const OpChecks op{"entropy_counts_add_many_"};
  if (xs.empty()) {
    check_count_many(op, counts, nan_count, xs, channel_dims, per_position);
    return;
  }
  pc::cuda_entry(op, xs[0], "xs[0]");
  const std::vector<int64_t> cds = check_count_many(op, counts, nan_count, xs, channel_dims, per_position);
  c10::cuda::CUDAGuard guard(xs[0].device());
  std::vector<pc::CountRowsDesc> descs;
  descs.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    if (x.numel() == 0) continue;
    int64_t rows = 0, row_len = 0, div = 1;
    if (rows_view(x, cds[i], per_position, &rows, &row_len, &div)) {
      descs.push_back({pc::kernel_dtype(x), x.data_ptr(), rows, row_len, div, counts[i].data_ptr<int64_t>()});
    } else {
      at::Tensor c = counts[i];
      count_into_cuda(x, cds[i], per_position, inclusive, c, nan_count, at::Tensor());
    }
  }
  if (descs.empty()) return;
  C10_CUDA_CHECK(pc::entropy_counts_rows_many(descs.data(), static_cast<int64_t>(descs.size()), inclusive,
                                              nan_count.data_ptr<int64_t>(), pc::current_stream()));
}

at::Tensor relu_count_cuda(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& nan_count,
                           int64_t channel_dim, bool per_position, bool inclusive) {
  const OpChecks op{"relu_count"};
  pc::cuda_entry(op, x, "x");
  const int64_t cd = check_count_input(op, x, channel_dim, per_position);
  check_accumulators(op, counts, nan_count, x, cd, per_position);
  c10::cuda::CUDAGuard guard(x.device());
  // the kernel walks x's memory in order: it needs a dense x; y gets the same strides
  const at::Tensor xd = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  at::Tensor y = at::empty_strided(xd.sizes(), xd.strides(), xd.options());
  const bool cl_pp = per_position && xd.dim() == 4 && !xd.is_contiguous();
  if (cl_pp || xd.numel() == 0) {  // rare layouts: two passes
    at::Tensor c = counts;
    count_into_cuda(xd, cd, per_position, inclusive, c, nan_count, at::Tensor());
    return at::relu(xd);
  }
  const bool fused_layout = xd.is_contiguous() || (!per_position && (xd.size(cd) == 1 || xd.stride(cd) == 1));
  at::Tensor c = counts;
  if (!fused_layout) {
    count_into_cuda(xd, cd, per_position, inclusive, c, nan_count, at::Tensor());
    return at::relu(xd);
  }
  count_into_cuda(xd, cd, per_position, inclusive, c, nan_count, y);
  return y;
}

std::tuple<at::Tensor, at::Tensor> entropy_from_counts_cuda(const at::Tensor& counts_, int64_t n_samples,
                                                            double eps) {
  const OpChecks op{"entropy_from_counts"};
  pc::cuda_entry(op, counts_, "counts");
  check_from_counts(op, counts_, n_samples, eps);
  c10::cuda::CUDAGuard guard(counts_.device());
  const at::Tensor counts = counts_.contiguous();
  at::Tensor h = at::empty(counts.sizes(), counts.options().dtype(at::kFloat));
  at::Tensor summary = at::empty({4}, counts.options().dtype(at::kDouble));
  at::Tensor scratch = at::empty({pc::kEntropyScratchDoubles}, counts.options().dtype(at::kDouble));
  C10_CUDA_CHECK(pc::entropy_from_counts(counts.data_ptr<int64_t>(), counts.numel(), n_samples, eps,
                                         h.data_ptr<float>(), summary.data_ptr<double>(),
                                         scratch.data_ptr<double>(), pc::device_error_record(counts.get_device()),
                                         pc::current_stream()));
  return {h, summary};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("entropy_counts", &entropy_counts_cuda);
  m.impl("entropy_counts_add_", &entropy_counts_add_cuda);
  m.impl("entropy_counts_add_many_", &entropy_counts_add_many_cuda);
  m.impl("relu_count", &relu_count_cuda);
  m.impl("entropy_from_counts", &entropy_from_counts_cuda);
}

}  // namespace pyengine

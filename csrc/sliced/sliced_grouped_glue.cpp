// CUDA pieces of sliced_wasserstein_grouped (sliced_grouped.h): the projections of all pairs in
// two launches (sliced_grouped_cuda.cu) followed by the single op's sort / cost stage, and the
// max's backward for all pairs in one launch - against about 20 ATen launches (per-pair GEMMs,
// split-K sums, norms, scaling, an identity projection) and 12 for the backward, each paid for in
// host time by a launch-bound training step. The arguments are checked by the op's entry
// (check_grouped) before these run.
#include <ATen/ATen.h>

#include <vector>

#include "common/cuda_glue.h"
#include "sliced/sliced_compare.h"
#include "sliced/sliced_grouped.h"
#include "sliced/sliced_kernels.h"

namespace pyengine {
namespace {

namespace pc = pyengine::cuda;

const OpChecks kOp{"sliced_wasserstein_grouped"};

void describe_pairs(pc::GroupedPairs& pairs, const std::vector<int64_t>& dims) {
  pairs.G = static_cast<int32_t>(dims.size());
  int64_t col = 0;
  for (size_t g = 0; g < dims.size(); ++g) {
    pairs.dim[g] = dims[g];
    pairs.col[g] = col;
    col += dims[g];
  }
}

bool forward(at::TensorList xs, at::TensorList ys, const at::Tensor& theta, const std::vector<int64_t>& dims,
             double p, bool use_max, bool normalize, bool need_grad, GroupedForward& f) {
  const int64_t G = static_cast<int64_t>(xs.size()), n = xs[0].size(0), K = theta.size(0);
  if (!pc::sw_grouped_supported(G, K, n)) return false;
  pc::cuda_entry(kOp, xs[0], "xs[0]");
  c10::cuda::CUDAGuard guard(xs[0].device());
  const pc::DType dt = pc::kernel_dtype(xs[0]);
  pc::GroupedPairs pairs;
  describe_pairs(pairs, dims);
  std::vector<at::Tensor> keep;  // contiguous copies live until the launches are queued
  keep.reserve(2 * G);
  for (int64_t g = 0; g < G; ++g) {
    keep.push_back(xs[g].detach().contiguous());
    pairs.z[0][g] = keep.back().data_ptr();
    keep.push_back(ys[g].detach().contiguous());
    pairs.z[1][g] = keep.back().data_ptr();
  }
  const at::Tensor th = theta.detach().contiguous();
  const auto opts = th.options();
  const size_t ws = pc::sw_grouped_plan(dt, pairs, K, n);
  at::Tensor work = at::empty({static_cast<int64_t>(ws)}, opts.dtype(at::kByte));
  at::Tensor P = at::empty({2, K, G, n}, opts);
  if (normalize) f.scale = at::empty({G, K}, opts);
  C10_CUDA_CHECK(pc::sw_grouped_project(dt, pairs, th.data_ptr(), th.size(1), K, n, normalize, work.data_ptr(),
                                        P.data_ptr(), normalize ? f.scale.data_ptr() : nullptr, pc::current_stream()));
  std::tie(f.dist, f.cx, f.cy, f.win) = sw_compare_cuda(kOp, P, G, n, K, p, use_max, need_grad);
  return true;
}

bool max_backward(const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& cx, const at::Tensor& cy,
                  const at::Tensor& win, const at::Tensor& scale, const std::vector<int64_t>& dims,
                  const std::vector<int64_t>& need, std::vector<at::Tensor>& out) {
  const int64_t G = static_cast<int64_t>(dims.size()), n = cx.size(1), K = theta.size(0);
  if (!pc::sw_grouped_supported(G, K, n)) return false;
  c10::cuda::CUDAGuard guard(theta.device());
  const pc::DType dt = pc::kernel_dtype(theta);
  pc::GroupedPairs pairs;
  describe_pairs(pairs, dims);
  pc::GroupedGrads grads;
  const auto opts = theta.options();
  bool any = false;
  for (int64_t t = 0; t < 2; ++t)
    for (int64_t g = 0; g < G; ++g) {
      if (!need[t * G + g]) continue;
      out[t * G + g] = at::empty({n, dims[g]}, opts);
      grads.out[t][g] = out[t * G + g].data_ptr();
      any = true;
    }
  if (!any) return true;
  const at::Tensor th = theta.contiguous(), g = grad.contiguous(), x = cx.contiguous(), y = cy.contiguous();
  const at::Tensor w = win.contiguous();
  const at::Tensor s = scale.defined() ? scale.contiguous() : at::Tensor();
  C10_CUDA_CHECK(pc::sw_grouped_rank1(dt, pairs, grads, g.data_ptr(), x.data_ptr(), y.data_ptr(), th.data_ptr(),
                                      th.size(1), s.defined() ? s.data_ptr() : nullptr, w.data_ptr<int64_t>(), K, n,
                                      pc::device_error_record(th.get_device()), pc::current_stream()));
  return true;
}

const bool registered = [] {
  GroupedCudaImpl& impl = grouped_cuda_impl();
  impl.forward = &forward;
  impl.max_backward = &max_backward;
  return true;
}();

}  // namespace
}  // namespace pyengine

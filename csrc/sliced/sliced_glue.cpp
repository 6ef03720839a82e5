// CUDA implementations of the sliced Wasserstein ops (schemas in csrc/module.cpp): argument
// checks (shared with the CPU path, sliced_args.h), the projections through cuBLAS (split-K for
// long thin inputs), and the sort / cost / reduce / gradient kernels of sliced_*_cuda.cu.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_glue.h"
#include "sliced/sliced_args.h"
#include "sliced/sliced_compare.h"
#include "sliced/sliced_kernels.h"
#include "sliced/sliced_project.h"

namespace pyengine {
namespace {

namespace pc = pyengine::cuda;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// P (2, K, Bn): P[0] = theta @ x^T, P[1] = theta @ y^T, with x, y viewed as (Bn, d); the reduction
// split (sliced_project.h) aims at about two output tiles per multiprocessor.
at::Tensor project(const at::Tensor& theta, const at::Tensor& x, const at::Tensor& y, int64_t Bn) {
  const int64_t K = theta.size(0), d = theta.size(1);
  at::Tensor P = at::empty({2, K, Bn}, x.options());
  const int64_t tiles = ceil_div(K, 128) * ceil_div(Bn, 128);
  const int64_t s = split_k_pieces(d, ceil_div(2 * int64_t(pc::sm_count(x.get_device())), tiles));
  for (int t = 0; t < 2; ++t) project_into(P.select(0, t), theta, (t == 0 ? x : y).view({Bn, d}), s);
  return P;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sliced_wasserstein_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& theta_, double p, bool use_max, bool need_grad) {
  const OpChecks op{"sliced_wasserstein_fwd"};
  pc::cuda_entry(op, x_, "x");
  check_sw_fwd(op, x_, y_, theta_, p);
  c10::cuda::CUDAGuard guard(x_.device());
  // never autocast's reduced precision (the split projection's bmm would come back in float16)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = x_.size(0), n = x_.size(1), K = theta_.size(0);
  if (B == 0) return sw_compare_cuda(op, at::empty({2, K, 0}, x_.options()), 0, n, K, p, use_max, need_grad);
  const at::Tensor x = x_.contiguous();
  const at::Tensor y = y_.contiguous();
  const at::Tensor theta = theta_.contiguous();
  at::Tensor P = project(theta, x, y, B * n);  // segment s = k B + b: direction k of pair b
  return sw_compare_cuda(op, P, B, n, K, p, use_max, need_grad);
}

// Gradients to the point sets from the forward's cx / cy (see module.cpp): for the max a rank-1
// product per pair with the winning direction (one kernel that checks win on the device), for the
// mean one (B n, K) x (K, d) GEMM.
std::tuple<at::Tensor, at::Tensor> sliced_wasserstein_bwd_cuda(const at::Tensor& grad, const at::Tensor& cx_,
                                                               const at::Tensor& cy_, const at::Tensor& theta_,
                                                               const at::Tensor& win_, bool use_max, bool need_x,
                                                               bool need_y) {
  const OpChecks op{"sliced_wasserstein_bwd"};
  pc::cuda_entry(op, theta_, "theta");
  check_sw_bwd(op, grad, cx_, cy_, theta_, win_, use_max);
  c10::cuda::CUDAGuard guard(theta_.device());
  const int64_t B = cx_.size(0), n = cx_.size(1), K = theta_.size(0), d = theta_.size(1);
  const auto opts = theta_.options();
  at::Tensor gx = need_x ? at::empty({B, n, d}, opts) : at::empty({0}, opts);
  at::Tensor gy = need_y ? at::empty({B, n, d}, opts) : at::empty({0}, opts);
  if (B * n * d == 0 || !(need_x || need_y)) return {gx, gy};
  const at::Tensor theta = theta_.contiguous();
  const at::Tensor g = grad.contiguous();
  if (use_max) {
    const at::Tensor cx = cx_.contiguous(), cy = cy_.contiguous(), win = win_.contiguous();
    const int dev = theta.get_device();
    C10_CUDA_CHECK(pc::sw_bwd_rank1(pc::kernel_dtype(theta), g.data_ptr(), cx.data_ptr(), cy.data_ptr(),
                                    theta.data_ptr(), win.data_ptr<int64_t>(), B, n, d, K,
                                    need_x ? gx.data_ptr() : nullptr, need_y ? gy.data_ptr() : nullptr,
                                    pc::device_error_record(dev), pc::current_stream()));
    return {gx, gy};
  }
  const at::Tensor gv = g.view({B, 1, 1});
  if (need_x) {
    at::Tensor o = gx.view({B * n, d});
    at::mm_out(o, (cx_ * gv).reshape({B * n, K}), theta);
  }
  if (need_y) {
    at::Tensor o = gy.view({B * n, d});
    at::mm_out(o, (cy_ * gv).reshape({B * n, K}), theta);
  }
  return {gx, gy};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sw_compare_cuda(const OpChecks& op, at::Tensor P, int64_t B,
                                                                         int64_t n, int64_t K, double p, bool use_max,
                                                                         bool need_grad) {
  const pc::DType dt = pc::kernel_dtype(P);
  const int64_t kg = use_max ? 1 : K;
  const auto opts = P.options();
  at::Tensor dist = at::empty({B}, opts);
  at::Tensor cx = need_grad ? at::empty({B, n, kg}, opts) : at::empty({0}, opts);
  at::Tensor cy = need_grad ? at::empty({B, n, kg}, opts) : at::empty({0}, opts);
  at::Tensor win = at::empty({(need_grad && use_max) ? B : 0}, opts.dtype(at::kLong));
  if (B == 0) return {dist, cx, cy, win};
  const int64_t segs = B * K;
  if (2 * segs > 0x7fffffffLL) op.value_error("B * K = ", segs, " (pair, direction) rows is too many for one call");
  const cudaStream_t stream = pc::current_stream();
  at::Tensor S = at::empty({B, K}, opts.dtype(at::kDouble));
  at::Tensor coef = at::empty({B}, opts.dtype(at::kDouble));
  const bool block = pc::sw_block_sort_supported(dt, n);
  if (block && (use_max || !need_grad)) {
    // sort + cost fused; for the max's gradient only the winning direction is sorted again
    C10_CUDA_CHECK(pc::sw_sort_cost(dt, P.data_ptr(), n, B, K, p, S.data_ptr<double>(), stream));
    at::Tensor w = need_grad ? win : at::empty({B}, opts.dtype(at::kLong));
    C10_CUDA_CHECK(pc::sw_reduce(dt, S.data_ptr<double>(), B, K, p, use_max, dist.data_ptr(),
                                 use_max ? w.data_ptr<int64_t>() : nullptr, coef.data_ptr<double>(), stream));
    if (need_grad) {
      C10_CUDA_CHECK(pc::sw_winner_grad(dt, P.data_ptr(), n, B, K, p, win.data_ptr<int64_t>(),
                                        coef.data_ptr<double>(), cx.data_ptr(), cy.data_ptr(), stream));
    }
    return {dist, cx, cy, win};
  }
  at::Tensor perm = need_grad ? at::empty({2 * segs * n}, opts.dtype(at::kInt)) : at::Tensor();
  int32_t* perm_p = need_grad ? perm.data_ptr<int32_t>() : nullptr;
  at::Tensor sorted;
  if (block) {  // the mean's gradient: every direction's permutation
    C10_CUDA_CHECK(pc::sw_block_sort(dt, P.data_ptr(), n, 2 * segs, perm_p, stream));
    sorted = P;
  } else {
    if (2 * segs * n >= 0x7fffffffLL)
      op.value_error("2 * B * K * n = ", 2 * segs * n,
                     " projections is too many for one call (limit 2**31 - 1); split the batch or use fewer directions");
    sorted = at::empty_like(P);
    const size_t bytes = std::max<size_t>(pc::sw_segmented_sort_temp_bytes(dt, n, 2 * segs, need_grad), 16);
    at::Tensor temp = at::empty({static_cast<int64_t>(bytes)}, opts.dtype(at::kByte));
    at::Tensor idx = at::empty({2 * segs * n + 2 * segs + 1}, opts.dtype(at::kInt));
    C10_CUDA_CHECK(pc::sw_segmented_sort(dt, temp.data_ptr(), bytes, P.data_ptr(), sorted.data_ptr(), perm_p,
                                         idx.data_ptr<int32_t>(), n, 2 * segs, stream));
  }
  C10_CUDA_CHECK(pc::sw_pair_cost(dt, sorted.data_ptr(), n, B, K, p, S.data_ptr<double>(), stream));
  int64_t* win_p = (need_grad && use_max) ? win.data_ptr<int64_t>() : nullptr;
  C10_CUDA_CHECK(pc::sw_reduce(dt, S.data_ptr<double>(), B, K, p, use_max, dist.data_ptr(), win_p,
                               coef.data_ptr<double>(), stream));
  if (need_grad) {
    C10_CUDA_CHECK(pc::sw_grad(dt, sorted.data_ptr(), perm_p, win_p, coef.data_ptr<double>(), B, K, n, p, use_max,
                               cx.data_ptr(), cy.data_ptr(), stream));
  }
  return {dist, cx, cy, win};
}

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("sliced_wasserstein_fwd", &sliced_wasserstein_fwd_cuda);
  m.impl("sliced_wasserstein_bwd", &sliced_wasserstein_bwd_cuda);
}

}  // namespace pyengine

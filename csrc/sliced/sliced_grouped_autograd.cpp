// sliced_wasserstein_grouped: G pairs of point sets of different dimensions (LaCoOT's block pairs)
// in one op with one autograd node - the training step's regulariser in a handful of launches
// with no Python between them (schema in csrc/module.cpp).
//
// Device-independent: each pair is projected on its own column block of theta by ATen GEMMs
// into a (2, G, K, n) buffer, and the existing sliced_wasserstein_fwd kernel of the device (CPU
// or CUDA) sorts and compares the G projected pairs, given the identity as directions. The
// backward writes each pair's gradient directly: for the max a rank-1 product with the winning
// direction's block, for the mean one (n, K) x (K, d_g) GEMM per pair.
//
// On CUDA (a CUDA build sets grouped_cuda_impl(), sliced_grouped_glue.cpp) the projections of all
// pairs and the max's backward run as the kernels of sliced_grouped_cuda.cu instead: two launches
// and one, in place of about twenty ATen calls and twelve. The ATen path stays for the CPU, for
// more pairs than one launch takes, under tracing, and with PYENGINE_GROUPED_ATEN=1.
//
// Registered for Autograd (a C++ autograd Function) and for CompositeExplicitAutograd (no
// gradient: inference mode). No double backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "common/env.h"
#include "sliced/sliced_args.h"
#include "sliced/sliced_gemm_cpu.h"
#include "sliced/sliced_grouped.h"
#include "sliced/sliced_project.h"

namespace pyengine {

GroupedCudaImpl& grouped_cuda_impl() {
  static GroupedCudaImpl impl;
  return impl;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const OpChecks kOp{"sliced_wasserstein_grouped"};

// Checks every argument; returns each pair's dimension d_g (columns [sum_{h<g} d_h, + d_g) of theta).
std::vector<int64_t> check_grouped(at::TensorList xs, at::TensorList ys, const at::Tensor& theta, double p) {
  if (xs.empty()) kOp.value_error("xs holds no pairs");
  if (ys.size() != xs.size()) kOp.value_error("xs holds ", xs.size(), " tensors but ys holds ", ys.size());
  char xn[32], yn[32];
  std::vector<int64_t> dims;
  dims.reserve(xs.size());
  int64_t total = 0, n = 0;
  for (size_t g = 0; g < xs.size(); ++g) {
    std::snprintf(xn, sizeof(xn), "xs[%zu]", g);
    std::snprintf(yn, sizeof(yn), "ys[%zu]", g);
    kOp.dim(xs[g], xn, 2, "(n, d)");
    kOp.dim(ys[g], yn, 2, "(n, d)");
    if (g == 0) {
      kOp.dtype(xs[0], xn, {at::kFloat, at::kDouble});
      n = xs[0].size(0);
      if (n < 1) kOp.value_error("xs[0] holds no points");
    } else {
      kOp.same_dtype(xs[g], xn, xs[0], "xs[0]");
      kOp.same_device(xs[g], xn, xs[0], "xs[0]");
      if (xs[g].size(0) != n)
        kOp.value_error(xn, " has ", xs[g].size(0), " points but xs[0] has ", n, "; every pair needs the same count");
    }
    kOp.same_dtype(ys[g], yn, xs[0], "xs[0]");
    kOp.same_device(ys[g], yn, xs[0], "xs[0]");
    if (ys[g].sizes() != xs[g].sizes())
      kOp.value_error(yn, " has shape ", shape_str(ys[g].sizes()), " but ", xn, " has ", shape_str(xs[g].sizes()),
                      "; they must match");
    if (xs[g].size(1) < 1) kOp.value_error(xn, " has zero features");
    dims.push_back(xs[g].size(1));
    total += xs[g].size(1);
  }
  kOp.dim(theta, "theta", 2, "(K, sum of the pairs' dims)");
  kOp.same_dtype(theta, "theta", xs[0], "xs[0]");
  kOp.same_device(theta, "theta", xs[0], "xs[0]");
  if (theta.size(0) < 1) kOp.value_error("theta holds no directions");
  if (theta.size(1) != total)
    kOp.value_error("theta has ", theta.size(1), " dims per direction but the pairs have ", total, " in all");
  check_p(kOp, p);
  return dims;
}

// PYENGINE_SPLIT_K_ON_CPU=1: split long reductions on the CPU as on CUDA (for tests; read per call).
bool split_on_cpu() { return env_equals("PYENGINE_SPLIT_K_ON_CPU", "1"); }

using Forward = GroupedForward;

// PYENGINE_GROUPED_ATEN=1: the ATen path on CUDA too (benchmarks/bench_lacoot_step.py times both
// on one card; read per call).
bool aten_only() { return env_equals("PYENGINE_GROUPED_ATEN", "1"); }

// The raw kernels read data pointers: under tracing (torch.compile / AOT autograd hand this
// autograd kernel FunctionalTensor / FakeTensor subclasses with a dispatch mode active) or with any
// tensor subclass, the ATen path runs, which every mode and subclass can follow.
bool real_tensors(std::initializer_list<at::TensorList> lists) {
  for (at::TensorList l : lists)
    if (at::areAnyTensorSubclassLike(l)) return false;
  return true;
}

// Below autograd. The projections, then the device's sliced_wasserstein_fwd on them (on CUDA the
// kernels of sliced_grouped_cuda.cu through grouped_cuda_impl(), where they apply).
Forward grouped_forward(at::TensorList xs, at::TensorList ys, const at::Tensor& theta, const std::vector<int64_t>& dims,
                        double p, bool use_max, bool normalize, bool need_grad) {
  // never autocast's reduced precision: the distance is computed in the inputs' dtype
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const GroupedCudaImpl& impl = grouped_cuda_impl();
  if (xs[0].is_cuda() && impl.forward != nullptr && !aten_only() && real_tensors({xs, ys, theta})) {
    Forward f;
    if (impl.forward(xs, ys, theta, dims, p, use_max, normalize, need_grad, f)) return f;
  }
  const int64_t G = static_cast<int64_t>(xs.size()), n = xs[0].size(0), K = theta.size(0);
  const at::Tensor th = theta.detach();
  at::Tensor P = at::empty({2, G, K, n}, th.options());  // P[t, g] = block g of theta @ (x or y)_g^T
  Forward f;
  if (normalize) f.scale = at::empty({G, K}, th.options());
  // on CUDA a long reduction is split as the single-pair op splits it; on the CPU one product per
  // projection in this orientation (1.75x faster than z @ tg^T with BLAS here), tiled by its shape
  // (sliced_gemm_cpu.h: the same result on any thread count) - unless PYENGINE_SPLIT_K_ON_CPU=1,
  // with which the tests run the CUDA path's split arithmetic on the CPU. Under tracing (tensor
  // subclasses, whose dispatch modes the worker threads would not see) plain ATen products.
  const bool split = xs[0].is_cuda() || split_on_cpu();
  const bool ordered = !split && th.is_cpu() && real_tensors({xs, ys, th});
  std::vector<int64_t> offs(G);  // pair g's first column of theta
  for (int64_t g = 0, off = 0; g < G; off += dims[g], ++g) offs[g] = off;
  std::vector<OrderedMM> mms;
  for (int64_t g = 0; g < G; ++g) {
    const at::Tensor tg = th.narrow(1, offs[g], dims[g]);  // (K, d_g), rows strided by sum d
    if (ordered) {
      mms.push_back({P.select(0, 0).select(0, g), tg, xs[g].detach().t()});
      mms.push_back({P.select(0, 1).select(0, g), tg, ys[g].detach().t()});
    } else {
      const int64_t s = split ? split_k_pieces(dims[g], 64) : 1;
      project_into(P.select(0, 0).select(0, g), tg, xs[g].detach().contiguous(), s);
      project_into(P.select(0, 1).select(0, g), tg, ys[g].detach().contiguous(), s);
    }
  }
  if (ordered) ordered_mm_cpu(mms);
  if (normalize) {
    const auto norms = [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        at::Tensor sg = f.scale.select(0, g);
        at::linalg_vector_norm_out(sg, th.narrow(1, offs[g], dims[g]), 2, at::IntArrayRef{1});
      }
    };
    // on the CPU inside a parallel region, where ATen reduces each norm on one thread (a single
    // direction's norm, K = 1, was otherwise summed in parts, one per thread); the workers in this
    // thread's state (inference mode: the outputs are inference tensors there)
    if (ordered) {
      const at::ThreadLocalState tls;
      at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
        at::ThreadLocalStateGuard tls_guard(tls);
        norms(g0, g1);
      });
    } else {
      norms(0, G);
    }
  }
  if (normalize) {
    // a zero block gives zero projections (not 0 * inf): the smallest normal number of the dtype
    const double tiny = th.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                         : double(std::numeric_limits<float>::min());
    f.scale.clamp_min_(tiny).reciprocal_();
    P.mul_(f.scale.view({1, G, K, 1}));  // the projections on unit directions
  }
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("pyengine::sliced_wasserstein_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool, bool)>();
  const at::Tensor eye = at::eye(K, th.options());
  // (G, n, K) views: the op sees G pairs of n points with K coordinates, compared along the axes
  std::tie(f.dist, f.cx, f.cy, f.win) =
      fwd.call(P.select(0, 0).transpose(1, 2), P.select(0, 1).transpose(1, 2), eye, p, use_max, need_grad);
  return f;
}

class GroupedFn : public torch::autograd::Function<GroupedFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList xs, at::TensorList ys, const at::Tensor& theta,
                            double p, bool use_max, bool normalize, bool need_grad) {
    const std::vector<int64_t> dims = check_grouped(xs, ys, theta, p);
    at::AutoDispatchBelowADInplaceOrView below;
    Forward f = grouped_forward(xs, ys, theta, dims, p, use_max, normalize, need_grad);
    if (need_grad) {
      ctx->save_for_backward({theta.detach(), f.cx, f.cy, f.win, normalize ? f.scale : at::Tensor()});
      ctx->saved_data["dims"] = c10::IValue(dims);
      ctx->saved_data["use_max"] = use_max;
      std::vector<int64_t> need;  // which of xs..., ys... take a gradient
      for (const auto& t : xs) need.push_back(t.requires_grad());
      for (const auto& t : ys) need.push_back(t.requires_grad());
      ctx->saved_data["need"] = c10::IValue(need);
    }
    return f.dist;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (torch::autograd::GradMode::is_enabled())
      kOp.value_error("double backward (create_graph=True) is not supported; use pyengine.ops.sliced_wasserstein per pair");
    const auto saved = ctx->get_saved_variables();
    if (saved.size() != 5)  // nothing was saved: no x or y required grad (grouped_autograd refuses the rest)
      kOp.value_error("backward called but no x or y required grad at the forward");
    const at::Tensor &theta = saved[0], &cx = saved[1], &cy = saved[2], &win = saved[3], &scale = saved[4];
    const std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    const bool use_max = ctx->saved_data["use_max"].toBool();
    const std::vector<int64_t> need = ctx->saved_data["need"].toIntVector();
    const int64_t G = static_cast<int64_t>(dims.size()), K = theta.size(0);
    // never autocast's reduced precision, as in the forward (a backward run inside torch.autocast
    // got the mean's per-pair GEMMs in bfloat16)
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const at::Tensor grad = grads[0].to(theta.scalar_type()).contiguous();  // (G,)
    variable_list out(2 * G + 5);  // xs..., ys..., theta, p, use_max, normalize, need_grad
    const GroupedCudaImpl& impl = grouped_cuda_impl();
    if (use_max && theta.is_cuda() && impl.max_backward != nullptr && !aten_only() &&
        real_tensors({grad, theta, cx, cy, win}) &&
        impl.max_backward(grad, theta, cx, cy, win, scale, dims, need, out)) {
      return out;
    }
    if (use_max) {
      // d dist_g / d x_g[i] = cx[g, i] * (unit) winning direction's block g: one row per pair
      const at::Tensor rows = theta.index_select(0, win);  // (G, sum d)
      at::Tensor f = grad;
      if (scale.defined()) f = f * scale.gather(1, win.unsqueeze(1)).squeeze(1);
      const at::Tensor ax = cx.select(2, 0) * f.unsqueeze(1), ay = cy.select(2, 0) * f.unsqueeze(1);  // (G, n)
      int64_t off = 0;
      for (int64_t g = 0; g < G; ++g) {
        const at::Tensor r = rows.select(0, g).narrow(0, off, dims[g]).unsqueeze(0);  // (1, d_g)
        if (need[g]) out[g] = ax.select(0, g).unsqueeze(1) * r;
        if (need[G + g]) out[G + g] = ay.select(0, g).unsqueeze(1) * r;
        off += dims[g];
      }
    } else {
      // the mean: d dist_g / d x_g = (cx[g] * scale[g]) (n, K) @ block g of theta (K, d_g)
      at::Tensor f = grad.view({G, 1, 1});
      if (scale.defined()) f = f * scale.view({G, 1, K});
      const at::Tensor sx = cx * f, sy = cy * f;  // (G, n, K)
      int64_t off = 0;
      // on the CPU tiled as the projections are (the same on any thread count), except under tracing
      const bool ordered = theta.is_cpu() && real_tensors({grad, theta, sx, sy});
      std::vector<OrderedMM> mms;
      for (int64_t g = 0; g < G; ++g) {
        const at::Tensor tg = theta.narrow(1, off, dims[g]);
        for (int64_t t = 0; t < 2; ++t) {
          if (!need[t * G + g]) continue;
          const at::Tensor c = (t == 0 ? sx : sy).select(0, g);
          if (ordered) {
            out[t * G + g] = at::empty({c.size(0), dims[g]}, theta.options());
            mms.push_back({out[t * G + g], c, tg});
          } else {
            out[t * G + g] = at::mm(c, tg);
          }
        }
        off += dims[g];
      }
      if (!mms.empty()) ordered_mm_cpu(mms);
    }
    return out;
  }
};

at::Tensor grouped_autograd(at::TensorList xs, at::TensorList ys, const at::Tensor& theta, double p, bool use_max,
                            bool normalize) {
  bool need_grad = false;
  if (torch::autograd::GradMode::is_enabled()) {
    if (theta.requires_grad())
      kOp.value_error("theta requires grad, but the distances are not differentiable in the directions (only in xs "
                      "and ys); pass theta.detach()");
    for (const auto& t : xs) need_grad = need_grad || (t.defined() && t.requires_grad());
    for (const auto& t : ys) need_grad = need_grad || (t.defined() && t.requires_grad());
  }
  return GroupedFn::apply(xs, ys, theta, p, use_max, normalize, need_grad);
}

// No autograd (inference-mode tensors): the distances only.
at::Tensor grouped_nograd(at::TensorList xs, at::TensorList ys, const at::Tensor& theta, double p, bool use_max,
                          bool normalize) {
  const std::vector<int64_t> dims = check_grouped(xs, ys, theta, p);
  return grouped_forward(xs, ys, theta, dims, p, use_max, normalize, false).dist;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, Autograd, m) { m.impl("sliced_wasserstein_grouped", &grouped_autograd); }

TORCH_LIBRARY_IMPL(pyengine, CompositeExplicitAutograd, m) {
  m.impl("sliced_wasserstein_grouped", &grouped_nograd);
}

}  // namespace pyengine

// Autograd for relu_count (schema in csrc/module.cpp): y = relu(x) while x's ON counts go into
// counts / nan_count. The gradient is ReLU's own, threshold_backward(grad, y, 0); the counts take
// none. A C++ node, so an activation that counts as it runs costs one op in the forward and one
// in the backward, with no Python in either (pyengine.nn.EntropyCollector swaps it in for nn.ReLU
// while collecting).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace pyengine {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_relu_count(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& nan_count,
                           int64_t channel_dim, bool per_position, bool inclusive) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pyengine::relu_count", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, bool)>();
  return op.call(x, counts, nan_count, channel_dim, per_position, inclusive);
}

// Below autograd; the accumulators changed in place, so their version moves on as after any
// in-place op.
at::Tensor relu_count_below(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& nan_count,
                            int64_t channel_dim, bool per_position, bool inclusive) {
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    y = call_relu_count(x, counts, nan_count, channel_dim, per_position, inclusive);
  }
  for (const at::Tensor* t : {&counts, &nan_count})
    if (!t->is_inference()) torch::autograd::impl::bump_version(*t);
  return y;
}

class ReluCountFn : public torch::autograd::Function<ReluCountFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& counts,
                            const at::Tensor& nan_count, int64_t channel_dim, bool per_position, bool inclusive) {
    at::Tensor y = relu_count_below(x, counts, nan_count, channel_dim, per_position, inclusive);
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor y = ctx->get_saved_variables()[0];
    return {at::threshold_backward(grads[0], y, 0), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor relu_count_autograd(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& nan_count,
                               int64_t channel_dim, bool per_position, bool inclusive) {
  if (!(torch::autograd::GradMode::is_enabled() && x.requires_grad()))  // no node to record
    return relu_count_below(x, counts, nan_count, channel_dim, per_position, inclusive);
  return ReluCountFn::apply(x, counts, nan_count, channel_dim, per_position, inclusive);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, Autograd, m) { m.impl("relu_count", &relu_count_autograd); }

}  // namespace pyengine

// Version counters of pyengine's in-place ops (schemas in csrc/module.cpp): apply_masks_,
// entropy_counts_add_, entropy_counts_add_many_, fill_directions_ and fill_directions_keyed_. ATen's own in-place ops move
// the version of every tensor they write on (their ADInplaceOrView kernels), so that autograd
// refuses a backward that would read a saved tensor changed since it was saved ("modified by an
// inplace operation") instead of using the new values. A custom op gets nothing at that key by
// default; these kernels run the op below it and then move the versions on. (relu_count does the
// same in its autograd kernel, csrc/entropy/entropy_autograd.cpp.) Inference tensors have no
// version counter and are left alone.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

namespace pyengine {
namespace {

void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) torch::autograd::impl::bump_version(t);
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void apply_masks_view(at::TensorList tensors, at::TensorList masks, at::IntArrayRef mask_index) {
  static const auto op = op_handle<void(at::TensorList, at::TensorList, at::IntArrayRef)>("pyengine::apply_masks_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(tensors, masks, mask_index);
  }
  for (const at::Tensor& t : tensors) bump(t);
}

void entropy_counts_add_view(const at::Tensor& counts, const at::Tensor& nan_count, const at::Tensor& x,
                             int64_t channel_dim, bool per_position, bool inclusive) {
  static const auto op =
      op_handle<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, bool)>(
          "pyengine::entropy_counts_add_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(counts, nan_count, x, channel_dim, per_position, inclusive);
  }
  bump(counts);
  bump(nan_count);
}

void entropy_counts_add_many_view(at::TensorList counts, const at::Tensor& nan_count, at::TensorList xs,
                                  at::IntArrayRef channel_dims, bool per_position, bool inclusive) {
  static const auto op =
      op_handle<void(at::TensorList, const at::Tensor&, at::TensorList, at::IntArrayRef, bool, bool)>(
          "pyengine::entropy_counts_add_many_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(counts, nan_count, xs, channel_dims, per_position, inclusive);
  }
  for (const at::Tensor& t : counts) bump(t);
  bump(nan_count);
}

void fill_directions_view(at::Tensor& out, int64_t seed, bool normalize) {  // the CPU kernel's signature
  static const auto op = op_handle<void(at::Tensor&, int64_t, bool)>("pyengine::fill_directions_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(out, seed, normalize);
  }
  bump(out);
}

void fill_directions_keyed_view(at::Tensor& out, const at::Tensor& seed, bool normalize) {
  static const auto op =
      op_handle<void(at::Tensor&, const at::Tensor&, bool)>("pyengine::fill_directions_keyed_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.call(out, seed, normalize);
  }
  bump(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, ADInplaceOrView, m) {
  m.impl("apply_masks_", &apply_masks_view);
  m.impl("entropy_counts_add_", &entropy_counts_add_view);
  m.impl("entropy_counts_add_many_", &entropy_counts_add_many_view);
  m.impl("fill_directions_", &fill_directions_view);
  m.impl("fill_directions_keyed_", &fill_directions_keyed_view);
}

}  // namespace pyengine

// CUDA implementations of masked_linear (forward, backward) and apply_masks_ (schemas in
// csrc/module.cpp): argument checks shared with the CPU path (masked_args.h), cuBLAS GEMMs through
// ATen, and the raw kernels of masked_cuda.cu.
//
// Where the mask goes: the GEMMs are plain cuBLAS on the masked weight W * M, which one
// vectorised pass writes (reading W and M once) and a cache keeps until W or M changes - keyed by
// their storages and checked against their version counters, so an optimiser step (which bumps
// W's version) or a new mask invalidates it. The backward's dx reuses the forward's masked weight
// from the cache; dW = dy^T x is masked in place by one more pass. So a training step costs the
// dense GEMMs plus two memory passes over W - about what W * M followed by cuBLAS costs, never
// more - and an inference forward with an unchanged W costs the dense GEMM alone.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <c10/util/intrusive_ptr.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <string>
#include <vector>

#include "common/cuda_glue.h"
#include "masked/masked_args.h"
#include "masked/masked_kernels.h"

namespace pyengine {
namespace {

namespace pc = pyengine::cuda;

// ------------------------------------------------------------------------ masked weight cache

struct CacheEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> w_storage, m_storage;  // expire when W or M dies
  const void* w_ptr;
  const void* m_ptr;
  std::vector<int64_t> sizes, w_strides, m_strides;
  at::ScalarType dtype;
  int64_t w_version, m_version;
  at::Tensor wm;
  CacheEntry(const at::Tensor& w, const at::Tensor& m, int64_t wv, int64_t mv, at::Tensor masked)
      : w_storage(w.storage().getWeakStorageImpl()),
        m_storage(m.storage().getWeakStorageImpl()),
        w_ptr(w.data_ptr()),
        m_ptr(m.data_ptr()),
        sizes(w.sizes().vec()),
        w_strides(w.strides().vec()),
        m_strides(m.strides().vec()),
        dtype(w.scalar_type()),
        w_version(wv),
        m_version(mv),
        wm(std::move(masked)) {}
};

struct MaskedCache {
  std::mutex mu;
  std::list<CacheEntry> entries;  // most recently used first
  int64_t bytes = 0, hits = 0, misses = 0;
  int64_t limit = int64_t(1024) << 20;
  MaskedCache() {
    if (const char* v = std::getenv("PYENGINE_MASKED_CACHE_MB")) {
      char* end = nullptr;
      const long long mb = std::strtoll(v, &end, 10);
      if (end && *end == '\0' && mb >= 0) limit = int64_t(mb) << 20;
    }
  }
};
MaskedCache& cache() {
  static MaskedCache* c = new MaskedCache();  // never destroyed: tensors may outlive exit
  return *c;
}

bool same_storage(const c10::weak_intrusive_ptr<c10::StorageImpl>& weak, const at::Tensor& t) {
  if (weak.expired()) return false;
  auto strong = weak.lock();
  return strong.get() == t.storage().unsafeGetStorageImpl();
}

bool matches(const CacheEntry& e, const at::Tensor& w, const at::Tensor& m) {
  return e.w_ptr == w.data_ptr() && e.m_ptr == m.data_ptr() && e.dtype == w.scalar_type() &&
         e.sizes == w.sizes().vec() && e.w_strides == w.strides().vec() && e.m_strides == m.strides().vec() &&
         same_storage(e.w_storage, w) && same_storage(e.m_storage, m);
}

at::Tensor compute_masked(const at::Tensor& w_, const at::Tensor& m_) {
  const at::Tensor w = w_.contiguous();
  const at::Tensor m = m_.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  if (w.numel() == 0) return out;
  C10_CUDA_CHECK(pc::masked_copy(pc::kernel_dtype(w), out.data_ptr(), w.size(1), w.data_ptr(), w.size(1),
                                 m.data_ptr<bool>(), w.size(1), w.size(0), w.size(1), pc::current_stream()));
  return out;
}

// W * M, from the cache when W and M are unchanged since it was made.
at::Tensor masked_weight(const at::Tensor& w, const at::Tensor& m) {
  MaskedCache& C = cache();
  // graph capture replays whatever was captured: never serve (or keep) a cached copy then;
  // inference tensors have no version counter to key on
  if (C.limit == 0 || pc::stream_capturing() || w.is_inference() || m.is_inference()) return compute_masked(w, m);
  const int64_t wv = static_cast<int64_t>(w._version()), mv = static_cast<int64_t>(m._version());
  {
    std::lock_guard<std::mutex> lock(C.mu);
    for (auto it = C.entries.begin(); it != C.entries.end(); ++it) {
      if (!matches(*it, w, m)) continue;
      if (it->w_version == wv && it->m_version == mv) {
        ++C.hits;
        C.entries.splice(C.entries.begin(), C.entries, it);
        return C.entries.front().wm;
      }
      C.bytes -= it->wm.nbytes();
      C.entries.erase(it);
      break;
    }
    ++C.misses;
    // drop entries whose weight or mask died
    for (auto it = C.entries.begin(); it != C.entries.end();) {
      if (it->w_storage.expired() || it->m_storage.expired()) {
        C.bytes -= it->wm.nbytes();
        it = C.entries.erase(it);
      } else {
        ++it;
      }
    }
  }
  at::Tensor wm = compute_masked(w, m);
  const int64_t nb = static_cast<int64_t>(wm.nbytes());
  if (nb > C.limit) return wm;
  std::lock_guard<std::mutex> lock(C.mu);
  while (!C.entries.empty() && C.bytes + nb > C.limit) {
    C.bytes -= C.entries.back().wm.nbytes();
    C.entries.pop_back();
  }
  C.entries.emplace_front(w, m, wv, mv, wm);
  C.bytes += nb;
  return wm;
}

// ------------------------------------------------------------------------ masked linear

at::Tensor masked_linear_cuda(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& mask,
                              const std::optional<at::Tensor>& bias) {
  const OpChecks op{"masked_linear"};
  pc::cuda_entry(op, x_, "x");
  check_masked_args(op, x_, weight, mask, bias);
  c10::cuda::CUDAGuard guard(x_.device());
  // the inputs' precision, as on the CPU and in the fake kernel: under torch.autocast the addmm
  // below would otherwise come back in float16 / bfloat16
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t m = x_.size(0), n = weight.size(0);
  const bool hb = bias.has_value() && bias->defined();
  if (m == 0 || n == 0 || x_.size(1) == 0) {
    at::Tensor out = at::empty({m, n}, x_.options());
    if (hb) out.copy_(bias->unsqueeze(0).expand({m, n}));
    else out.zero_();
    return out;
  }
  const at::Tensor wm = masked_weight(weight, mask);
  return hb ? at::addmm(*bias, x_, wm.t()) : at::mm(x_, wm.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cuda(
    const at::Tensor& dy_, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask, bool need_x,
    bool need_w, bool need_b) {
  const OpChecks op{"masked_linear_backward"};
  pc::cuda_entry(op, x, "x");
  check_masked_bwd_args(op, dy_, x, weight, mask);
  c10::cuda::CUDAGuard guard(x.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as the forward
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  at::Tensor dx = at::empty({0}, x.options());
  at::Tensor dw = at::empty({0}, weight.options());
  at::Tensor db = at::empty({0}, weight.options());
  if (need_x) {
    if (m == 0 || k == 0 || n == 0) dx = at::zeros({m, k}, x.options());
    else dx = at::mm(dy_, masked_weight(weight, mask));  // usually the forward's cached W * M
  }
  if (need_w) {
    if (m == 0 || k == 0 || n == 0) {
      dw = at::zeros({n, k}, weight.options());
    } else {
      dw = at::mm(dy_.t(), x);  // (n, k), contiguous
      const at::Tensor mk = mask.contiguous();
      C10_CUDA_CHECK(pc::masked_copy(pc::kernel_dtype(dw), dw.data_ptr(), k, dw.data_ptr(), k, mk.data_ptr<bool>(), k,
                                     n, k, pc::current_stream()));
    }
  }
  if (need_b) db = dy_.sum(0);  // fp32 accumulation for half types, one rounding; zeros when m == 0
  return {dx, dw, db};
}

// ------------------------------------------------------------------------ apply_masks_

void apply_masks_cuda(at::TensorList tensors, at::TensorList masks, at::IntArrayRef mask_index) {
  const OpChecks op{"apply_masks_"};
  if (tensors.empty()) {
    if (!mask_index.empty()) op.value_error("mask_index has ", mask_index.size(), " entries for 0 tensors");
    return;
  }
  pc::cuda_entry(op, tensors[0], "tensors[0]");
  check_apply_masks_args(op, tensors, masks, mask_index);
  c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<pc::MaskTensorDesc> descs;
  descs.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    descs.push_back({t.data_ptr(), masks[mask_index[i]].data_ptr<bool>(), t.numel(), static_cast<int32_t>(t.element_size())});
  }
  if (descs.empty()) return;
  C10_CUDA_CHECK(pc::apply_masks(descs.data(), static_cast<int64_t>(descs.size()), pc::current_stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("masked_linear", &masked_linear_cuda);
  m.impl("masked_linear_backward", &masked_linear_backward_cuda);
  m.impl("apply_masks_", &apply_masks_cuda);
}

}  // namespace pyengine

// pyengine._C.masked_cache_info() / masked_cache_clear()
extern "C" void pyengine_masked_cache_info(int64_t* out) {
  auto& C = pyengine::cache();
  std::lock_guard<std::mutex> lock(C.mu);
  out[0] = static_cast<int64_t>(C.entries.size());
  out[1] = C.bytes;
  out[2] = C.hits;
  out[3] = C.misses;
  out[4] = C.limit;
}

extern "C" int64_t pyengine_masked_cache_clear() {
  auto& C = pyengine::cache();
  std::list<pyengine::CacheEntry> dead;
  int64_t freed;
  {
    std::lock_guard<std::mutex> lock(C.mu);
    dead.swap(C.entries);
    freed = C.bytes;
    C.bytes = 0;
  }
  return freed;  // the tensors are released here, outside the lock
}

// Large CPU outputs backed by transparent huge pages.
//
// A CPU tensor of many MiB is fresh memory from the C allocator (glibc maps it on allocation and
// unmaps it on free), so every 4 KiB page faults on its first write. For outputs that are
// allocated anew each training step - a (n, d) gradient of 32 MiB, say - those faults cost
// more than the arithmetic (about 16 ms per 32 MiB on the 2-core test VM, 3-4 ms with 2 MiB
// pages). Where the kernel runs transparent huge pages in "madvise" mode, asking for them
// before the first write cuts the faults 512-fold. The advice is only a hint: on failure, or
// on systems without it, the tensor is an ordinary one. On a machine whose memory is badly
// fragmented, the kernel may compact memory to find huge pages; PYENGINE_HUGEPAGES=0 turns the
// advice off.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyengine {

inline bool hugepages_wanted() {
  static const bool on = [] {
    const char* v = std::getenv("PYENGINE_HUGEPAGES");
    return !(v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0));
  }();
  return on;
}

inline at::Tensor empty_large_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t bytes = uintptr_t(t.nbytes());
  if (bytes >= 4 * kHuge && hugepages_wanted()) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace pyengine

// See buffer_pool.h.
#include "common/buffer_pool.h"

#include <c10/util/accumulate.h>

#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

namespace pyengine {
namespace {

constexpr size_t kMinBytes = size_t(4) << 20;
constexpr size_t kAlign = 4096;

struct Pool {
  std::mutex mu;
  std::multimap<size_t, void*> idle;        // byte size -> free block
  std::unordered_map<void*, size_t> live;   // block handed out -> byte size
  size_t idle_bytes = 0, live_bytes = 0;
  int64_t hits = 0, misses = 0;
  size_t limit = size_t(512) << 20;
  std::string env_error;  // raised by the first pooled allocation, never from the C entry points

  Pool() {
    const char* v = std::getenv("PYENGINE_CPU_POOL_MB");
    if (!v || !*v) return;
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    if (end && *end == '\0' && mb >= 0 && mb < (1LL << 40)) {
      limit = size_t(mb) << 20;
    } else {
      limit = 0;
      env_error = std::string("PYENGINE_CPU_POOL_MB must be a whole number of MiB >= 0, got '") + v + "'";
    }
  }
};

// Never destroyed: tensors may outlive static destruction at interpreter exit.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void give_back(void* block) {
  Pool& P = pool();
  std::lock_guard<std::mutex> lock(P.mu);
  auto it = P.live.find(block);
  if (it == P.live.end()) {  // not ours (cannot happen); do not leak it
    std::free(block);
    return;
  }
  const size_t bytes = it->second;
  P.live.erase(it);
  P.live_bytes -= bytes;
  if (P.idle_bytes + bytes <= P.limit) {
    P.idle.emplace(bytes, block);
    P.idle_bytes += bytes;
  } else {
    std::free(block);
  }
}

}  // namespace

at::Tensor pooled_empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Pool& P = pool();
  TORCH_CHECK(P.env_error.empty(), P.env_error);
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t bytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinBytes || P.limit == 0) return at::empty(sizes, options);
  void* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(P.mu);
    auto it = P.idle.find(bytes);
    if (it != P.idle.end()) {
      block = it->second;
      P.idle.erase(it);
      P.idle_bytes -= bytes;
      ++P.hits;
    } else {
      ++P.misses;
    }
  }
  if (!block) {
    block = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
    TORCH_CHECK(block, "pyengine: out of memory allocating ", bytes, " bytes on the CPU");
  }
  {
    std::lock_guard<std::mutex> lock(P.mu);
    P.live.emplace(block, bytes);
    P.live_bytes += bytes;
  }
  at::Tensor t = at::from_blob(block, sizes, &give_back, options.device(at::kCPU));
  // keep torch.utils.deterministic.fill_uninitialized_memory meaningful for pooled outputs
  const auto& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory() && t.is_floating_point())
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace pyengine

extern "C" void pyengine_cpu_pool_stats(int64_t* stats) {
  pyengine::Pool& P = pyengine::pool();
  std::lock_guard<std::mutex> lock(P.mu);
  stats[0] = int64_t(P.idle_bytes);
  stats[1] = int64_t(P.idle.size());
  stats[2] = int64_t(P.live_bytes);
  stats[3] = P.hits;
  stats[4] = P.misses;
}

extern "C" int64_t pyengine_cpu_pool_release() {
  pyengine::Pool& P = pyengine::pool();
  std::lock_guard<std::mutex> lock(P.mu);
  int64_t freed = 0;
  for (auto& kv : P.idle) {
    std::free(kv.second);
    freed += int64_t(kv.first);
  }
  P.idle.clear();
  P.idle_bytes = 0;
  return freed;
}

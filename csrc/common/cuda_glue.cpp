// See cuda_glue.h.
#include "common/cuda_glue.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

namespace pyengine {
namespace cuda {

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  if (v < 1) v = 1;
  if (device >= 0 && device < 64) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

bool stream_capturing() {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(current_stream(), &st));
  return st != cudaStreamCaptureStatusNone;
}

cudaEvent_t cached_event(int device, int slot) {
  constexpr int kSlots = 8;
  TORCH_CHECK(slot >= 0 && slot < kSlots, "pyengine: event slot out of range");
  thread_local std::unordered_map<int, std::array<cudaEvent_t, kSlots>> cache;
  auto it = cache.find(device);
  if (it == cache.end()) {
    std::array<cudaEvent_t, kSlots> none{};
    none.fill(nullptr);
    it = cache.emplace(device, none).first;
  }
  cudaEvent_t& e = it->second[slot];
  if (e == nullptr) C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

namespace {

constexpr int kMaxDevices = 64;
struct Records {
  std::mutex mu;
  DeviceErrorRecord* host[kMaxDevices] = {};
  DeviceErrorRecord* dev[kMaxDevices] = {};
};
Records& records() {
  static Records* r = new Records();  // never destroyed: kernels may still run at exit
  return *r;
}

std::string describe(const DeviceErrorRecord& r) {
  const char* op = r.op == kOpSparseLinear         ? "sparse_linear"
                   : r.op == kOpSlicedBwd          ? "sliced_wasserstein_bwd"
                   : r.op == kOpSparseLinearBitmap ? "sparse_linear_bitmap"
                   : r.op == kOpSlicedGrouped      ? "sliced_wasserstein_grouped"
                   : r.op == kOpEntropyFromCounts  ? "entropy_from_counts"
                                                   : "op";
  std::string m = std::string("pyengine.") + op + ": ";
  switch (r.code) {
    case kDevErrColidx:
      m += c10::str("colidx holds ", r.value, " at position ", r.position, ", but in_features is ", r.bound);
      break;
    case kDevErrRowptrStart:
      m += c10::str("rowptr must start at 0 but rowptr[0] is ", r.value);
      break;
    case kDevErrRowptrOrder:
      m += c10::str("rowptr must not decrease, but rowptr[", r.position + 1, "] = ", r.value, " is below rowptr[",
                    r.position, "] = ", r.bound);
      break;
    case kDevErrRowptrEnd:
      if (r.value < r.bound)  // the last row ends short of the stored entries (the CPU check's words)
        m += c10::str("rowptr ends at ", r.value, " but colidx and values hold ", r.bound, " entries");
      else
        m += c10::str("rowptr[", r.position + 1, "] = ", r.value, " points past the ", r.bound, " stored entries");
      break;
    case kDevErrWin:
      m += c10::str("win[", r.position, "] = ", r.value, " is not a direction (there are ", r.bound, ")");
      break;
    case kDevErrTileRange:
      m += tile_range_message(r.position, r.value, r.bound);
      break;
    case kDevErrTileCount:
      m += tile_count_message(r.position, r.value, r.bound);
      break;
    case kDevErrColOrder:
      m += c10::str("colidx must ascend within each row (as pack_sparse writes it), but position ", r.position,
                    " holds ", r.value, " out of order");
      break;
    case kDevErrCount:
      m += count_range_message(r.position, r.value, r.bound);
      break;
    default:
      m += c10::str("unknown device error code ", r.code);
  }
  return m + " (found on the GPU by an earlier call, whose output is invalid; the bad entries were skipped)";
}

}  // namespace

DeviceErrorRecord* device_error_record(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "pyengine: CUDA device index ", device, " out of range");
  Records& R = records();
  std::lock_guard<std::mutex> lock(R.mu);
  if (R.dev[device] == nullptr) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    void* h = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&h, sizeof(DeviceErrorRecord), cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(h, 0, sizeof(DeviceErrorRecord));
    void* d = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&d, h, 0));
    R.host[device] = static_cast<DeviceErrorRecord*>(h);
    R.dev[device] = static_cast<DeviceErrorRecord*>(d);
  }
  return R.dev[device];
}

// Takes the pending error of `device` (message into *msg) and clears the record.
bool take_device_error(int device, std::string* msg) {
  if (device < 0 || device >= kMaxDevices) return false;
  Records& R = records();
  DeviceErrorRecord* h;
  {
    std::lock_guard<std::mutex> lock(R.mu);
    h = R.host[device];
  }
  if (h == nullptr) return false;
  volatile DeviceErrorRecord* v = h;
  if (v->code == kDevErrNone) return false;
  std::atomic_thread_fence(std::memory_order_acquire);
  DeviceErrorRecord copy;
  copy.code = v->code;
  copy.op = v->op;
  copy.position = v->position;
  copy.value = v->value;
  copy.bound = v->bound;
  *msg = describe(copy);
  v->code = kDevErrNone;
  std::atomic_thread_fence(std::memory_order_release);
  v->claimed = 0;
  return true;
}

void raise_pending_device_error(int device) {
  std::string msg;
  if (take_device_error(device, &msg)) C10_THROW_ERROR(ValueError, msg);
}

}  // namespace cuda
}  // namespace pyengine

// For pyengine._C.take_device_error(device, sync): synchronises `device` first when sync != 0;
// copies a pending error's message into buf (NUL-terminated) and returns its length, or 0.
extern "C" int pyengine_take_device_error(int device, int sync, char* buf, int len) {
  if (sync) {
    int prev = 0;
    if (cudaGetDevice(&prev) != cudaSuccess) prev = 0;
    if (cudaSetDevice(device) == cudaSuccess) (void)cudaDeviceSynchronize();
    (void)cudaSetDevice(prev);
  }
  std::string msg;
  if (!pyengine::cuda::take_device_error(device, &msg)) return 0;
  const int n = static_cast<int>(std::min<size_t>(msg.size(), static_cast<size_t>(len > 0 ? len - 1 : 0)));
  std::memcpy(buf, msg.data(), n);
  if (len > 0) buf[n] = '\0';
  return n;
}

// Tells Python whether this build carries the CUDA kernels; without them, the C entry points the
// CUDA glue would define answer "nothing there".
#include <cstdint>

extern "C" int pyengine_cuda_compiled() {
#ifdef PYENGINE_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

#ifndef PYENGINE_WITH_CUDA
extern "C" int pyengine_take_device_error(int, int, char* buf, int len) {
  if (len > 0) buf[0] = '\0';
  return 0;
}
extern "C" void pyengine_masked_cache_info(int64_t* out) {
  for (int i = 0; i < 5; ++i) out[i] = 0;
}
extern "C" int64_t pyengine_masked_cache_clear() { return 0; }
#endif

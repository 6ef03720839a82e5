// Switches read from the environment per call (the kernel variants benchmarks/bench_gpu.py times
// side by side). No torch headers: included by .cu files too.
#pragma once

#include <cstdlib>
#include <cstring>

namespace pyengine {

// Whether environment variable `name` is set to exactly `value`.
inline bool env_equals(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

}  // namespace pyengine

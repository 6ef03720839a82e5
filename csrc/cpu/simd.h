// Two compilations of csrc/cpu/simd_kernels.inc: `base` for any x86-64 (or other) CPU and
// `avx2` for CPUs with AVX2 and FMA, chosen at run time. No -march=native, so a build works on
// any machine of the same architecture.
#pragma once
#include <cmath>
#include <cstdint>

namespace pyengine {
namespace cpu_base {
#include "cpu/simd_kernels.inc"
}  // namespace cpu_base

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cpu_avx2 {
#include "cpu/simd_kernels.inc"
}  // namespace cpu_avx2
#pragma GCC pop_options
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
namespace cpu_avx2 = cpu_base;
inline bool cpu_has_avx2() { return false; }
#endif
}  // namespace pyengine

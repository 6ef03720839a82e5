// The one AVX2 / baseline dispatch helper for the CPU kernels.
//
// A family's hot loops live in a .inc file of plain C++ on raw pointers (no ATen). A kernel
// source includes them twice through this header - once for any x86-64 CPU (`cpu_base`) and
// once compiled for AVX2 + FMA (`cpu_avx2`) - and calls them through PYENGINE_SIMD, which picks
// the AVX2 build at run time when the CPU has it. No -march=native: a build runs on any CPU of
// the architecture.
//
//   #define PYENGINE_SIMD_KERNELS "entropy/entropy_simd.inc"
//   #include "common/simd.h"
//   ... PYENGINE_SIMD(count_plane<Cls, true>(src, n, &nans)) ...
//
// Include it once per source file, inside no namespace.
#ifndef PYENGINE_SIMD_KERNELS
#error "define PYENGINE_SIMD_KERNELS (the family's .inc file) before including common/simd.h"
#endif
#include <cmath>
#include <cstdint>

namespace pyengine {
namespace {
namespace cpu_base {
#include PYENGINE_SIMD_KERNELS
}  // namespace cpu_base

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cpu_avx2 {
#include PYENGINE_SIMD_KERNELS
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
}  // namespace
}  // namespace pyengine

// The call expression, evaluated in the AVX2 build when the CPU supports it, else the baseline.
#define PYENGINE_SIMD(...) (::pyengine::cpu_has_avx2() ? cpu_avx2::__VA_ARGS__ : cpu_base::__VA_ARGS__)

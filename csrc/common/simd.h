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
// Include it once per source file, inside no namespace. A .inc may hold hand-written AVX2
// intrinsics under `#if PYENGINE_SIMD_AVX2` (1 in the AVX2 build, 0 in the baseline); the source
// file then includes <immintrin.h> itself, before this header.
#ifndef PYENGINE_SIMD_KERNELS
#error "define PYENGINE_SIMD_KERNELS (the family's .inc file) before including common/simd.h"
#endif
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "common/env.h"

namespace pyengine {
namespace {
namespace cpu_base {
#define PYENGINE_SIMD_AVX2 0
#include PYENGINE_SIMD_KERNELS
#undef PYENGINE_SIMD_AVX2
}  // namespace cpu_base

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cpu_avx2 {
#define PYENGINE_SIMD_AVX2 1
#include PYENGINE_SIMD_KERNELS
#undef PYENGINE_SIMD_AVX2
}  // namespace cpu_avx2
#pragma GCC pop_options
// PYENGINE_DISABLE_AVX2=1 in the environment forces the baseline kernels (tests compare the two).
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !env_equals("PYENGINE_DISABLE_AVX2", "1");
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

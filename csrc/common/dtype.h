// The floating dtypes the CUDA kernels support, shared by the torch glue and the raw kernels
// (no torch headers here, so the .cu files compile without them).
#pragma once

namespace pyengine {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// +inf of the 16-bit formats as raw bits: a positive value's bits are 1 .. inf, a NaN's bits
// without the sign are above inf (the raw-bit ON / NaN tests of the entropy kernels).
constexpr unsigned kFloat16InfBits = 0x7C00u;
constexpr unsigned kBFloat16InfBits = 0x7F80u;

inline int dtype_size(DType d) {
  switch (d) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

}  // namespace cuda
}  // namespace pyengine

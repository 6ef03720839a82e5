// The floating dtypes the CUDA kernels support, shared by the torch glue and the raw kernels
// (no torch headers here, so the .cu files compile without them).
#pragma once

namespace pyengine {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

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

// What the model drivers (*_model.cpp) share: case reporting and small exact test data.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "model.h"

#include "common/dtype.h"

namespace check {

inline int failures = 0;

inline void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  std::fflush(stdout);
  if (!ok) ++failures;
}

// The ThreadSanitizer build runs a smaller set (each kernel and path once): a missing barrier is
// a race at any size, and the sanitizer makes every barrier of 256-512 threads slow.
inline bool quick() {
  const char* v = std::getenv("MODEL_QUICK");
  return v != nullptr && v[0] == '1';
}

inline int finish() {
  if (failures == 0) std::printf("all ok\n");
  return failures == 0 ? 0 : 1;
}

// (n, k) row-major with entries in {-2, -1, 1, 2} at the given density, 0 elsewhere: with x in
// {-1, 0, 1}, every product and partial sum below a few hundred is exact in float32 and in the
// 16-bit output types, so a kernel's result must equal the reference exactly.
inline std::vector<float> sparse_matrix(int64_t n, int64_t k, double density, std::mt19937& g) {
  std::uniform_real_distribution<double> u(0, 1);
  std::uniform_int_distribution<int> v(-2, 2);
  std::vector<float> w(static_cast<size_t>(n * k), 0.0f);
  for (auto& e : w)
    if (u(g) < density) {
      int q = 0;
      while (q == 0) q = v(g);
      e = static_cast<float>(q);
    }
  return w;
}

inline std::vector<float> small_ints(size_t count, int lo, int hi, std::mt19937& g) {
  std::uniform_int_distribution<int> v(lo, hi);
  std::vector<float> a(count);
  for (auto& e : a) e = static_cast<float>(v(g));
  return a;
}

template <typename T>
T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return static_cast<T>(x);
}

template <typename T>
float to_float(T x) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) return model::to_float_any(x);
  else return static_cast<float>(x);
}

template <typename T>
std::vector<T> convert(const std::vector<float>& a) {
  std::vector<T> out;
  out.reserve(a.size());
  for (float x : a) out.push_back(from_float<T>(x));
  return out;
}

template <typename T>
constexpr pyengine::cuda::DType dtype_of() {
  using pyengine::cuda::DType;
  if constexpr (std::is_same_v<T, __half>) return DType::kFloat16;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return DType::kBFloat16;
  else if constexpr (std::is_same_v<T, double>) return DType::kFloat64;
  else return DType::kFloat32;
}

// y (m, n) = x (m, k) @ w (n, k)^T + bias, in double.
inline std::vector<double> linear(const std::vector<float>& w, const std::vector<float>& x, const std::vector<float>* bias,
                                  int64_t m, int64_t k, int64_t n) {
  std::vector<double> y(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) {
      double s = bias ? (*bias)[r] : 0.0;
      for (int64_t c = 0; c < k; ++c) s += static_cast<double>(w[r * k + c]) * x[i * k + c];
      y[i * n + r] = s;
    }
  return y;
}

// Index of the first entry where got != want, or -1.
template <typename T>
int64_t first_mismatch(const std::vector<T>& got, const std::vector<double>& want) {
  for (size_t i = 0; i < want.size(); ++i)
    if (static_cast<double>(to_float(got[i])) != want[i]) return static_cast<int64_t>(i);
  return -1;
}

}  // namespace check

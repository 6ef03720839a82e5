// The one argument-check layer of the native ops, shared by the CPU and the CUDA paths.
//
// Every op validates shapes, dtypes, devices, contiguity and (on the CPU) index ranges through
// these helpers before it touches memory, so every failure reads the same way:
//
//   pyengine.sparse_linear: colidx holds 70000 at position 12, but in_features is 4096
//
// and reaches Python as ValueError (bad value or shape), TypeError (bad dtype) or IndexError
// (index out of range) instead of a crash. Index checks on CUDA tensors, which would need a host
// sync, are done inside the kernels instead (common/device_error.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <initializer_list>
#include <string>

namespace pyengine {

// "float32" rather than "Float".
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kBool: return "bool";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

inline std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) r += ", ";
    r += std::to_string(s[i]);
  }
  if (s.size() == 1) r += ",";
  return r + ")";
}

// Checks for one op; `name` is the op's name without the namespace.
struct OpChecks {
  const char* name;

  template <typename... A>
  [[noreturn]] void value_error(const A&... a) const {
    C10_THROW_ERROR(ValueError, c10::str("pyengine.", name, ": ", a...));
  }
  template <typename... A>
  [[noreturn]] void type_error(const A&... a) const {
    C10_THROW_ERROR(TypeError, c10::str("pyengine.", name, ": ", a...));
  }
  template <typename... A>
  [[noreturn]] void index_error(const A&... a) const {
    C10_THROW_ERROR(IndexError, c10::str("pyengine.", name, ": ", a...));
  }
  template <typename... A>
  void require(bool ok, const A&... a) const {
    if (!ok) value_error(a...);
  }

  void defined(const at::Tensor& t, const char* arg) const {
    if (!t.defined()) value_error(arg, " is an undefined tensor");
  }
  // Exactly `nd` dimensions; `layout` names them, e.g. "(M, K)".
  void dim(const at::Tensor& t, const char* arg, int64_t nd, const char* layout = "") const {
    defined(t, arg);
    if (t.dim() != nd)
      value_error(arg, " must have ", nd, " dimensions", (*layout ? " " : ""), layout, ", got shape ",
                  shape_str(t.sizes()));
  }
  void min_dim(const at::Tensor& t, const char* arg, int64_t nd) const {
    defined(t, arg);
    if (t.dim() < nd) value_error(arg, " must have at least ", nd, " dimensions, got shape ", shape_str(t.sizes()));
  }
  void dtype(const at::Tensor& t, const char* arg, std::initializer_list<at::ScalarType> ok) const {
    defined(t, arg);
    for (auto s : ok)
      if (t.scalar_type() == s) return;
    std::string allowed;
    for (auto s : ok) allowed += (allowed.empty() ? "" : ", ") + std::string(dtype_name(s));
    type_error(arg, " has dtype ", dtype_name(t.scalar_type()), "; expected ", allowed);
  }
  void floating(const at::Tensor& t, const char* arg) const {
    dtype(t, arg, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  }
  void same_dtype(const at::Tensor& t, const char* arg, const at::Tensor& ref, const char* ref_arg) const {
    if (t.scalar_type() != ref.scalar_type())
      type_error(arg, " has dtype ", dtype_name(t.scalar_type()), " but ", ref_arg, " has ",
                 dtype_name(ref.scalar_type()), "; they must match");
  }
  void same_device(const at::Tensor& t, const char* arg, const at::Tensor& ref, const char* ref_arg) const {
    if (t.device() != ref.device())
      value_error(arg, " is on ", t.device(), " but ", ref_arg, " is on ", ref.device(),
                  "; all arguments must be on the same device");
  }
  void size(const at::Tensor& t, const char* arg, int64_t d, int64_t expect, const char* what) const {
    if (t.size(d) != expect)
      value_error(arg, " has ", t.size(d), " entries in dimension ", d, " but ", what, " is ", expect,
                  " (shape ", shape_str(t.sizes()), ")");
  }
  void shape(const at::Tensor& t, const char* arg, at::IntArrayRef expect, const char* whose) const {
    if (t.sizes() != expect)
      value_error(arg, " has shape ", shape_str(t.sizes()), " but must have shape ", shape_str(expect), " (",
                  whose, ")");
  }
  void contiguous(const at::Tensor& t, const char* arg) const {
    if (!t.is_contiguous()) value_error(arg, " must be contiguous (call .contiguous() first)");
  }
};

// First position of `idx` (a contiguous CPU int16/int32/int64 tensor) whose value lies outside
// [0, bound), or -1; *value receives that value.
inline int64_t first_out_of_range(const at::Tensor& idx, int64_t bound, int64_t* value) {
  const int64_t n = idx.numel();
  auto scan = [&](auto* p) -> int64_t {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = static_cast<int64_t>(p[i]);
      if (v < 0 || v >= bound) {
        *value = v;
        return i;
      }
    }
    return -1;
  };
  switch (idx.scalar_type()) {
    case at::kShort: return scan(idx.data_ptr<int16_t>());
    case at::kInt: return scan(idx.data_ptr<int32_t>());
    case at::kLong: return scan(idx.data_ptr<int64_t>());
    default: return -1;
  }
}

// CSR row pointers of a sparse (N, K) matrix with nnz stored entries: rowptr is int32 [N + 1]
// with rowptr[0] = 0, non-decreasing, rowptr[N] = nnz. The host part (CPU tensors) of the check
// every CSR consumer does; CUDA kernels check the same on the device.
inline void check_rowptr_cpu(const OpChecks& op, const at::Tensor& rowptr, int64_t nnz) {
  const int64_t n1 = rowptr.numel();
  const int32_t* rp = rowptr.data_ptr<int32_t>();
  if (rp[0] != 0) op.value_error("rowptr must start at 0 but rowptr[0] is ", rp[0]);
  for (int64_t r = 1; r < n1; ++r)
    if (rp[r] < rp[r - 1])
      op.value_error("rowptr must not decrease, but rowptr[", r, "] = ", rp[r], " is below rowptr[", r - 1,
                     "] = ", rp[r - 1]);
  if (rp[n1 - 1] != nnz)
    op.value_error("rowptr ends at ", rp[n1 - 1], " but colidx and values hold ", nnz, " entries");
}

// The two ways a tile of the bitmap format (masked/bitmap_kernels.h) can be inconsistent, in the
// words both the CPU check and the CUDA device-error record use.
inline std::string tile_range_message(int64_t t, int64_t a, int64_t b) {
  return c10::str("offsets[", t, "] = ", a, " and offsets[", t + 1, "] = ", b,
                  " do not delimit stored values (0 <= offsets[t] <= offsets[t + 1] <= nnz)");
}
inline std::string tile_count_message(int64_t t, int64_t stored, int64_t bits) {
  return c10::str("tile ", t, " has ", bits, " bits set in bitmap but offsets give it ", stored, " values");
}
// An ON count outside [0, n_samples] (entropy_from_counts), in the words of both devices.
inline std::string count_range_message(int64_t i, int64_t count, int64_t n_samples) {
  return c10::str("counts holds ", count, " at position ", i, ", outside [0, n_samples = ", n_samples, "]");
}

// The argument checks of sparse_linear(x, rowptr, colidx, values, in_features, bias) that need no
// look at the index values: shapes, dtypes, devices. Returns N (output features).
inline int64_t check_sparse_linear_args(const OpChecks& op, const at::Tensor& x, const at::Tensor& rowptr,
                                        const at::Tensor& colidx, const at::Tensor& values, int64_t in_features,
                                        const c10::optional<at::Tensor>& bias) {
  op.dim(x, "x", 2, "(M, in_features)");
  op.floating(x, "x");
  op.dim(rowptr, "rowptr", 1);
  op.dtype(rowptr, "rowptr", {at::kInt});
  op.dim(colidx, "colidx", 1);
  op.dtype(colidx, "colidx", {at::kShort, at::kInt});
  op.dim(values, "values", 1);
  op.same_dtype(values, "values", x, "x");
  op.same_device(rowptr, "rowptr", x, "x");
  op.same_device(colidx, "colidx", x, "x");
  op.same_device(values, "values", x, "x");
  if (in_features < 0) op.value_error("in_features must be >= 0, got ", in_features);
  if (x.size(1) != in_features)
    op.value_error("x has ", x.size(1), " features in its last dimension but in_features is ", in_features);
  if (rowptr.numel() < 1) op.value_error("rowptr is empty; it needs N + 1 entries for N output features");
  if (colidx.numel() != values.numel())
    op.value_error("colidx holds ", colidx.numel(), " entries but values holds ", values.numel(), "; they must match");
  if (colidx.scalar_type() == at::kShort && in_features > 32768)
    op.value_error("int16 colidx cannot address in_features = ", in_features, " (at most 32768); use int32");
  if (values.numel() >= (int64_t(1) << 31)) op.value_error("more than 2**31 - 1 stored entries");
  const int64_t n = rowptr.numel() - 1;
  if (bias.has_value() && bias->defined()) {
    op.dim(*bias, "bias", 1);
    op.same_dtype(*bias, "bias", x, "x");
    op.same_device(*bias, "bias", x, "x");
    if (bias->size(0) != n) op.value_error("bias has ", bias->size(0), " entries but the weight has ", n, " rows");
  }
  return n;
}

}  // namespace pyengine

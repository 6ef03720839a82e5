// Runs the CSR launchers and kernels of csrc/masked/sparse_cuda.cu (pack count and fill, the
// skinny small-batch product in both x-staging modes, the float32 SpMM, the densify tiles) in the
// CPU model of the CUDA execution model (model.h), against plain loops; and checks that a bad
// column index or row pointer is reported, never followed. pack_scan (CUB) is left out of the
// model; the rows' offsets are computed here. Built and run by tests/test_cuda_model.py.
#define PYENGINE_KERNEL_MODEL
#include <limits>

#include "check.h"

#include "masked/sparse_cuda.cu"

using namespace pyengine::cuda;
using check::expect;

namespace {

struct Csr {
  std::vector<int32_t> rowptr;
  std::vector<int16_t> col16;
  std::vector<int32_t> col32;
  std::vector<float> values;
};

Csr csr_of(const std::vector<float>& w, int64_t n, int64_t k) {
  Csr c;
  c.rowptr.push_back(0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t j = 0; j < k; ++j)
      if (w[r * k + j] != 0.0f) {
        c.col16.push_back(static_cast<int16_t>(j));
        c.col32.push_back(static_cast<int32_t>(j));
        c.values.push_back(w[r * k + j]);
      }
    c.rowptr.push_back(static_cast<int32_t>(c.values.size()));
  }
  return c;
}

template <typename T>
void pack_case(const char* tname, int64_t n, int64_t k, std::mt19937& g) {
  const auto w = check::sparse_matrix(n, k, 0.2, g);
  const auto wt = check::convert<T>(w);
  const Csr ref = csr_of(w, n, k);
  std::vector<int32_t> counts(static_cast<size_t>(n), -1);
  bool ok = pack_count_rows(check::dtype_of<T>(), wt.data(), n, k, counts.data(), nullptr) == cudaSuccess;
  for (int64_t r = 0; r < n; ++r) ok = ok && counts[r] == ref.rowptr[r + 1] - ref.rowptr[r];
  const bool idx16 = k < 32768;
  std::vector<int16_t> c16(ref.values.size(), -1);
  std::vector<int32_t> c32(ref.values.size(), -1);
  std::vector<T> vals(ref.values.size(), check::from_float<T>(99.0f));
  ok = ok && pack_fill(check::dtype_of<T>(), wt.data(), n, k, ref.rowptr.data(), idx16 ? static_cast<void*>(c16.data()) : c32.data(),
                       idx16, vals.data(), nullptr) == cudaSuccess;
  for (size_t i = 0; i < ref.values.size(); ++i) {
    ok = ok && (idx16 ? c16[i] == ref.col16[i] : c32[i] == ref.col32[i]);
    ok = ok && check::to_float(vals[i]) == ref.values[i];
  }
  expect(ok, std::string("pack count + fill ") + tname + " n=" + std::to_string(n) + " k=" + std::to_string(k));
}

// sparse_linear_skinny in mode 1 (x staged in shared memory) or 2 (a transposed copy of x)
template <typename T>
void skinny_case(const char* tname, int64_t m, int64_t k, int64_t n, int mode, std::mt19937& g) {
  const auto w = check::sparse_matrix(n, k, 0.1, g);
  const auto x = check::small_ints(static_cast<size_t>(m * k), -1, 1, g);
  const auto b = check::small_ints(static_cast<size_t>(n), -3, 3, g);
  const Csr c = csr_of(w, n, k);
  const auto xt = check::convert<T>(x), vt = check::convert<T>(c.values), bt = check::convert<T>(b);
  std::vector<T> out(static_cast<size_t>(m * n), check::from_float<T>(-999.0f));
  int64_t scratch_elems = 0;
  sparse_skinny_plan(check::dtype_of<T>(), m, k, mode, &scratch_elems);
  std::vector<T> scratch(static_cast<size_t>(std::max<int64_t>(1, scratch_elems)));
  DeviceErrorRecord rec{};
  const bool idx16 = k < 32768;
  const cudaError_t err = sparse_linear_skinny(check::dtype_of<T>(), xt.data(), m, k, c.rowptr.data(),
                                               idx16 ? static_cast<const void*>(c.col16.data()) : c.col32.data(), idx16,
                                               vt.data(), static_cast<int64_t>(c.values.size()), bt.data(), out.data(), n, n,
                                               scratch_elems > 0 ? scratch.data() : nullptr, mode, &rec,
                                               nullptr);
  const int64_t bad = check::first_mismatch(out, check::linear(w, x, &b, m, k, n));
  expect(err == cudaSuccess && bad < 0 && rec.code == kDevErrNone,
         std::string("skinny ") + tname + " mode " + std::to_string(mode) + " m=" + std::to_string(m) + " k=" +
             std::to_string(k) + " n=" + std::to_string(n));
}

void spmm_case(int64_t m, int64_t k, int64_t n, std::mt19937& g) {
  const auto w = check::sparse_matrix(n, k, 0.05, g);
  const auto x = check::small_ints(static_cast<size_t>(m * k), -1, 1, g);
  const auto b = check::small_ints(static_cast<size_t>(n), -3, 3, g);
  const Csr c = csr_of(w, n, k);
  std::vector<float> out_t(static_cast<size_t>(n * m), -999.0f);
  DeviceErrorRecord rec{};
  const cudaError_t err = sparse_linear_spmm_t(DType::kFloat32, x.data(), m, k, c.rowptr.data(), c.col16.data(), true,
                                               c.values.data(), static_cast<int64_t>(c.values.size()), b.data(),
                                               out_t.data(), n, &rec, nullptr);
  const auto ref = check::linear(w, x, &b, m, k, n);
  bool same = err == cudaSuccess && rec.code == kDevErrNone;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) same = same && static_cast<double>(out_t[r * m + i]) == ref[i * n + r];
  expect(same, "spmm_t float32 m=" + std::to_string(m) + " k=" + std::to_string(k) + " n=" + std::to_string(n));
}

void densify_case(int64_t n, int64_t k, int64_t row0, int64_t rows, std::mt19937& g) {
  const auto w = check::sparse_matrix(n, k, 0.2, g);
  const Csr c = csr_of(w, n, k);
  std::vector<float> tile(static_cast<size_t>(rows * k), -5.0f);
  DeviceErrorRecord rec{};
  const cudaError_t err = sparse_densify_rows(DType::kFloat32, c.rowptr.data(), c.col32.data(), false, c.values.data(),
                                              static_cast<int64_t>(c.values.size()), row0, rows, n, k, tile.data(),
                                              &rec, nullptr);
  bool same = err == cudaSuccess && rec.code == kDevErrNone;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < k; ++j) same = same && tile[r * k + j] == w[(row0 + r) * k + j];
  expect(same, "densify rows [" + std::to_string(row0) + ", " + std::to_string(row0 + rows) + ") of " + std::to_string(n) +
                   " x " + std::to_string(k));
}

// A column index past k, and a decreasing row pointer: reported with the position, never read.
// The skinny product skips the bad entry exactly: column 0 of W is empty and x's column 0 and the
// bad entry's weight are infinite, so reading either (even with a zero factor) would give NaN.
void bad_index_cases(std::mt19937& g) {
  const int64_t m = 3, k = 500, n = 20;
  auto w = check::sparse_matrix(n, k, 0.1, g);
  for (int64_t r = 0; r < n; ++r) w[r * k] = 0.0f;
  const auto x_ref = check::small_ints(static_cast<size_t>(m * k), -1, 1, g);
  auto x = x_ref;  // the reference's column 0 stays finite: W's column 0 is empty
  for (int64_t i = 0; i < m; ++i) x[i * k] = std::numeric_limits<float>::infinity();
  Csr c = csr_of(w, n, k);
  std::vector<float> out(static_cast<size_t>(m * n));
  for (int mode : {0, 1, 2})
    for (int64_t mm : {m, int64_t(1)}) {  // m = 1 in mode 2: x read in place, no scratch
      Csr bad = c;
      bad.col16[7] = 20000;
      bad.values[7] = std::numeric_limits<float>::infinity();
      std::vector<float> w_skip = w;  // W without the bad entry
      int64_t row7 = 0;
      while (bad.rowptr[row7 + 1] <= 7) ++row7;
      w_skip[row7 * k + c.col16[7]] = 0.0f;
      int64_t se = 0;
      sparse_skinny_plan(DType::kFloat32, mm, k, mode, &se);
      std::vector<float> scratch(static_cast<size_t>(se), std::numeric_limits<float>::quiet_NaN());  // no zero left over
      DeviceErrorRecord rec{};
      sparse_linear_skinny(DType::kFloat32, x.data(), mm, k, bad.rowptr.data(), bad.col16.data(), true,
                           bad.values.data(), static_cast<int64_t>(bad.values.size()), nullptr, out.data(), n, n,
                           scratch.empty() ? nullptr : scratch.data(), mode, &rec, nullptr);
      const std::string what = "skinny mode " + std::to_string(mode) + " m=" + std::to_string(mm);
      expect(rec.code == kDevErrColidx && rec.position == 7 && rec.value == 20000 && rec.bound == k,
             what + " reports colidx 20000 at position 7");
      const std::vector<float> got(out.begin(), out.begin() + mm * n);
      expect(check::first_mismatch(got, check::linear(w_skip, x_ref, nullptr, mm, k, n)) < 0,
             what + " skips the bad entry exactly (no NaN from its infinite weight or x's column 0)");
    }
  // a last row pointer short of the stored entries (the CPU op raises "rowptr ends at"): every
  // path reports it rather than dropping the entries past it
  {
    Csr bad = c;
    bad.rowptr[n] -= 1;
    const int64_t nnz = static_cast<int64_t>(bad.values.size());
    for (int mode : {1, 2}) {
      DeviceErrorRecord rec{};
      sparse_linear_skinny(DType::kFloat32, x_ref.data(), m, k, bad.rowptr.data(), bad.col16.data(), true,
                           bad.values.data(), nnz, nullptr, out.data(), n, n,
                           nullptr, 1, &rec, nullptr);
      expect(rec.code == kDevErrRowptrEnd && rec.value == nnz - 1 && rec.bound == nnz,
             "skinny reports a last row pointer short of the entries (mode " + std::to_string(mode) + ")");
    }
    const auto x40 = check::small_ints(static_cast<size_t>(40 * k), -1, 1, g);
    std::vector<float> out_t(static_cast<size_t>(n * 40));
    DeviceErrorRecord rec{};
    sparse_linear_spmm_t(DType::kFloat32, x40.data(), 40, k, bad.rowptr.data(), bad.col16.data(), true, bad.values.data(),
                         nnz, nullptr, out_t.data(), n, &rec, nullptr);
    expect(rec.code == kDevErrRowptrEnd && rec.value == nnz - 1, "spmm_t reports a last row pointer short of the entries");
    std::vector<float> tile(static_cast<size_t>(4 * k));
    DeviceErrorRecord rec2{};
    sparse_densify_rows(DType::kFloat32, bad.rowptr.data(), bad.col16.data(), true, bad.values.data(), nnz, n - 4, 4, n, k,
                        tile.data(), &rec2, nullptr);
    expect(rec2.code == kDevErrRowptrEnd && rec2.value == nnz - 1, "densify reports a last row pointer short of the entries");
    DeviceErrorRecord rec3{};  // tiles that do not hold the last row cannot see it, and report nothing
    sparse_densify_rows(DType::kFloat32, c.rowptr.data(), c.col16.data(), true, c.values.data(),
                        static_cast<int64_t>(c.values.size()), 0, 4, n, k, tile.data(), &rec3, nullptr);
    expect(rec3.code == kDevErrNone, "densify of valid rows reports nothing");
  }
  // columns out of ascending order within a row: the float32 SpMM takes x in chunks of 64 columns
  // and needs them ascending; an order that would change its product is reported. Row 0 holds
  // columns 100, 3 (a later chunk's column first: caught in the first chunk's ballot); row 1 holds
  // 5, 2 (one chunk: consumed correctly, not reported). Then a row of columns 64..103 followed by
  // column 3, 40 entries later (caught as a column of an earlier chunk).
  {
    Csr u;
    u.rowptr = {0, 2, 4};
    u.col16 = {100, 3, 5, 2};
    u.values = {1.0f, 2.0f, 3.0f, 4.0f};
    const int64_t un = 2, uk = 128, um = 40;
    std::vector<float> ux(static_cast<size_t>(um * uk));
    for (int64_t i = 0; i < um; ++i)
      for (int64_t j = 0; j < uk; ++j) ux[i * uk + j] = static_cast<float>(j);
    std::vector<float> out_t(static_cast<size_t>(un * um), -1.0f);
    DeviceErrorRecord rec{};
    sparse_linear_spmm_t(DType::kFloat32, ux.data(), um, uk, u.rowptr.data(), u.col16.data(), true, u.values.data(), 4,
                         nullptr, out_t.data(), un, &rec, nullptr);
    expect(rec.code == kDevErrColOrder && rec.position == 1 && rec.value == 3,
           "spmm_t reports a column out of ascending order (position 1, column 3)");
    Csr far;
    far.rowptr = {0, 41};
    for (int j = 0; j < 40; ++j) far.col16.push_back(static_cast<int16_t>(64 + j));
    far.col16.push_back(3);
    far.values.assign(41, 1.0f);
    DeviceErrorRecord rec3{};
    sparse_linear_spmm_t(DType::kFloat32, ux.data(), um, uk, far.rowptr.data(), far.col16.data(), true, far.values.data(),
                         41, nullptr, out_t.data(), 1, &rec3, nullptr);
    expect(rec3.code == kDevErrColOrder && rec3.position == 40 && rec3.value == 3,
           "spmm_t reports a column of an earlier chunk (position 40, column 3)");
    Csr s1;  // the same rows sorted: no report, the exact product
    s1.rowptr = {0, 2, 4};
    s1.col16 = {3, 100, 2, 5};
    s1.values = {2.0f, 1.0f, 4.0f, 3.0f};
    DeviceErrorRecord rec2{};
    sparse_linear_spmm_t(DType::kFloat32, ux.data(), um, uk, s1.rowptr.data(), s1.col16.data(), true, s1.values.data(), 4,
                         nullptr, out_t.data(), un, &rec2, nullptr);
    expect(rec2.code == kDevErrNone && out_t[0] == 106.0f && out_t[static_cast<size_t>(um)] == 23.0f,
           "spmm_t: sorted rows give the exact product and no report");
  }
  {
    Csr bad = c;
    bad.rowptr[4] = bad.rowptr[3] - 1;
    DeviceErrorRecord rec{};
    std::vector<float> out_t(static_cast<size_t>(n * 40));
    const auto x40 = check::small_ints(static_cast<size_t>(40 * k), -1, 1, g);
    sparse_linear_spmm_t(DType::kFloat32, x40.data(), 40, k, bad.rowptr.data(), bad.col16.data(), true, bad.values.data(),
                         static_cast<int64_t>(bad.values.size()), nullptr, out_t.data(), n, &rec, nullptr);
    expect(rec.code == kDevErrRowptrOrder, "spmm_t reports a decreasing row pointer");
  }
}

// The skinny kernel's reach on a device with 64 KB of opt-in shared memory (a T4; the plan of
// model device 7, whose attributes are read fresh): 20 float32 rows of 20000 columns do not fit
// (80 KB per row), so sparse_skinny_plan sends the glue to another path; 16 rows do (the
// transposed copy) and 20 rows of 4000 columns do (staged). On the H100-like device 0 all do.
void small_smem_case() {
  const int saved = model::smem_optin;
  model::smem_optin = 64 * 1024;
  expect(!skinny_plan(20, 20000, 4, 0, true, 7).ok, "T4: 20 rows of 20000 float32 are not for the skinny kernel");
  expect(skinny_plan(16, 20000, 4, 0, true, 7).ok, "T4: 16 rows of 20000 float32 are (transposed copy)");
  expect(skinny_plan(20, 4000, 4, 0, true, 7).ok, "T4: 20 rows of 4000 float32 are (staged)");
  model::smem_optin = saved;
  int64_t se = -1;
  expect(sparse_skinny_plan(DType::kFloat32, 20, 20000, 0, &se), "H100: 20 rows of 20000 float32 are (staged)");
  expect(!sparse_skinny_plan(DType::kFloat32, 65, 100, 0, &se), "more than 64 rows are not for the skinny kernel");
}

}  // namespace

int main() {
  std::mt19937 g(11);
  if (check::quick()) {  // every kernel and x-staging path once, small
    pack_case<float>("fp32", 10, 300, g);
    for (int mode : {1, 2}) skinny_case<__nv_bfloat16>("bf16", 3, 300, 20, mode, g);
    skinny_case<__nv_bfloat16>("bf16", 1, 300, 20, 2, g);  // one row of x, read in place
    skinny_case<float>("fp32", 20, 100, 20, 1, g);  // more than 16 rows: chunks
    spmm_case(40, 64, 17, g);
    densify_case(20, 100, 0, 20, g);
    return check::finish();
  }
  pack_case<float>("fp32", 37, 300, g);
  pack_case<__nv_bfloat16>("bf16", 20, 1000, g);
  pack_case<double>("fp64", 9, 40000, g);  // int32 column indices
  for (int mode : {1, 2}) {
    for (int64_t m : {1, 3, 16}) {
      skinny_case<__nv_bfloat16>("bf16", m, 1000, 40, mode, g);
      skinny_case<float>("fp32", m, 300, 33, mode, g);
    }
    skinny_case<__half>("fp16", 5, 40000, 9, mode, g);  // int32 column indices
    // rows of ~400 and ~800 entries: lanes with one and with two groups per pass, two passes,
    // head and tail entries (the one-round-trip load order of the skinny kernel)
    skinny_case<__nv_bfloat16>("bf16", 1, 2000, 24, mode, g);
    skinny_case<__nv_bfloat16>("bf16", 16, 4096, 12, mode, g);
    skinny_case<float>("fp32", 2, 4096, 12, mode, g);
  }
  skinny_case<__nv_bfloat16>("bf16", 40, 300, 20, 1, g);  // more than 16 rows: x staged in chunks
  skinny_case<double>("fp64", 7, 200, 20, 1, g);
  spmm_case(40, 700, 50, g);
  spmm_case(100, 64, 17, g);
  densify_case(40, 300, 0, 40, g);
  densify_case(50, 130, 16, 24, g);
  bad_index_cases(g);
  small_smem_case();
  return check::finish();
}

// Runs the bitmap-tile launchers and kernels of csrc/masked/bitmap_cuda.cu in the CPU model of the
// CUDA execution model (model.h) and checks them against a plain product and an independent packing.
// Built and run by tests/test_cuda_model.py (AddressSanitizer + UBSan). Prints one line per case
// and "all ok" at the end; exits non-zero on the first mismatch.
#define PYENGINE_KERNEL_MODEL
#include "check.h"

#include "masked/bitmap_cuda.cu"

#include <cstdlib>


using namespace pyengine::cuda;

namespace {

using check::convert;
using check::expect;
using check::from_float;
using check::sparse_matrix;

struct Tiles {
  std::vector<int32_t> bitmap, offsets;
  std::vector<float> values;
};

// The format written out directly from its definition (masked/bitmap_kernels.h).
Tiles pack(const std::vector<float>& w, int64_t n, int64_t k) {
  Tiles t;
  const int64_t nt = (n + 15) / 16, kt = (k + 63) / 64;
  t.offsets.push_back(0);
  for (int64_t rt = 0; rt < nt; ++rt)
    for (int64_t ct = 0; ct < kt; ++ct) {
      for (int r = 0; r < 16; ++r)
        for (int h = 0; h < 2; ++h) {
          uint32_t word = 0;
          for (int j = 0; j < 32; ++j) {
            const int64_t row = rt * 16 + r, col = ct * 64 + 32 * h + j;
            if (row < n && col < k && w[row * k + col] != 0.0f) {
              word |= 1u << j;
              t.values.push_back(w[row * k + col]);
            }
          }
          t.bitmap.push_back(static_cast<int32_t>(word));
        }
      t.offsets.push_back(static_cast<int32_t>(t.values.size()));
    }
  return t;
}

// sparse_linear_bitmap_mma, the launcher the torch glue calls; returns out (m, n) as float.
template <typename T>
std::vector<float> run_mma(const std::vector<float>& x, int64_t m, int64_t k, const Tiles& t, const std::vector<int32_t>& offsets,
                           const std::vector<float>* bias, int64_t n, DeviceErrorRecord* rec) {
  const auto xt = convert<T>(x);
  const auto vt = convert<T>(t.values);
  const auto bt = bias ? convert<T>(*bias) : std::vector<T>();
  std::vector<T> out(static_cast<size_t>(m * n), from_float<T>(-12345.0f));
  const cudaError_t err = sparse_linear_bitmap_mma(check::dtype_of<T>(), xt.data(), m, k, t.bitmap.data(), offsets.data(),
                                                   vt.data(), static_cast<int64_t>(t.values.size()),
                                                   bias ? bt.data() : nullptr, out.data(), n, n, rec, nullptr);
  if (err != cudaSuccess) model::fail("sparse_linear_bitmap_mma returned an error");
  std::vector<float> res;
  for (T v : out) res.push_back(model::to_float_any(v));
  return res;
}

template <typename T>
void product_case(const char* tname, int64_t m, int64_t k, int64_t n, double density, bool with_bias, std::mt19937& g) {
  const auto w = sparse_matrix(n, k, density, g);
  std::uniform_int_distribution<int> xv(-1, 1);
  std::vector<float> x(static_cast<size_t>(m * k)), b(static_cast<size_t>(n));
  for (auto& e : x) e = static_cast<float>(xv(g));
  for (auto& e : b) e = static_cast<float>(xv(g) * 3);
  const Tiles t = pack(w, n, k);
  DeviceErrorRecord rec{};
  const auto y = run_mma<T>(x, m, k, t, t.offsets, with_bias ? &b : nullptr, n, &rec);
  const auto ref = check::linear(w, x, with_bias ? &b : nullptr, m, k, n);
  int64_t bad = -1;
  for (size_t i = 0; i < ref.size(); ++i)
    if (static_cast<double>(y[i]) != ref[i]) {
      bad = static_cast<int64_t>(i);
      break;
    }
  char what[200];
  std::snprintf(what, sizeof(what), "mma %s m=%lld k=%lld n=%lld density=%.2f bias=%d%s", tname, (long long)m, (long long)k,
                (long long)n, density, int(with_bias), bad >= 0 ? " (mismatch)" : "");
  expect(bad < 0 && rec.code == kDevErrNone, what);
  if (bad >= 0)
    std::printf("     first mismatch at out[%lld][%lld]: %g, expected %g\n", (long long)(bad / n), (long long)(bad % n),
                y[bad], ref[bad]);
}

// Random shapes and densities (fp16: its 11-bit significand holds these exact sums).
void fuzz_cases(const char* tname, std::mt19937& g) {
  std::uniform_int_distribution<int64_t> dm(1, 20), dk(1, 5000), dn(1, 80);
  const double densities[] = {0.02, 0.1, 0.3, 0.7, 1.0};
  std::uniform_int_distribution<int> dd(0, 4), db(0, 1);
  for (int i = 0; i < 8; ++i) {
    const int64_t m = dm(g), k = dk(g), n = dn(g);
    const double density = densities[dd(g)];
    product_case<__half>(tname, m, k, n, density, db(g) == 1, g);
  }
}

// A corrupt tile is reported (with the tile and the values the CPU check would print) and its
// values are never read; every other tile still counts.
void bad_tile_cases(std::mt19937& g) {
  const int64_t m = 3, k = 300, n = 40;
  const auto w = sparse_matrix(n, k, 0.2, g);
  std::vector<float> x(static_cast<size_t>(m * k), 1.0f);
  const Tiles t = pack(w, n, k);
  const int64_t tiles = static_cast<int64_t>(t.offsets.size()) - 1;
  {
    auto off = t.offsets;
    off[tiles] += 1000;  // the last tile runs past the values
    DeviceErrorRecord rec{};
    run_mma<__nv_bfloat16>(x, m, k, t, off, nullptr, n, &rec);
    expect(rec.code == kDevErrTileRange && rec.op == kOpSparseLinearBitmap && rec.position == tiles - 1 &&
               rec.value == off[tiles - 1] && rec.bound == off[tiles],
           "mma reports offsets past the values as a range error of the last tile");
  }
  {
    auto off = t.offsets;
    off[3] += 1;  // tiles 2 and 3 no longer hold their bits' values
    DeviceErrorRecord rec{};
    run_mma<__half>(x, m, k, t, off, nullptr, n, &rec);
    expect(rec.code == kDevErrTileCount && (rec.position == 2 || rec.position == 3), "mma reports a count mismatch");
  }
}

void densify_case(int64_t n, int64_t k, int64_t row0, int64_t nrows, std::mt19937& g) {
  const auto w = sparse_matrix(n, k, 0.15, g);
  const Tiles t = pack(w, n, k);
  std::vector<float> tile(static_cast<size_t>(nrows * k), -7.0f);
  DeviceErrorRecord rec{};
  const cudaError_t err = bitmap_densify_rows(DType::kFloat32, t.bitmap.data(), t.offsets.data(), t.values.data(),
                                              static_cast<int64_t>(t.values.size()), n, k, row0, nrows, tile.data(), &rec,
                                              nullptr);
  if (err != cudaSuccess) model::fail("bitmap_densify_rows returned an error");
  bool same = rec.code == kDevErrNone;
  for (int64_t r = 0; r < nrows && row0 + r < n; ++r)
    for (int64_t c = 0; c < k; ++c) same = same && tile[r * k + c] == w[(row0 + r) * k + c];
  char what[160];
  std::snprintf(what, sizeof(what), "densify n=%lld k=%lld rows [%lld, %lld)", (long long)n, (long long)k, (long long)row0,
                (long long)(row0 + nrows));
  expect(same, what);
}

}  // namespace

// An image older than compute capability 8.0 (PTX JIT-compiled for a newer card) has an empty
// product kernel: the launcher refuses it, launching nothing, before its first launch on a device.
void old_image_case(std::mt19937& g) {
  const int64_t m = 2, k = 64, n = 16;
  const Tiles t = pack(sparse_matrix(n, k, 0.5, g), n, k);
  const std::vector<__half> x(static_cast<size_t>(m * k), from_float<__half>(1.0f));
  std::vector<__half> out(static_cast<size_t>(m * n), from_float<__half>(-7.0f));
  const auto v = convert<__half>(t.values);
  DeviceErrorRecord rec{};
  model::ptx_version = 75;
  const cudaError_t err = sparse_linear_bitmap_mma(check::dtype_of<__half>(), x.data(), m, k, t.bitmap.data(),
                                                   t.offsets.data(), v.data(), static_cast<int64_t>(v.size()), nullptr,
                                                   out.data(), n, n, &rec, nullptr);
  model::ptx_version = 90;
  check::expect(err == cudaErrorInvalidDeviceFunction, "an image older than sm_80 is refused");
  bool untouched = true;
  for (__half v : out) untouched &= model::to_float_any(v) == -7.0f;
  check::expect(untouched, "nothing launched for an image older than sm_80");
}

int main() {
  std::mt19937 g(7);
  old_image_case(g);  // first: the launcher checks the image once per device
  // shapes: one column tile and a partial one; k not a multiple of 8 (element-wise x loads);
  // more column tiles than 16 warps (a warp takes several: the prefetch path); more than 16 and
  // than 64 rows of x (grid.y); partial row tiles; an empty matrix; a full one
  const int64_t shapes[][3] = {{1, 64, 16}, {1, 300, 40}, {5, 37, 20}, {16, 1100, 48}, {17, 200, 33},
                               {64, 130, 17}, {3, 520, 1}, {2, 64, 16}};
  if (check::quick()) {  // each path once: one and several tiles per warp, chunks of x rows
    product_case<__nv_bfloat16>("bf16", 1, 300, 40, 0.1, true, g);
    product_case<__half>("fp16", 17, 1100, 20, 0.3, false, g);
    product_case<__half>("fp16", 2, 5000, 20, 0.6, true, g);
    bad_tile_cases(g);
    setenv("PYENGINE_BITMAP_ROW_TILES", "2", 1);  // two row tiles per block sharing each x slice
    product_case<__nv_bfloat16>("bf16 2 row tiles", 17, 1100, 40, 0.1, true, g);
    bad_tile_cases(g);
    unsetenv("PYENGINE_BITMAP_ROW_TILES");
    densify_case(40, 300, 0, 40, g);
    return check::finish();
  }
  for (const auto& s : shapes) {
    product_case<__nv_bfloat16>("bf16", s[0], s[1], s[2], 0.1, true, g);
    product_case<__half>("fp16", s[0], s[1], s[2], 0.3, false, g);
  }
  // a warp's column tiles in groups: k = 4100 and 5000 give warps 4 or 5 tiles (two groups); the
  // densities cut groups short where the values overflow the warp's buffer (0.3: three tiles a
  // group, 0.6 and 1.0: one). bf16 stays at low densities: its 8-bit significand cannot hold the
  // exact sums of the dense rows, which this check compares to
  for (double density : {0.1, 0.3, 0.6, 1.0}) product_case<__half>("fp16", 16, 4100, 17, density, false, g);
  for (double density : {0.1, 0.3}) product_case<__nv_bfloat16>("bf16", 2, 5000, 20, density, true, g);
  fuzz_cases("fp16", g);
  product_case<__nv_bfloat16>("bf16", 4, 200, 40, 0.0, true, g);
  product_case<__half>("fp16", 4, 128, 32, 1.0, true, g);
  bad_tile_cases(g);
  // the build with two row tiles per block: an odd number of row tiles (the last block has one),
  // rows past n inside a tile, groups cut short, several chunks of x rows, corrupt tiles
  setenv("PYENGINE_BITMAP_ROW_TILES", "2", 1);
  for (const auto& s : shapes) product_case<__nv_bfloat16>("bf16 2 row tiles", s[0], s[1], s[2], 0.1, true, g);
  fuzz_cases("fp16 2 row tiles", g);
  for (double density : {0.1, 0.3, 0.6, 1.0}) product_case<__half>("fp16 2 row tiles", 16, 4100, 40, density, false, g);
  product_case<__half>("fp16 2 row tiles", 1, 5000, 33, 0.3, true, g);
  bad_tile_cases(g);
  unsetenv("PYENGINE_BITMAP_ROW_TILES");
  densify_case(40, 300, 0, 40, g);
  densify_case(100, 130, 32, 48, g);
  densify_case(50, 70, 48, 16, g);
  return check::finish();
}

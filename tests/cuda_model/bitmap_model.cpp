// Runs the bitmap-tile kernels of csrc/masked/bitmap_cuda.cu in the CPU model of the CUDA
// execution model (model.h) and checks them against a plain product and an independent packing.
// Built and run by tests/test_cuda_model.py (AddressSanitizer + UBSan). Prints one line per case
// and "all ok" at the end; exits non-zero on the first mismatch.
#define PYENGINE_KERNEL_MODEL
#include "model.h"

#include "masked/bitmap_cuda.cu"

#include <cmath>
#include <random>
#include <string>

using namespace pyengine::cuda;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// W (n, k) with small integer entries, so every product and sum below is exact in float32 and in
// the output type: the kernel's result must equal the reference exactly.
std::vector<float> sparse_matrix(int64_t n, int64_t k, double density, std::mt19937& g) {
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

template <typename T>
T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}
template <typename T>
std::vector<T> convert(const std::vector<float>& a) {
  std::vector<T> out;
  for (float x : a) out.push_back(from_float<T>(x));
  return out;
}

// One launch of bitmap_mma_kernel as bitmap_mma_t would make it; returns out (m, n) as float.
template <typename T>
std::vector<float> run_mma(const std::vector<float>& x, int64_t m, int64_t k, const Tiles& t, const std::vector<int32_t>& offsets,
                           const std::vector<float>* bias, int64_t n, DeviceErrorRecord* rec) {
  const auto xt = convert<T>(x);
  const auto vt = convert<T>(t.values);
  const auto bt = bias ? convert<T>(*bias) : std::vector<T>();
  std::vector<T> out(static_cast<size_t>(m * n), from_float<T>(-12345.0f));
  const int64_t nt = (n + 15) / 16, kt = (k + 63) / 64;
  const int warps = static_cast<int>(std::min<int64_t>(kMaxWarps, kt));
  const size_t smem = static_cast<size_t>(warps) * sizeof(WarpBuf<T>);
  const bool x_vec = detail::aligned_to(xt.data(), 16) && k % 8 == 0;
  const T* xp = xt.data();
  const T* vp = vt.data();
  const T* bp = bias ? bt.data() : nullptr;
  T* op = out.data();
  const auto* bm = reinterpret_cast<const uint32_t*>(t.bitmap.data());
  const int32_t* off = offsets.data();
  const int64_t nnz = static_cast<int64_t>(t.values.size());
  model::launch(dim3(static_cast<unsigned>(nt), static_cast<unsigned>((m + 15) / 16)), dim3(warps * 32), smem, [&] {
    bitmap_mma_kernel<T>(xp, m, k, bm, off, vp, nnz, bp, op, n, n, kt, x_vec, rec);
  });
  std::vector<float> res;
  for (T v : out) res.push_back(model::to_float_any(v));
  return res;
}

std::vector<double> reference(const std::vector<float>& w, const std::vector<float>& x, const std::vector<float>* bias,
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
  const auto ref = reference(w, x, with_bias ? &b : nullptr, m, k, n);
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

template <typename U>
void densify_case(int64_t n, int64_t k, int64_t row0, int64_t nrows, std::mt19937& g) {
  const auto w = sparse_matrix(n, k, 0.15, g);
  const Tiles t = pack(w, n, k);
  std::vector<float> tile(static_cast<size_t>(nrows * k), -7.0f);
  const int64_t kt = (k + 63) / 64;
  const int64_t warps = (nrows + 15) / 16 * kt;
  const unsigned grid = static_cast<unsigned>((warps * 32 + kDensifyThreads - 1) / kDensifyThreads);
  DeviceErrorRecord rec{};
  const auto* bm = reinterpret_cast<const uint32_t*>(t.bitmap.data());
  const auto* vals = reinterpret_cast<const uint32_t*>(t.values.data());
  auto* out = reinterpret_cast<uint32_t*>(tile.data());
  const int64_t nnz = static_cast<int64_t>(t.values.size());
  model::launch(dim3(grid), dim3(kDensifyThreads), 0, [&] {
    bitmap_densify_kernel<uint32_t>(bm, t.offsets.data(), vals, nnz, n, k, kt, row0, nrows, out, &rec);
  });
  bool same = rec.code == kDevErrNone;
  for (int64_t r = 0; r < nrows && row0 + r < n; ++r)
    for (int64_t c = 0; c < k; ++c) same = same && tile[r * k + c] == w[(row0 + r) * k + c];
  char what[160];
  std::snprintf(what, sizeof(what), "densify n=%lld k=%lld rows [%lld, %lld)", (long long)n, (long long)k, (long long)row0,
                (long long)(row0 + nrows));
  expect(same, what);
}

}  // namespace

int main() {
  std::mt19937 g(7);
  // shapes: one column tile and a partial one; k not a multiple of 8 (element-wise x loads);
  // more column tiles than 16 warps (a warp takes several: the prefetch path); more than 16 and
  // than 64 rows of x (grid.y); partial row tiles; an empty matrix; a full one
  const int64_t shapes[][3] = {{1, 64, 16}, {1, 300, 40}, {5, 37, 20}, {16, 1100, 48}, {17, 200, 33},
                               {64, 130, 17}, {3, 520, 1}, {2, 64, 16}};
  for (const auto& s : shapes) {
    product_case<__nv_bfloat16>("bf16", s[0], s[1], s[2], 0.1, true, g);
    product_case<__half>("fp16", s[0], s[1], s[2], 0.3, false, g);
  }
  product_case<__nv_bfloat16>("bf16", 4, 200, 40, 0.0, true, g);
  product_case<__half>("fp16", 4, 128, 32, 1.0, true, g);
  bad_tile_cases(g);
  densify_case<uint32_t>(40, 300, 0, 40, g);
  densify_case<uint32_t>(100, 130, 32, 48, g);
  densify_case<uint32_t>(50, 70, 48, 16, g);
  if (failures == 0) std::printf("all ok\n");
  return failures == 0 ? 0 : 1;
}

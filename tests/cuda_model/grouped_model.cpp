// Runs the launchers and kernels of csrc/sliced/sliced_grouped_cuda.cu (the grouped projections:
// partial products per chunk and their ordered sum with the block norms; the max's backward for
// all pairs) in the CPU model of the CUDA execution model (model.h), against plain loops; and
// checks that a bad winning direction is reported, never followed. Built and run by
// tests/test_cuda_model.py.
#define PYENGINE_KERNEL_MODEL
#include "check.h"

#include <cmath>

#include "sliced/sliced_grouped_cuda.cu"

using namespace pyengine::cuda;
using check::expect;

namespace {

struct Case {
  std::vector<int64_t> dims;
  int64_t K, n, pad;  // pad: extra columns of theta past the pairs' blocks (ldt = sum d + pad)
  int64_t ldt() const {
    int64_t D = pad;
    for (int64_t d : dims) D += d;
    return D;
  }
};

std::string name_of(const char* tname, const Case& c, bool normalize) {
  std::string s = std::string(tname) + " K=" + std::to_string(c.K) + " n=" + std::to_string(c.n) + " dims";
  for (int64_t d : c.dims) s += " " + std::to_string(d);
  return s + (normalize ? " normalized" : "");
}

// theta entries in {-2, -1, 1, 2} (a zero block for pair `zero_pair`), points in {-1, 0, 1}: every
// partial and total sum is an integer far below 2^24, so the unnormalised projections are exact.
template <typename T>
void project_case(const char* tname, const Case& c, bool normalize, int zero_pair, std::mt19937& g) {
  const int64_t G = static_cast<int64_t>(c.dims.size()), K = c.K, n = c.n;
  const int64_t ldt = c.ldt();
  std::vector<float> thf = check::small_ints(static_cast<size_t>(K * ldt), -2, 2, g);
  for (auto& v : thf)
    if (v == 0.0f) v = 1.0f;
  GroupedPairs pairs;
  pairs.G = static_cast<int32_t>(G);
  std::vector<std::vector<T>> zs(2 * G);
  int64_t col = 0;
  for (int64_t q = 0; q < G; ++q) {
    pairs.dim[q] = c.dims[q];
    pairs.col[q] = col;
    if (q == zero_pair)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < c.dims[q]; ++j) thf[k * ldt + col + j] = 0.0f;
    for (int t = 0; t < 2; ++t) {
      zs[t * G + q] = check::convert<T>(check::small_ints(static_cast<size_t>(n * c.dims[q]), -1, 1, g));
      pairs.z[t][q] = zs[t * G + q].data();
    }
    col += c.dims[q];
  }
  const std::vector<T> theta = check::convert<T>(thf);
  const size_t ws = sw_grouped_plan(check::dtype_of<T>(), pairs, K, n);
  std::vector<unsigned char> work(ws, 0xAB);
  std::vector<T> P(static_cast<size_t>(2 * K * G * n), T(-999));
  std::vector<T> scale(static_cast<size_t>(G * K), T(-999));
  const cudaError_t err = sw_grouped_project(check::dtype_of<T>(), pairs, theta.data(), ldt, K, n, normalize,
                                             work.data(), P.data(), normalize ? scale.data() : nullptr, nullptr);
  bool ok = err == cudaSuccess;
  const double tiny = std::is_same_v<T, float> ? 1.17549435082228750797e-38 : 2.22507385850720138309e-308;
  for (int64_t q = 0; q < G && ok; ++q)
    for (int64_t k = 0; k < K && ok; ++k) {
      double nn = 0.0;
      for (int64_t j = 0; j < c.dims[q]; ++j) nn += double(thf[k * ldt + pairs.col[q] + j]) * thf[k * ldt + pairs.col[q] + j];
      const double s = 1.0 / std::max(std::sqrt(nn), tiny);
      if (normalize) ok = ok && std::fabs(double(scale[q * K + k]) - s) <= 1e-6 * s;
      for (int t = 0; t < 2 && ok; ++t)
        for (int64_t i = 0; i < n && ok; ++i) {
          double want = 0.0;
          for (int64_t j = 0; j < c.dims[q]; ++j)
            want += double(thf[k * ldt + pairs.col[q] + j]) * double(check::to_float(zs[t * G + q][i * c.dims[q] + j]));
          const double got = double(P[((t * K + k) * G + q) * n + i]);
          if (normalize) {
            want *= s;
            ok = q == zero_pair ? got == 0.0 : std::fabs(got - want) <= 1e-6 * (1.0 + std::fabs(want));
          } else {
            ok = got == want;
          }
        }
    }
  expect(ok, "grouped projections " + name_of(tname, c, normalize) + " (" + std::to_string(pairs.chunk0[G]) +
                 " chunks of " + std::to_string(pairs.chunk) + ")");
}

// out[t][g][i, j] = c_t[g, i] * (grad[g] * scale[g, w]) * theta[w, col + j], in that order (exact
// against the same float operations); pair `bad` gets a winning direction out of range.
template <typename T>
void rank1_case(const char* tname, const Case& c, bool with_scale, int bad, std::mt19937& g) {
  const int64_t G = static_cast<int64_t>(c.dims.size()), K = c.K, n = c.n;
  const int64_t ldt = c.ldt();
  const std::vector<T> theta = check::convert<T>(check::small_ints(static_cast<size_t>(K * ldt), -3, 3, g));
  const std::vector<T> cx = check::convert<T>(check::small_ints(static_cast<size_t>(G * n), -4, 4, g));
  const std::vector<T> cy = check::convert<T>(check::small_ints(static_cast<size_t>(G * n), -4, 4, g));
  const std::vector<T> grad = check::convert<T>(check::small_ints(static_cast<size_t>(G), 1, 3, g));
  const std::vector<T> scale = check::convert<T>(check::small_ints(static_cast<size_t>(G * K), 1, 4, g));
  std::vector<int64_t> win(static_cast<size_t>(G));
  for (int64_t q = 0; q < G; ++q) win[q] = (q * 7 + 3) % K;
  if (bad >= 0) win[bad] = K + 2;
  GroupedPairs pairs;
  pairs.G = static_cast<int32_t>(G);
  GroupedGrads grads;
  std::vector<std::vector<T>> outs(2 * G);
  int64_t col = 0;
  for (int64_t q = 0; q < G; ++q) {
    pairs.dim[q] = c.dims[q];
    pairs.col[q] = col;
    col += c.dims[q];
    for (int t = 0; t < 2; ++t) {
      if (t == 1 && q == 0) continue;  // an output not asked for: left out
      outs[t * G + q].assign(static_cast<size_t>(n * c.dims[q]), T(-999));
      grads.out[t][q] = outs[t * G + q].data();
    }
  }
  DeviceErrorRecord rec{};
  const cudaError_t err = sw_grouped_rank1(check::dtype_of<T>(), pairs, grads, grad.data(), cx.data(), cy.data(),
                                           theta.data(), ldt, with_scale ? scale.data() : nullptr, win.data(), K, n,
                                           &rec, nullptr);
  bool ok = err == cudaSuccess;
  for (int64_t q = 0; q < G && ok; ++q)
    for (int t = 0; t < 2 && ok; ++t) {
      if (t == 1 && q == 0) continue;
      for (int64_t i = 0; i < n && ok; ++i)
        for (int64_t j = 0; j < c.dims[q] && ok; ++j) {
          T want = T(0);
          if (q != bad) {
            T f = grad[q];
            if (with_scale) f = f * scale[q * K + win[q]];
            const T a = (t == 0 ? cx : cy)[q * n + i] * f;
            want = a * theta[win[q] * ldt + pairs.col[q] + j];
          }
          ok = outs[t * G + q][i * c.dims[q] + j] == want;
        }
    }
  if (bad >= 0)
    ok = ok && rec.code == kDevErrWin && rec.op == kOpSlicedGrouped && rec.position == bad && rec.value == K + 2 &&
         rec.bound == K;
  else
    ok = ok && rec.code == kDevErrNone;
  expect(ok, "grouped max backward " + name_of(tname, c, with_scale) + (bad >= 0 ? " with a bad win" : ""));
}

}  // namespace

int main() {
  std::mt19937 g(11);
  // several chunks per pair (sum d > 4 x 512 on the model's 4 multiprocessors), a partial last
  // chunk and step, two direction tiles and two point tiles (partial), one pair, a padded theta
  const Case big{{1300, 700, 40}, 70, 70, 3};
  const Case small{{5, 33}, 3, 2, 0};
  const Case one{{2100}, 50, 9, 0};
  if (check::quick()) {
    project_case<float>("fp32", Case{{600, 40}, 20, 9, 1}, true, -1, g);
    rank1_case<float>("fp32", small, true, -1, g);
    return check::finish();
  }
  for (const Case& c : {big, small, one}) {
    project_case<float>("fp32", c, false, -1, g);
    project_case<double>("fp64", c, false, -1, g);
    project_case<float>("fp32", c, true, -1, g);
    project_case<double>("fp64", c, true, -1, g);
    rank1_case<float>("fp32", c, true, -1, g);
    rank1_case<double>("fp64", c, false, -1, g);
  }
  project_case<float>("fp32", big, true, 1, g);  // pair 1's block is zero: zero projections, not NaN
  rank1_case<float>("fp32", big, true, 2, g);
  rank1_case<double>("fp64", small, false, 0, g);
  return check::finish();
}

// CPU kernel: batched random-projection (max-)sliced Wasserstein distance.
// Projections are BLAS GEMMs tiled so that the result does not depend on the thread count
// (sliced_gemm_cpu.h); each (pair, direction) row is then sorted with its
// permutation (LSD radix sort on the float bits for float32), the |sorted difference|^p costs are
// reduced, and - when a gradient is wanted - d dist / d projection is written for the directions
// that matter (only the winner for the max), all in one parallel pass over the rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/buffer_pool.h"
#include "sliced/sliced_args.h"
#include "sliced/sliced_gemm_cpu.h"

#define PYENGINE_SIMD_KERNELS "sliced/sliced_simd.inc"
#include "common/simd.h"

namespace pyengine {
namespace {

inline uint32_t float_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Sorts v[0, n) ascending into sorted[], with perm[j] = original index of sorted[j].
// Scratch vectors are reused across calls by one thread.
// Short rows (n <= 32 points: small batches) use one comparison sort of (key, index) packed in 64
// bits - ties keep index order, as the radix sort does - since four 256-bucket histogram passes
// cost more than n log n compares there (measured: 2.5-5x faster at n = 8-32; from n = 64 on the
// radix sort is faster).
constexpr int64_t kShortRow = 32;

struct RowSorter {
  std::vector<uint32_t> k0, k1;
  std::vector<int32_t> i0, i1;
  std::vector<uint64_t> packed;

  void sort(const float* v, int64_t n, float* sorted, int32_t* perm) {
    if (n <= kShortRow) {
      packed.resize(n);
      for (int64_t i = 0; i < n; ++i) packed[i] = (uint64_t(float_key(v[i])) << 32) | uint64_t(uint32_t(i));
      std::sort(packed.begin(), packed.end());
      for (int64_t j = 0; j < n; ++j) {
        const int32_t i = int32_t(uint32_t(packed[j]));
        perm[j] = i;
        sorted[j] = v[i];
      }
      return;
    }
    k0.resize(n), k1.resize(n), i0.resize(n), i1.resize(n);
    for (int64_t i = 0; i < n; ++i) k0[i] = float_key(v[i]), i0[i] = int32_t(i);
    uint32_t* ks = k0.data();
    uint32_t* kd = k1.data();
    int32_t* is = i0.data();
    int32_t* id = i1.data();
    for (int shift = 0; shift < 32; shift += 8) {
      int64_t hist[256] = {0};
      for (int64_t i = 0; i < n; ++i) ++hist[(ks[i] >> shift) & 0xFF];
      if (hist[(ks[0] >> shift) & 0xFF] == n) continue;  // every key shares this digit
      int64_t sum = 0;
      for (int b = 0; b < 256; ++b) {
        const int64_t c = hist[b];
        hist[b] = sum;
        sum += c;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t pos = hist[(ks[i] >> shift) & 0xFF]++;
        kd[pos] = ks[i];
        id[pos] = is[i];
      }
      std::swap(ks, kd);
      std::swap(is, id);
    }
    for (int64_t j = 0; j < n; ++j) {
      perm[j] = is[j];
      sorted[j] = v[is[j]];
    }
  }

  void sort(const double* v, int64_t n, double* sorted, int32_t* perm) {
    std::iota(perm, perm + n, 0);
    std::stable_sort(perm, perm + n, [v](int32_t a, int32_t b) { return v[a] < v[b]; });
    for (int64_t j = 0; j < n; ++j) sorted[j] = v[perm[j]];
  }
};

// dS/dsx_j for one sorted pair (before the chain factor).
template <typename T>
inline double cost_grad(T a, T b, double p) {
  const double d = double(a) - double(b);
  if (d == 0) return 0.0;
  const double s = d > 0 ? 1.0 : -1.0;
  if (p == 1.0) return s;
  if (p == 2.0) return 2.0 * d;
  return p * std::pow(std::fabs(d), p - 1.0) * s;
}

template <typename T>
void sw_cpu(const T* px, const T* py, int64_t B, int64_t K, int64_t n, double p, bool use_max, bool need_grad,
            T* dist, T* cx, T* cy, int64_t* win) {
  // px, py: (B, K, n) projections. S: (B, K) costs. perms kept only for the gradient.
  std::vector<double> S(size_t(B * K));
  std::vector<int32_t> permx, permy;
  if (need_grad) permx.resize(size_t(B * K * n)), permy.resize(size_t(B * K * n));
  at::parallel_for(0, B * K, 1, [&](int64_t r0, int64_t r1) {
    RowSorter sorter;
    std::vector<T> sx(n), sy(n);
    std::vector<int32_t> tpx(n), tpy(n);
    for (int64_t r = r0; r < r1; ++r) {
      int32_t* qx = need_grad ? permx.data() + r * n : tpx.data();
      int32_t* qy = need_grad ? permy.data() + r * n : tpy.data();
      sorter.sort(px + r * n, n, sx.data(), qx);
      sorter.sort(py + r * n, n, sy.data(), qy);
      S[r] = PYENGINE_SIMD(sw_cost(sx.data(), sy.data(), n, p));
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    const double* s = S.data() + b * K;
    double red;
    int64_t arg = 0;
    if (use_max) {
      // NaN in any direction wins (the first NaN), as torch.max does in the reference
      for (int64_t k = 1; k < K && !std::isnan(s[arg]); ++k)
        if (s[k] > s[arg] || std::isnan(s[k])) arg = k;
      red = s[arg];
    } else {
      red = std::accumulate(s, s + K, 0.0) / double(K);
    }
    dist[b] = T(std::pow(red, 1.0 / p));
    if (!need_grad) continue;
    // d dist / d S_k (0 where the reduced cost is 0: the derivative of t^(1/p) is unbounded there).
    const double chain = red > 0 ? std::pow(red, 1.0 / p - 1.0) / p / (use_max ? 1.0 : double(K)) / double(n) : 0.0;
    if (use_max) win[b] = arg;
    const int64_t kg = use_max ? 1 : K;
    const int64_t k_begin = use_max ? arg : 0, k_end = use_max ? arg + 1 : K;
    at::parallel_for(k_begin, k_end, 1, [&](int64_t ka, int64_t kb) {
      for (int64_t k = ka; k < kb; ++k) {
        const int64_t r = b * K + k;
        const int32_t* qx = permx.data() + r * n;
        const int32_t* qy = permy.data() + r * n;
        const T* rx = px + r * n;
        const T* ry = py + r * n;
        const int64_t kk = use_max ? 0 : k;
        T* ox = cx + b * n * kg + kk;
        T* oy = cy + b * n * kg + kk;
        for (int64_t j = 0; j < n; ++j) {
          const double g = chain * cost_grad(rx[qx[j]], ry[qy[j]], p);
          ox[int64_t(qx[j]) * kg] = T(g);
          oy[int64_t(qy[j]) * kg] = T(-g);
        }
      }
    });
  }
}

// theta (K, d) x (B, n, d) for x and y -> (B, K, n) each: every direction's projections contiguous.
// The products are tiled by their shapes only (sliced_gemm_cpu.h): when the reduction dimension d
// dominates (LaCoOT flattens whole feature maps: d = C*H*W) its pieces - which BLAS would keep on
// one thread - are shared by the threads, and the result is the same on any number of them.
std::pair<at::Tensor, at::Tensor> project(const at::Tensor& theta_in, const at::Tensor& x_in, const at::Tensor& y_in) {
  // below autograd already; detached views let the out= products run on inputs that require grad
  const at::Tensor theta = theta_in.detach(), x = x_in.detach(), y = y_in.detach();
  const int64_t B = x.size(0), n = x.size(1), K = theta.size(0);
  at::Tensor px = at::empty({B, K, n}, x.options()), py = at::empty({B, K, n}, x.options());
  std::vector<OrderedMM> mms;
  mms.reserve(2 * B);
  for (int64_t b = 0; b < B; ++b) {
    mms.push_back({px[b], theta, x[b].t()});
    mms.push_back({py[b], theta, y[b].t()});
  }
  ordered_mm_cpu(mms);
  return {px, py};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sliced_wasserstein_fwd_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& theta, double p, bool use_max, bool need_grad) {
  check_sw_fwd(OpChecks{"sliced_wasserstein_fwd"}, x, y, theta, p);
  // never autocast's reduced precision: under torch.autocast the projection GEMM came back in
  // bfloat16 / float16 and the float32 kernel refused it ("expected scalar type Float")
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = x.size(0), n = x.size(1), K = theta.size(0);
  if (B == 0) {
    const auto o = x.options();
    const std::vector<int64_t> cshape = need_grad ? std::vector<int64_t>{0, n, use_max ? 1 : K} : std::vector<int64_t>{0};
    return {at::empty({0}, o), at::empty(cshape, o), at::empty(cshape, o), at::empty({0}, o.dtype(at::kLong))};
  }
  auto [px, py] = project(theta, x, y);
  auto dist = at::empty({B}, x.options());
  const int64_t kg = use_max ? 1 : K;
  at::Tensor cx = need_grad ? at::zeros({B, n, kg}, x.options()) : at::empty({0}, x.options());
  at::Tensor cy = need_grad ? at::zeros({B, n, kg}, x.options()) : at::empty({0}, x.options());
  at::Tensor win = (need_grad && use_max) ? at::zeros({B}, x.options().dtype(at::kLong))
                                          : at::empty({0}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sliced_wasserstein_cpu", [&] {
    sw_cpu<scalar_t>(px.data_ptr<scalar_t>(), py.data_ptr<scalar_t>(), B, K, n, p, use_max, need_grad,
                     dist.data_ptr<scalar_t>(), need_grad ? cx.data_ptr<scalar_t>() : nullptr,
                     need_grad ? cy.data_ptr<scalar_t>() : nullptr,
                     (need_grad && use_max) ? win.data_ptr<int64_t>() : nullptr);
  });
  return {dist, cx, cy, win};
}

// Gradients to the point sets: gx[b] = g[b] * cx[b] @ theta (the mean), which for the max - cx
// holding only the winning direction's column - is the rank-1 product g[b] * cx[b] (x) theta[win[b]].
// The (B, n, d) outputs are the only large memory the step touches; they come from the reuse pool
// (buffer_pool.h) and the rank-1 case writes both in one parallel pass over the rows.
std::tuple<at::Tensor, at::Tensor> sliced_wasserstein_bwd_cpu(const at::Tensor& grad, const at::Tensor& cx,
                                                              const at::Tensor& cy, const at::Tensor& theta_in,
                                                              const at::Tensor& win, bool use_max, bool need_x,
                                                              bool need_y) {
  const OpChecks op{"sliced_wasserstein_bwd"};
  check_sw_bwd(op, grad, cx, cy, theta_in, win, use_max);
  const int64_t B = cx.size(0), n = cx.size(1), K = theta_in.size(0), d = theta_in.size(1);
  const auto opts = theta_in.options();
  at::Tensor gx = need_x ? pooled_empty_cpu({B, n, d}, opts) : at::empty({0}, opts);
  at::Tensor gy = need_y ? pooled_empty_cpu({B, n, d}, opts) : at::empty({0}, opts);
  if (B * n * d == 0 || !(need_x || need_y)) return {gx, gy};
  const at::Tensor theta = theta_in.contiguous();
  // per-row scales (B, n, k): tiny next to the outputs
  const at::Tensor sx = (cx * grad.view({B, 1, 1})).contiguous();
  const at::Tensor sy = (cy * grad.view({B, 1, 1})).contiguous();
  if (!use_max) {  // every pair shares theta: one (B n, K) x (K, d) product per output, tiled as the
                   // projections are (with many directions BLAS would split the sum over K by thread count)
    std::vector<OrderedMM> mms;
    if (need_x) mms.push_back({gx.view({B * n, d}), sx.view({B * n, K}), theta});
    if (need_y) mms.push_back({gy.view({B * n, d}), sy.view({B * n, K}), theta});
    ordered_mm_cpu(mms);
    return {gx, gy};
  }
  const at::Tensor w = win.contiguous();
  const int64_t* wp = w.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    if (wp[b] < 0 || wp[b] >= K) op.value_error("win[", b, "] = ", wp[b], " is not a direction (there are ", K, ")");
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "sliced_wasserstein_bwd_cpu", [&] {
    const scalar_t* th = theta.data_ptr<scalar_t>();
    const scalar_t* ax = sx.data_ptr<scalar_t>();
    const scalar_t* ay = sy.data_ptr<scalar_t>();
    scalar_t* ox = need_x ? gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* oy = need_y ? gy.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B * n, std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* t = th + wp[r / n] * d;
        const scalar_t a = ax[r], c = ay[r];
        scalar_t* __restrict__ u = ox ? ox + r * d : nullptr;
        scalar_t* __restrict__ v = oy ? oy + r * d : nullptr;
        if (u && v) {
          for (int64_t j = 0; j < d; ++j) {
            u[j] = a * t[j];
            v[j] = c * t[j];
          }
        } else if (u) {
          for (int64_t j = 0; j < d; ++j) u[j] = a * t[j];
        } else {
          for (int64_t j = 0; j < d; ++j) v[j] = c * t[j];
        }
      }
    });
  });
  return {gx, gy};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("sliced_wasserstein_fwd", &sliced_wasserstein_fwd_cpu);
  m.impl("sliced_wasserstein_bwd", &sliced_wasserstein_bwd_cpu);
}

}  // namespace pyengine

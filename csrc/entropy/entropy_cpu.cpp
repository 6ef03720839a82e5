// CPU kernels: per-neuron ON counts of activations (fresh, accumulated in place, or fused with
// the ReLU), and entropy from counts. One pass over the tensor; comparisons on fp16/bf16 are
// done on the raw bits so the loops vectorise as integer compares.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "common/dtype.h"
#include "entropy/entropy_args.h"

#define PYENGINE_SIMD_KERNELS "entropy/entropy_simd.inc"
#include "common/simd.h"

namespace pyengine {
namespace {

// Classifies one element: on(v) is 1 when ON (> 0, or >= 0 when inclusive), nan(v) is 1 for NaN.
template <typename T>
struct FloatClass {
  using raw = T;
  static inline int on(raw v, bool inclusive) { return inclusive ? (v >= 0) : (v > 0); }
  static inline int nan(raw v) { return v != v; }
};

// Half-precision formats on raw bits: positive numbers (and +inf) are 0x0001..inf_bits,
// NaNs are > inf_bits in the low 15 bits. -0 (0x8000) is >= 0.
template <uint16_t kInfBits>
struct HalfBitsClass {
  using raw = uint16_t;
  static inline int on(raw v, bool inclusive) {
    return inclusive ? (v <= kInfBits || v == 0x8000) : (v != 0 && v <= kInfBits);
  }
  static inline int nan(raw v) { return (v & 0x7FFF) > kInfBits; }
};

using HalfClass = HalfBitsClass<cuda::kFloat16InfBits>;
using BF16Class = HalfBitsClass<cuda::kBFloat16InfBits>;

// x is a contiguous (O, C, I) block; counts[c] += #ON over (o, i).
template <typename Cls, bool kInclusive>
void count_block(const typename Cls::raw* x, int64_t O, int64_t C, int64_t I, int64_t* counts,
                 int64_t* nan_total) {
  std::mutex mu;
  if (I == 1) {
    // Row mode: O rows of C contiguous neurons (channels-last, (B, T, C), per-position).
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(C, 1));
    at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
      std::vector<int64_t> local(C, 0);
      std::vector<int32_t> acc(C, 0);
      int64_t nan_local = 0;
      for (int64_t ob = o0; ob < o1; ob += (1 << 30)) {  // int32 accumulators never overflow
        const int64_t oe = std::min<int64_t>(o1, ob + (1 << 30));
        std::fill(acc.begin(), acc.end(), 0);
        nan_local += PYENGINE_SIMD(count_rows<Cls, kInclusive>(x, ob, oe, C, acc.data()));
        for (int64_t c = 0; c < C; ++c) local[c] += acc[c];
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t c = 0; c < C; ++c) counts[c] += local[c];
      *nan_total += nan_local;
    });
  } else {
    // Plane mode: O*C contiguous planes of I elements (NCHW per channel).
    const int64_t planes = O * C;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / I);
    at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
      std::vector<int64_t> local(C, 0);
      int64_t nan_local = 0;
      for (int64_t pl = p0; pl < p1; ++pl) {
        const auto* src = x + pl * I;
        int64_t cnt = 0;
        for (int64_t ib = 0; ib < I; ib += (1 << 30)) {
          const int64_t len = std::min<int64_t>(I - ib, 1 << 30);
          cnt += PYENGINE_SIMD(count_plane<Cls, kInclusive>(src + ib, len, &nan_local));
        }
        local[pl % C] += cnt;
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t c = 0; c < C; ++c) counts[c] += local[c];
      *nan_total += nan_local;
    });
  }
}

template <typename Cls>
void count_dispatch(const void* x, int64_t O, int64_t C, int64_t I, bool inclusive, int64_t* counts,
                    int64_t* nan_total) {
  auto* p = static_cast<const typename Cls::raw*>(x);
  if (inclusive)
    count_block<Cls, true>(p, O, C, I, counts, nan_total);
  else
    count_block<Cls, false>(p, O, C, I, counts, nan_total);
}

void count_any(const at::Tensor& xc, int64_t O, int64_t C, int64_t I, bool inclusive, int64_t* counts,
               int64_t* nan_total) {
  const void* p = xc.data_ptr();
  switch (xc.scalar_type()) {
    case at::kFloat: return count_dispatch<FloatClass<float>>(p, O, C, I, inclusive, counts, nan_total);
    case at::kDouble: return count_dispatch<FloatClass<double>>(p, O, C, I, inclusive, counts, nan_total);
    case at::kHalf: return count_dispatch<HalfClass>(p, O, C, I, inclusive, counts, nan_total);
    case at::kBFloat16: return count_dispatch<BF16Class>(p, O, C, I, inclusive, counts, nan_total);
    default: break;  // the callers have checked the dtype
  }
}

// Adds the ON counts of x (neurons: channel `cd`, or every position when per_position) into
// counts (int64, contiguous, counts_shape) and the NaN count into *nan_ptr.
void count_into(const at::Tensor& x, int64_t cd, bool per_position, bool inclusive, at::Tensor& counts,
                int64_t* nan_ptr) {
  if (x.numel() == 0) return;
  const bool cl = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (per_position) {
    const int64_t N = x.size(0);
    if (cl) {
      // Count in memory order (H, W, C), then add as (C, H, W).
      auto xp = x.permute({0, 2, 3, 1});  // contiguous view
      auto counts_hwc = at::zeros({x.size(2), x.size(3), x.size(1)}, counts.options());
      count_any(xp, N, x.numel() / N, 1, inclusive, counts_hwc.data_ptr<int64_t>(), nan_ptr);
      counts.add_(counts_hwc.permute({2, 0, 1}));
      return;
    }
    auto xc = x.contiguous();
    count_any(xc, N, x.numel() / N, 1, inclusive, counts.data_ptr<int64_t>(), nan_ptr);
    return;
  }
  const int64_t C = x.size(cd);
  if (cl && cd == 1) {
    auto xp = x.permute({0, 2, 3, 1});  // (N, H, W, C), contiguous
    count_any(xp, x.numel() / C, C, 1, inclusive, counts.data_ptr<int64_t>(), nan_ptr);
    return;
  }
  auto xc = x.contiguous();
  int64_t O = 1, I = 1;
  for (int64_t d = 0; d < cd; ++d) O *= x.size(d);
  for (int64_t d = cd + 1; d < x.dim(); ++d) I *= x.size(d);
  count_any(xc, O, C, I, inclusive, counts.data_ptr<int64_t>(), nan_ptr);
}

std::tuple<at::Tensor, at::Tensor> entropy_counts_cpu(const at::Tensor& x, int64_t channel_dim,
                                                      bool per_position, bool inclusive) {
  const OpChecks op{"entropy_counts"};
  const int64_t cd = check_count_input(op, x, channel_dim, per_position);
  auto counts = at::zeros(counts_shape(x, cd, per_position), x.options().dtype(at::kLong));
  auto nan_count = at::zeros({}, x.options().dtype(at::kLong));
  count_into(x, cd, per_position, inclusive, counts, nan_count.data_ptr<int64_t>());
  return {counts, nan_count};
}

// counts += ON counts of x, nan_count += NaNs of x, after the accumulator checks (errors name `op`).
void add_counts(const OpChecks& op, const at::Tensor& counts, const at::Tensor& nan_count, const at::Tensor& x,
                int64_t channel_dim, bool per_position, bool inclusive) {
  const int64_t cd = check_count_input(op, x, channel_dim, per_position);
  check_accumulators(op, counts, nan_count, x, cd, per_position);
  at::Tensor c = counts;
  int64_t nans = 0;
  count_into(x, cd, per_position, inclusive, c, &nans);
  if (nans) nan_count.add_(nans);
}

void entropy_counts_add_cpu(const at::Tensor& counts, const at::Tensor& nan_count, const at::Tensor& x,
                            int64_t channel_dim, bool per_position, bool inclusive) {
  add_counts(OpChecks{"entropy_counts_add_"}, counts, nan_count, x, channel_dim, per_position, inclusive);
}

// Every tensor's counts into its accumulator, the NaNs of all into nan_count; all arguments are
// checked before anything is counted.
void entropy_counts_add_many_cpu(at::TensorList counts, const at::Tensor& nan_count, at::TensorList xs,
                                 at::IntArrayRef channel_dims, bool per_position, bool inclusive) {
  const OpChecks op{"entropy_counts_add_many_"};
  const std::vector<int64_t> cds = check_count_many(op, counts, nan_count, xs, channel_dims, per_position);
  int64_t nans = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    at::Tensor c = counts[i];
    count_into(xs[i], cds[i], per_position, inclusive, c, &nans);
  }
  if (nans) nan_count.add_(nans);
}

// On the CPU the count and the ReLU are two passes (the count pass is the cheap one).
at::Tensor relu_count_cpu(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& nan_count,
                          int64_t channel_dim, bool per_position, bool inclusive) {
  add_counts(OpChecks{"relu_count"}, counts, nan_count, x, channel_dim, per_position, inclusive);
  return at::relu(x);
}

std::tuple<at::Tensor, at::Tensor> entropy_from_counts_cpu(const at::Tensor& counts, int64_t n_samples,
                                                           double eps) {
  check_from_counts(OpChecks{"entropy_from_counts"}, counts, n_samples, eps);
  auto c = counts.contiguous();
  auto h = at::empty(c.sizes(), c.options().dtype(at::kFloat));
  auto summary = at::zeros({4}, c.options().dtype(at::kDouble));
  const int64_t n = c.numel();
  const int64_t* cp = c.data_ptr<int64_t>();
  float* hp = h.data_ptr<float>();
  double sum_all = 0, sum_nc = 0;
  int64_t n_nc = 0, n_on = 0, n_off = 0;
  for (int64_t j = 0; j < n; ++j)
    if (cp[j] < 0 || cp[j] > n_samples) OpChecks{"entropy_from_counts"}.value_error(count_range_message(j, cp[j], n_samples));
  const double inv_ln2 = 1.0 / std::log(2.0);
  // eps sits inside the logarithms only (the authors' formula); a constant neuron has exactly 0
  auto plogq = [](double p, double q) { return p != 0.0 ? p * std::log(q) : 0.0; };
  for (int64_t j = 0; j < n; ++j) {
    const int64_t k = cp[j];
    const double p = double(k) / double(n_samples);
    const bool constant = k == n_samples || k == 0;
    const double hv = constant ? 0.0 : -(plogq(p, p + eps) + plogq(1.0 - p, 1.0 - p + eps)) * inv_ln2;
    hp[j] = float(hv);
    sum_all += hv;
    if (k == n_samples) {
      ++n_on;
    } else if (k == 0) {
      ++n_off;
    } else {
      sum_nc += hv;
      ++n_nc;
    }
  }
  double* sp = summary.data_ptr<double>();
  sp[0] = n ? sum_all / n : 0.0;
  sp[1] = n_nc ? sum_nc / n_nc : 0.0;
  sp[2] = double(n_on);
  sp[3] = double(n_off);
  return {h, summary};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("entropy_counts", &entropy_counts_cpu);
  m.impl("entropy_counts_add_", &entropy_counts_add_cpu);
  m.impl("entropy_counts_add_many_", &entropy_counts_add_many_cpu);
  m.impl("relu_count", &relu_count_cpu);
  m.impl("entropy_from_counts", &entropy_from_counts_cpu);
}

}  // namespace pyengine

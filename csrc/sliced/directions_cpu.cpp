// CPU kernel: random projection directions (K unit vectors uniform on the sphere of R^d) drawn
// from a counter-based generator (Philox4x32-10, Box-Muller), for the sliced Wasserstein ops.
//
// torch.randn on the CPU runs one Mersenne Twister on one thread; drawing LaCoOT's 50 x 30720
// directions per step that way cost more than the distance itself. A counter-based generator
// gives every value from (seed, row, position) alone, so any number of threads fill the rows in
// parallel and the result does not depend on the thread count; the normalisation runs while a
// row is still in cache. The value layout is defined in directions_simd.inc.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/checks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#define PYENGINE_SIMD_KERNELS "sliced/directions_simd.inc"
#include "common/simd.h"

namespace pyengine {
namespace {

template <typename T>
void fill_rows(T* out, int64_t K, int64_t d, uint64_t seed, bool normalize) {
  const uint32_t key0 = uint32_t(seed), key1 = uint32_t(seed >> 32);
  const int64_t chunks = (d + cpu_base::kDirChunk - 1) / cpu_base::kDirChunk;
  const int64_t per = cpu_base::kDirBlockChunks;
  const int64_t blocks = (chunks + per - 1) / per;  // work items per row
  // block sums of squares, combined per row in block order: the same values on any thread count
  std::vector<double> partial(size_t(K * blocks), 0.0);
  auto block = [&](int64_t item) {
    const int64_t r = item / blocks, b = item % blocks;
    const int64_t c0 = b * per, c1 = std::min(chunks, c0 + per);
    partial[item] = PYENGINE_SIMD(normal_span<T>(key0, key1, uint32_t(r), c0, c1, d, out + r * d));
  };
  auto factor = [&](int64_t r) {
    double s = 0;
    for (int64_t b = 0; b < blocks; ++b) s += partial[r * blocks + b];
    return s > 0 ? T(1.0 / std::sqrt(s)) : T(0);
  };
  const int threads = at::get_num_threads();
  if (K >= 2 * int64_t(threads)) {
    // whole rows per task: the row is scaled while it is still in cache
    at::parallel_for(0, K, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t b = 0; b < blocks; ++b) block(r * blocks + b);
        if (normalize) PYENGINE_SIMD(scale_span<T>(out + r * d, d, factor(r)));
      }
    });
    return;
  }
  // few long rows: split them into blocks, then scale
  at::parallel_for(0, K * blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) block(i);
  });
  if (!normalize) return;
  const int64_t span = per * cpu_base::kDirChunk;
  at::parallel_for(0, K * blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / blocks, at = (i % blocks) * span;
      PYENGINE_SIMD(scale_span<T>(out + r * d + at, std::min(span, d - at), factor(r)));
    }
  });
}

// out (K, d) float32/float64, contiguous: row r = direction r. normalize=false leaves standard
// normal values (the generator itself, which the tests check against a float64 reference).
void fill_directions_cpu(at::Tensor& out, int64_t seed, bool normalize) {
  const OpChecks op{"fill_directions_"};
  op.dim(out, "out", 2, "(K, d)");
  op.dtype(out, "out", {at::kFloat, at::kDouble});
  op.contiguous(out, "out");
  const int64_t K = out.size(0), d = out.size(1);
  if (K >= (int64_t(1) << 32)) op.value_error("out has ", K, " rows; at most 2**32 - 1 are supported");
  if (d > (int64_t(1) << 34)) op.value_error("out has ", d, " columns; at most 2**34 are supported");
  if (K == 0 || d == 0) return;
  if (out.scalar_type() == at::kFloat)
    fill_rows<float>(out.data_ptr<float>(), K, d, uint64_t(seed), normalize);
  else
    fill_rows<double>(out.data_ptr<double>(), K, d, uint64_t(seed), normalize);
}

// fill_directions_ with the seed given as a one-element int64 CPU tensor.
void fill_directions_keyed_cpu(at::Tensor& out, const at::Tensor& seed, bool normalize) {
  const OpChecks op{"fill_directions_keyed_"};
  op.defined(seed, "seed");
  op.dtype(seed, "seed", {at::kLong});
  if (seed.numel() != 1) op.value_error("seed must hold one element, got shape ", shape_str(seed.sizes()));
  if (!seed.device().is_cpu()) op.value_error("seed must be a CPU tensor, got one on ", seed.device());
  fill_directions_cpu(out, seed.item<int64_t>(), normalize);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("fill_directions_", &fill_directions_cpu);
  m.impl("fill_directions_keyed_", &fill_directions_keyed_cpu);
}

}  // namespace pyengine

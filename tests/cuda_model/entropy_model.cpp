// Runs the launchers and kernels of csrc/entropy/entropy_cuda.cu (ON counts per neuron, with and
// without the fused ReLU, vector and scalar paths; binary entropy and its summary) in the CPU
// model of the CUDA execution model (model.h), against plain loops. Built and run by
// tests/test_cuda_model.py.
#define PYENGINE_KERNEL_MODEL
#include "check.h"

#include "entropy/entropy_cuda.cu"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

using namespace pyengine::cuda;
using check::expect;

namespace {

// rows x row_len values with exact zeros, negative zeros, NaNs of both signs, infinities, values
// that are subnormal in fp16 / bf16, and both signs
std::vector<float> activations(int64_t count, std::mt19937& g) {
  std::uniform_int_distribution<int> kind(0, 15);
  std::uniform_real_distribution<float> mag(0.01f, 3.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::vector<float> a(static_cast<size_t>(count));
  for (auto& e : a) {
    const int q = kind(g);
    e = q == 0 ? 0.0f : q == 1 ? -0.0f : q == 2 ? nan : q == 3 ? -nan : q == 4 ? inf : q == 5 ? -inf
      : q == 6 ? 3e-8f : q == 7 ? -3e-8f : q == 8 ? 1e-39f : (q < 12 ? -mag(g) : mag(g));
  }
  return a;
}

// For fp16 / bf16: every 13th value becomes the NaN next to infinity (bits inf + 1, either sign),
// which a conversion from float never makes and an off-by-one in a raw-bit test would count as ON.
template <typename T>
std::vector<T> with_edge_nans(std::vector<T> x) {
  if constexpr (sizeof(T) == 2) {
    const uint16_t inf = std::is_same_v<T, __half> ? 0x7C00 : 0x7F80;
    for (size_t i = 0; i < x.size(); i += 13) {
      const uint16_t bits = static_cast<uint16_t>((inf + 1) | ((i / 13) % 2 ? 0x8000 : 0));
      std::memcpy(&x[i], &bits, 2);
    }
  }
  return x;
}

template <typename T>
void counts_case(const char* tname, int64_t rows, int64_t row_len, int64_t div, bool inclusive, bool relu, std::mt19937& g) {
  const auto x = with_edge_nans(check::convert<T>(activations(rows * row_len, g)));
  const int64_t neurons = (row_len + div - 1) / div;
  std::vector<int64_t> counts(static_cast<size_t>(neurons), 5), want(static_cast<size_t>(neurons), 5);  // added into
  int64_t nan = 2, want_nan = 2;
  std::vector<T> y(x.size(), check::from_float<T>(77.0f));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < row_len; ++c) {
      const float v = check::to_float(x[r * row_len + c]);
      if (std::isnan(v)) ++want_nan;
      else if (inclusive ? v >= 0.0f : v > 0.0f) ++want[c / div];
    }
  const cudaError_t err = entropy_counts_rows(check::dtype_of<T>(), x.data(), relu ? y.data() : nullptr, rows, row_len,
                                              div, inclusive, counts.data(), &nan, nullptr);
  bool ok = err == cudaSuccess && counts == want && nan == want_nan;
  if (relu)
    for (size_t i = 0; i < x.size(); ++i) {
      const float v = check::to_float(x[i]), out = check::to_float(y[i]);
      ok = ok && (std::isnan(v) ? std::isnan(out) : out == (v > 0.0f ? v : 0.0f));
    }
  char what[200];
  std::snprintf(what, sizeof(what), "counts %s rows=%lld row_len=%lld div=%lld inclusive=%d relu=%d", tname, (long long)rows,
                (long long)row_len, (long long)div, int(inclusive), int(relu));
  expect(ok, what);
}

// One tensor of a batched count, in its own dtype; `offset` elements into its buffer, so that an
// odd offset makes the tensor unaligned (scalar loads).
struct ManyInput {
  DType dt;
  int64_t rows, row_len, div, offset;
};

template <typename T>
void fill_many(const ManyInput& in, std::vector<float>& xf, std::vector<unsigned char>& bytes, std::mt19937& g) {
  xf = activations(in.rows * in.row_len, g);
  const auto x = check::convert<T>(xf);
  bytes.assign((x.size() + static_cast<size_t>(in.offset)) * sizeof(T) + 16, 0);
  if (!x.empty()) std::memcpy(bytes.data() + in.offset * sizeof(T), x.data(), x.size() * sizeof(T));
}

// entropy_counts_rows_many over tensors of mixed dtypes, alignments and shapes (more than one
// launch's worth when n > 32), against plain loops over each tensor.
void many_case(const std::vector<ManyInput>& ins, bool inclusive, std::mt19937& g) {
  const size_t n = ins.size();
  std::vector<std::vector<unsigned char>> bufs(n);
  std::vector<std::vector<float>> xfs(n);
  std::vector<std::vector<int64_t>> counts(n), want(n);
  std::vector<CountRowsDesc> descs(n);
  int64_t nan = 3, want_nan = 3;
  for (size_t t = 0; t < n; ++t) {
    const ManyInput& in = ins[t];
    size_t esize = 4;
    switch (in.dt) {
      case DType::kFloat32: fill_many<float>(in, xfs[t], bufs[t], g); esize = 4; break;
      case DType::kFloat64: fill_many<double>(in, xfs[t], bufs[t], g); esize = 8; break;
      case DType::kFloat16: fill_many<__half>(in, xfs[t], bufs[t], g); esize = 2; break;
      case DType::kBFloat16: fill_many<__nv_bfloat16>(in, xfs[t], bufs[t], g); esize = 2; break;
    }
    const int64_t neurons = (in.row_len + in.div - 1) / in.div;
    counts[t].assign(static_cast<size_t>(neurons), 7);
    want[t] = counts[t];
    for (int64_t i = 0; i < in.rows * in.row_len; ++i) {
      // the reference classifies the value the kernel sees (rounded to the tensor's dtype)
      float v = xfs[t][i];
      if (in.dt == DType::kFloat16) v = check::to_float(check::from_float<__half>(v));
      if (in.dt == DType::kBFloat16) v = check::to_float(check::from_float<__nv_bfloat16>(v));
      if (std::isnan(v)) ++want_nan;
      else if (inclusive ? v >= 0.0f : v > 0.0f) ++want[t][(i % in.row_len) / in.div];
    }
    descs[t] = {in.dt, bufs[t].data() + in.offset * esize, in.rows, in.row_len, in.div, counts[t].data()};
  }
  const cudaError_t err = entropy_counts_rows_many(descs.data(), static_cast<int64_t>(n), inclusive, &nan, nullptr);
  bool ok = err == cudaSuccess && nan == want_nan;
  for (size_t t = 0; t < n; ++t) ok = ok && counts[t] == want[t];
  expect(ok, "counts_many n=" + std::to_string(n) + " inclusive=" + std::to_string(int(inclusive)));
}

void entropy_case(int64_t numel, int64_t n_samples, double eps, std::mt19937& g) {
  std::uniform_int_distribution<int64_t> cnt(0, n_samples);
  std::vector<int64_t> counts(static_cast<size_t>(numel));
  for (size_t i = 0; i < counts.size(); ++i) counts[i] = i % 7 == 0 ? 0 : (i % 11 == 0 ? n_samples : cnt(g));
  std::vector<float> h(counts.size(), -1.0f);
  double summary[4] = {-1, -1, -1, -1};
  std::vector<double> scratch(kEntropyScratchDoubles);
  DeviceErrorRecord rec{};
  const cudaError_t err =
      entropy_from_counts(counts.data(), numel, n_samples, eps, h.data(), summary, scratch.data(), &rec, nullptr);
  double sum = 0, sum_nc = 0, n_nc = 0, on = 0, off = 0;
  bool ok = err == cudaSuccess && rec.code == kDevErrNone;
  for (size_t i = 0; i < counts.size(); ++i) {
    const double p = static_cast<double>(counts[i]) / n_samples;
    const bool constant = counts[i] == 0 || counts[i] == n_samples;
    auto plogq = [](double a, double b) { return a != 0.0 ? a * std::log(b) : 0.0; };
    const double hv = constant ? 0.0 : -(plogq(p, p + eps) + plogq(1 - p, 1 - p + eps)) / std::log(2.0);
    ok = ok && std::fabs(h[i] - hv) <= 1e-6;
    sum += hv;
    if (counts[i] == n_samples) ++on;
    else if (counts[i] == 0) ++off;
    else {
      sum_nc += hv;
      ++n_nc;
    }
  }
  const double want[4] = {numel ? sum / numel : 0.0, n_nc ? sum_nc / n_nc : 0.0, on, off};
  for (int i = 0; i < 4; ++i) ok = ok && std::fabs(summary[i] - want[i]) <= 1e-12 * std::max(1.0, std::fabs(want[i]));
  expect(ok, "entropy numel=" + std::to_string(numel) + " n_samples=" + std::to_string(n_samples));
}

// The stream-order count (PYENGINE_ENTROPY_ORDER=stream), called directly so that a shape it
// should take cannot pass by falling back to the strips: the counts added into, the NaN count, and
// whether the shape was taken.
template <typename T>
void stream_case(const char* tname, int64_t rows, int64_t row_len, int64_t div, bool inclusive, bool taken,
                 std::mt19937& g) {
  const auto x = with_edge_nans(check::convert<T>(activations(rows * row_len, g)));  // 16-byte aligned (new)
  const int64_t neurons = (row_len + div - 1) / div;
  std::vector<int64_t> counts(static_cast<size_t>(neurons), 3), want(static_cast<size_t>(neurons), 3);
  int64_t nan = 4, want_nan = 4;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < row_len; ++c) {
      const float v = check::to_float(x[r * row_len + c]);
      if (std::isnan(v)) ++want_nan;
      else if (inclusive ? v >= 0.0f : v > 0.0f) ++want[c / div];
    }
  cudaError_t err = cudaSuccess;
  const bool took = launch_stream<T>(x.data(), rows, row_len, div, inclusive, counts.data(),
                                     reinterpret_cast<unsigned long long*>(&nan), nullptr, err);
  char what[200];
  std::snprintf(what, sizeof(what), "stream count %s rows=%lld row_len=%lld div=%lld inclusive=%d (%s)", tname,
                (long long)rows, (long long)row_len, (long long)div, int(inclusive), taken ? "taken" : "not taken");
  expect(took == taken && (!took || (err == cudaSuccess && counts == want && nan == want_nan)), what);
}

// A count outside [0, n_samples] is reported with its position, its h is NaN, and the summary
// leaves it out (the same summary as without it).
void entropy_bad_count_case() {
  std::vector<int64_t> counts = {3, 10, -2, 0, 5, 11};
  std::vector<float> h(counts.size(), -1.0f);
  double summary[4] = {-1, -1, -1, -1};
  std::vector<double> scratch(kEntropyScratchDoubles);
  DeviceErrorRecord rec{};
  entropy_from_counts(counts.data(), 6, 10, 0.0, h.data(), summary, scratch.data(), &rec, nullptr);
  const bool reported = rec.code == kDevErrCount && rec.op == kOpEntropyFromCounts &&
                        ((rec.position == 2 && rec.value == -2) || (rec.position == 5 && rec.value == 11)) && rec.bound == 10;
  expect(reported && std::isnan(h[2]) && std::isnan(h[5]) && !std::isnan(h[0]) && summary[2] == 1 && summary[3] == 1,
         "entropy_from_counts reports a count outside [0, n_samples] and leaves it out");
}

}  // namespace

// zero_counts: every count and the NaN count set to 0 (they start as garbage), nothing past n touched
void zero_case(int64_t n) {
  std::vector<int64_t> counts(static_cast<size_t>(n + 1), -7);
  int64_t nan_count = 99;
  if (zero_counts(counts.data(), n, &nan_count, nullptr) != cudaSuccess) model::fail("zero_counts returned an error");
  bool ok = nan_count == 0 && counts[static_cast<size_t>(n)] == -7;
  for (int64_t i = 0; i < n; ++i) ok = ok && counts[static_cast<size_t>(i)] == 0;
  expect(ok, "zero_counts n=" + std::to_string(n));
}

// The row-piece width: every thread busy in every (tile, row group) unit where a width allows it.
void tile_width_case() {
  const int64_t cases[][2] = {{50176, 512}, {512, 512}, {640, 128}, {192, 64}, {300, 64},
                              {96, 96}, {513, 64}, {17, 17}, {1, 1}, {1000, 512}};
  for (const auto& c : cases) {
    const int32_t tw = pick_tile_w(c[0]);
    char what[96];
    std::snprintf(what, sizeof(what), "tile width for rows of %lld vectors: %d (want %lld)", (long long)c[0], tw,
                  (long long)c[1]);
    check::expect(tw == c[1], what);
  }
}

int main() {
  std::mt19937 g(5);
  tile_width_case();
  if (check::quick()) {  // each kernel and path once, small
    zero_case(1000);
    counts_case<float>("fp32", 3, 4 * 640, 1, false, false, g);  // five 128-wide tiles
    counts_case<float>("fp32", 2, 64 * 16, 16, false, true, g);
    counts_case<__nv_bfloat16>("bf16", 3, 5 * 21, 21, true, false, g);
    counts_case<__half>("fp16", 3, 8 * 40, 20, false, false, g);
    counts_case<float>("fp32", 2, 3000, 1000, false, false, g);
    many_case({{DType::kFloat32, 3, 64, 16, 0}, {DType::kFloat32, 5, 12, 1, 1}, {DType::kBFloat16, 2, 40, 8, 0}}, true, g);
    entropy_case(1000, 64, 1e-10, g);
    return check::finish();
  }
  for (bool inclusive : {false, true})
    for (bool relu : {false, true}) {
      counts_case<float>("fp32", 4, 64 * 16, 16, inclusive, relu, g);         // NCHW-like, vector loads
      counts_case<__nv_bfloat16>("bf16", 6, 5 * 21, 21, inclusive, relu, g);  // odd length: scalar loads
      // 16-byte vectors of 8: one neuron per vector (raw-bit path), and vectors across neurons
      counts_case<__nv_bfloat16>("bf16", 5, 64 * 24, 24, inclusive, relu, g);
      counts_case<__half>("fp16", 4, 8 * 100, 20, inclusive, relu, g);
      counts_case<__nv_bfloat16>("bf16", 300, 16, 8, inclusive, relu, g);  // many rows, kUnroll batches
    }
  // a thread walking many rows of one-neuron vectors (512-wide tiles, one row per step): the two
  // half batches in rotation, with a partial last half (4 model SMs: 45 rows -> 11-12 per thread)
  for (bool inclusive : {false, true}) {
    counts_case<__nv_bfloat16>("bf16", 45, 8 * 512, 8, inclusive, false, g);
    counts_case<__half>("fp16", 70, 8 * 512, 16, inclusive, false, g);
  }
  // stream order: neurons of exactly 32 vectors (a warp's load inside one neuron or across two),
  // of 100 and 33 vectors (rows ending inside a warp's load: the next neuron is 0), several
  // grid-stride steps per block (model: 8 blocks of 64 KB), the most neurons it takes; and the
  // shapes it leaves to the strips
  for (bool inclusive : {false, true}) {
    stream_case<__nv_bfloat16>("bf16", 5, 3 * 256, 256, inclusive, true, g);
    stream_case<__nv_bfloat16>("bf16", 9, 40 * 784, 784, inclusive, true, g);
    stream_case<__half>("fp16", 4, 7 * 800, 800, inclusive, true, g);
    stream_case<float>("fp32", 3, 5 * 132, 132, inclusive, true, g);
  }
  stream_case<float>("fp32", 2, 4096 * 128, 128, false, true, g);
  stream_case<__nv_bfloat16>("bf16", 3, 4097 * 256, 256, false, false, g);  // too many neurons
  stream_case<__nv_bfloat16>("bf16", 3, 40 * 248, 248, false, false, g);    // neurons of 31 vectors
  stream_case<__nv_bfloat16>("bf16", 3, 40 * 260, 260, false, false, g);    // not whole vectors
  stream_case<float>("fp32", 3, 1000, 200, false, true, g);                 // neurons of 50 vectors
  stream_case<float>("fp32", 3, 1000, 120, false, false, g);                // the last neuron cut short
  stream_case<double>("fp64", 3, 4 * 256, 256, false, false, g);
  // through the public entry point, and with the strips' fallback shapes
  setenv("PYENGINE_ENTROPY_ORDER", "stream", 1);
  for (bool inclusive : {false, true}) {
    counts_case<__nv_bfloat16>("bf16 stream", 9, 40 * 784, 784, inclusive, false, g);
    counts_case<__nv_bfloat16>("bf16 stream fallback", 5, 64 * 24, 24, inclusive, false, g);
    counts_case<float>("fp32 stream relu (strips)", 4, 64 * 256, 256, inclusive, true, g);
  }
  unsetenv("PYENGINE_ENTROPY_ORDER");
  setenv("PYENGINE_ENTROPY_RAW_BITS", "0", 1);  // the value-by-value count of 16-bit vectors (kept to compare)
  counts_case<__nv_bfloat16>("bf16 values", 5, 64 * 24, 24, true, false, g);
  unsetenv("PYENGINE_ENTROPY_RAW_BITS");
  counts_case<__half>("fp16", 3, 512, 1, false, true, g);     // (B, T, C): a neuron per column
  counts_case<double>("fp64", 300, 8, 1, true, false, g);     // many narrow rows
  counts_case<float>("fp32", 2, 3000, 1000, false, false, g); // a warp's columns inside one neuron
  // row pieces narrower than the row: 128 of 640 vectors, 64 of 192 (a (B, T, 768) tensor), 64 of
  // 300 (and a partial last tile), 64 of 513
  counts_case<float>("fp32", 9, 4 * 640, 1, false, true, g);
  counts_case<float>("fp32", 7, 4 * 640, 16, true, false, g);
  counts_case<float>("fp32", 40, 4 * 192, 1, true, true, g);
  counts_case<__nv_bfloat16>("bf16", 6, 8 * 300, 24, false, false, g);
  counts_case<__half>("fp16", 5, 8 * 300, 1, true, false, g);
  counts_case<float>("fp32", 3, 4 * 513, 4, false, false, g);
  // a forward pass's worth: NCHW-like and (B, T, C) tensors, aligned and not, four dtypes
  for (bool inclusive : {false, true}) {
    many_case({{DType::kFloat32, 4, 64 * 16, 16, 0}, {DType::kFloat32, 3, 1000, 1, 0}, {DType::kFloat32, 2, 96, 3, 1},
               {DType::kBFloat16, 5, 8 * 9, 9, 0}, {DType::kFloat16, 3, 21, 7, 1}, {DType::kFloat64, 40, 6, 1, 0},
               {DType::kFloat32, 0, 64, 1, 0}, {DType::kFloat32, 700, 4, 2, 0}},
              inclusive, g);
  }
  std::vector<ManyInput> many;  // 70 tensors: three launches of one kind
  for (int i = 0; i < 70; ++i) many.push_back({DType::kFloat32, 1 + i % 5, 16 * (1 + i % 3), 4, 0});
  many_case(many, false, g);
  many_case({}, false, g);
  for (int64_t n : {0, 1, 1000}) zero_case(n);
  entropy_case(1000, 64, 1e-10, g);
  entropy_case(3, 10, 0.0, g);
  entropy_case(5000, 1000, 1e-8, g);  // 20 blocks of partial sums
  entropy_bad_count_case();
  return check::finish();
}

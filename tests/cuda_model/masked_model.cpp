// Runs the launchers and kernels of csrc/masked/masked_cuda.cu (the masked copy W * M, vector and
// scalar paths, in place and with leading dimensions; apply_masks_ over more tensors than one
// launch takes, of every element size) in the CPU model of the CUDA execution model (model.h),
// against plain loops. Built and run by tests/test_cuda_model.py.
#define PYENGINE_KERNEL_MODEL
#include "check.h"

#include "masked/masked_cuda.cu"

#include <cmath>
#include <limits>

using namespace pyengine::cuda;
using check::expect;

namespace {

std::vector<uint8_t> bool_mask(size_t count, std::mt19937& g) {
  std::bernoulli_distribution b(0.5);
  std::vector<uint8_t> m(count);
  for (auto& e : m) e = b(g) ? 1 : 0;
  return m;
}

template <typename T>
void copy_case(const char* tname, int64_t rows, int64_t cols, int64_t pad, bool in_place, std::mt19937& g) {
  const int64_t ld = cols + pad;
  auto srcf = check::small_ints(static_cast<size_t>(rows * ld), -4, 4, g);
  srcf[1] = std::numeric_limits<float>::infinity();  // inf * 0 is NaN, as in the reference W * M
  const auto src = check::convert<T>(srcf);
  const auto mask = bool_mask(static_cast<size_t>(rows * ld), g);
  std::vector<T> dst = in_place ? src : std::vector<T>(src.size(), check::from_float<T>(55.0f));
  const cudaError_t err = masked_copy(check::dtype_of<T>(), dst.data(), ld, in_place ? dst.data() : src.data(), ld,
                                      reinterpret_cast<const bool*>(mask.data()), ld, rows, cols, nullptr);
  bool ok = err == cudaSuccess;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ld; ++c) {
      const size_t i = static_cast<size_t>(r * ld + c);
      const float got = check::to_float(dst[i]);
      if (c < cols) {
        const float want = check::to_float(src[i]) * static_cast<float>(mask[i]);
        ok = ok && (std::isnan(want) ? std::isnan(got) : got == want);
      } else {
        ok = ok && got == (in_place ? check::to_float(src[i]) : 55.0f);  // the padding is not touched
      }
    }
  char what[160];
  std::snprintf(what, sizeof(what), "masked_copy %s %lldx%lld ld=%lld in_place=%d", tname, (long long)rows, (long long)cols,
                (long long)ld, int(in_place));
  expect(ok, what);
}

void apply_masks_case(int count, std::mt19937& g) {
  std::vector<std::vector<uint64_t>> data(static_cast<size_t>(count));
  std::vector<std::vector<uint8_t>> masks(static_cast<size_t>(count));
  std::vector<MaskTensorDesc> descs;
  const int sizes[4] = {1, 2, 4, 8};
  for (int i = 0; i < count; ++i) {
    const int es = sizes[i % 4];
    const int64_t numel = 1 + (i * 37) % 300;
    data[i].assign(static_cast<size_t>((numel * es + 7) / 8 + 1), ~0ull);
    masks[i] = bool_mask(static_cast<size_t>(numel), g);
    descs.push_back({data[i].data(), reinterpret_cast<const bool*>(masks[i].data()), numel, es});
  }
  bool ok = apply_masks(descs.data(), count, nullptr) == cudaSuccess;
  for (int i = 0; i < count; ++i) {
    const auto* bytes = reinterpret_cast<const uint8_t*>(data[i].data());
    const int es = descs[i].elem_size;
    for (int64_t j = 0; j < descs[i].numel; ++j)
      for (int b = 0; b < es; ++b) ok = ok && bytes[j * es + b] == (masks[i][j] ? 0xFF : 0x00);
    for (size_t b = static_cast<size_t>(descs[i].numel * es); b < data[i].size() * 8; ++b)
      ok = ok && bytes[b] == 0xFF;  // nothing past the tensor
  }
  expect(ok, "apply_masks " + std::to_string(count) + " tensors of 1, 2, 4 and 8 bytes");
}

}  // namespace

int main() {
  std::mt19937 g(3);
  if (check::quick()) {
    copy_case<float>("fp32", 3, 64, 0, false, g);
    copy_case<__half>("fp16", 5, 13, 3, true, g);
    apply_masks_case(kMaxMaskBatch + 5, g);
    return check::finish();
  }
  copy_case<float>("fp32", 7, 256, 0, false, g);        // vector path
  copy_case<float>("fp32", 5, 13, 3, false, g);         // odd columns, a leading dimension
  copy_case<__nv_bfloat16>("bf16", 4, 64, 0, true, g);  // in place
  copy_case<__half>("fp16", 9, 100, 4, false, g);
  copy_case<double>("fp64", 3, 30, 2, true, g);
  apply_masks_case(3, g);
  apply_masks_case(kMaxMaskBatch * 2 + 7, g);  // three launches
  return check::finish();
}

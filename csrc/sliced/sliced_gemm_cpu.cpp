// ordered_mm_cpu (sliced_gemm_cpu.h): products tiled by their shapes only, one BLAS call per tile on
// one thread, partial products of a split reduction added in a fixed order.
#include "sliced/sliced_gemm_cpu.h"

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>

#if AT_MKL_ENABLED()
// MKL's per-thread thread count, its C interface (mkl.h names it mkl_set_num_threads_local; the
// exported symbol of that name is the Fortran interface, which takes a pointer). Weak: a torch that
// does not export it still loads. torch.set_num_threads sets it for the calling thread; here it is
// 1 for each tile.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

namespace pyengine {
namespace {

// The tiling constants: the only inputs to a product's tiling besides its shape. Changing them
// changes the last bits of the results (the same on every thread count).
constexpr int64_t kReduceChunk = 4096;          // a split reduction's pieces are at least this long
constexpr int64_t kPartialBudget = 1LL << 22;   // partial-product elements kept per product, at most
constexpr int64_t kTileWork = 1LL << 25;        // multiply-adds per tile, at most (down to 64 x 64)
constexpr int64_t kAlign = 64;                  // tile and piece boundaries: multiples of 64 elements

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }

// BLAS runs on the calling thread only while the guard lives: MKL inside an OpenMP region already
// does, but a product that is one tile runs outside any region (at::parallel_for calls it inline),
// where MKL would take all of torch's threads.
class OneBlasThread {
 public:
  OneBlasThread() {
#if AT_MKL_ENABLED()
    if (MKL_Set_Num_Threads_Local != nullptr) prev_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~OneBlasThread() {
#if AT_MKL_ENABLED()
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev_);  // 0: MKL's global setting
#endif
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int prev_ = 0;
};

struct Plan {
  int64_t M = 0, N = 0, R = 0;
  int64_t pieces = 1;  // of the reduction
  int64_t bm = 0, bn = 0, tm = 0, tn = 0;  // output tile sizes and counts
  at::Tensor partial;  // (pieces - 1, M, N): pieces 1.. (piece 0 goes to out)

  int64_t tasks() const { return pieces * tm * tn; }
  // start of reduction piece p (p = pieces: R); interior boundaries on multiples of kAlign
  int64_t piece_begin(int64_t p) const { return p >= pieces ? R : (R * p / pieces) / kAlign * kAlign; }
};

Plan make_plan(const OrderedMM& mm) {
  Plan pl;
  pl.M = mm.a.size(0), pl.R = mm.a.size(1), pl.N = mm.b.size(1);
  if (pl.M == 0 || pl.N == 0) return pl;  // no tasks
  const int64_t outs = pl.M * pl.N;
  if (pl.R >= 2 * kReduceChunk) pl.pieces = std::min(pl.R / kReduceChunk, 1 + kPartialBudget / outs);
  const int64_t rlen = std::max<int64_t>(1, ceil_div(pl.R, pl.pieces));
  pl.bm = pl.M, pl.bn = pl.N;
  while (pl.bm * pl.bn * rlen > kTileWork) {
    if (pl.bn >= pl.bm && pl.bn > kAlign)
      pl.bn = round_up(ceil_div(pl.bn, 2), kAlign);
    else if (pl.bm > kAlign)
      pl.bm = round_up(ceil_div(pl.bm, 2), kAlign);
    else
      break;
  }
  pl.tm = ceil_div(pl.M, pl.bm), pl.tn = ceil_div(pl.N, pl.bn);
  return pl;
}

void check(const OrderedMM& mm) {
  TORCH_INTERNAL_ASSERT(mm.a.dim() == 2 && mm.b.dim() == 2 && mm.out.dim() == 2);
  TORCH_INTERNAL_ASSERT(mm.a.size(1) == mm.b.size(0) && mm.out.size(0) == mm.a.size(0) &&
                        mm.out.size(1) == mm.b.size(1));
  TORCH_INTERNAL_ASSERT(mm.out.is_cpu() && mm.out.is_contiguous());
  TORCH_INTERNAL_ASSERT(mm.a.scalar_type() == mm.out.scalar_type() && mm.b.scalar_type() == mm.out.scalar_type());
}

}  // namespace

void ordered_mm_cpu(const std::vector<OrderedMM>& mms) {
  std::vector<Plan> plans;
  plans.reserve(mms.size());
  std::vector<int64_t> first{0};  // first task of each product
  for (const auto& mm : mms) {
    check(mm);
    plans.push_back(make_plan(mm));
    Plan& pl = plans.back();
    if (pl.pieces > 1) pl.partial = at::empty({pl.pieces - 1, pl.M, pl.N}, mm.out.options());
    first.push_back(first.back() + pl.tasks());
  }
  // the workers run ATen ops (the tile products) in the caller's state: inference mode (the outputs
  // are inference tensors there), below autograd, autocast excluded
  const at::ThreadLocalState tls;
  at::parallel_for(0, first.back(), 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard tls_guard(tls);
    OneBlasThread one;
    size_t i = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[i + 1]) ++i;
      const Plan& pl = plans[i];
      const OrderedMM& mm = mms[i];
      const int64_t local = t - first[i], per_piece = pl.tm * pl.tn;
      const int64_t p = local / per_piece, tile = local % per_piece;
      const int64_t m0 = (tile / pl.tn) * pl.bm, n0 = (tile % pl.tn) * pl.bn;
      const int64_t lm = std::min(pl.bm, pl.M - m0), ln = std::min(pl.bn, pl.N - n0);
      const int64_t r0 = pl.piece_begin(p), lr = pl.piece_begin(p + 1) - r0;
      at::Tensor dst = (p == 0 ? mm.out : pl.partial.select(0, p - 1)).narrow(0, m0, lm).narrow(1, n0, ln);
      at::mm_out(dst, mm.a.detach().narrow(0, m0, lm).narrow(1, r0, lr),
                 mm.b.detach().narrow(0, r0, lr).narrow(1, n0, ln));
    }
  });
  // out += partial[0] + partial[1] + ..., left to right for every element
  for (size_t i = 0; i < mms.size(); ++i) {
    const Plan& pl = plans[i];
    if (pl.pieces == 1) continue;
    const int64_t outs = pl.M * pl.N;
    AT_DISPATCH_FLOATING_TYPES(mms[i].out.scalar_type(), "ordered_mm_cpu", [&] {
      scalar_t* o = mms[i].out.data_ptr<scalar_t>();
      const scalar_t* q = pl.partial.data_ptr<scalar_t>();
      at::parallel_for(0, outs, 4096, [&](int64_t e0, int64_t e1) {
        for (int64_t p = 0; p + 1 < pl.pieces; ++p) {
          const scalar_t* s = q + p * outs;
          for (int64_t e = e0; e < e1; ++e) o[e] += s[e];
        }
      });
    });
  }
}

}  // namespace pyengine

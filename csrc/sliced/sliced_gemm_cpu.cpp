// ordered_mm_cpu (sliced_gemm_cpu.h): products tiled by their shapes only, one BLAS call per tile on
// one thread, partial products of a split reduction added in a fixed order.
#include "sliced/sliced_gemm_cpu.h"

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <climits>
#include <map>
#include <tuple>

#include "common/buffer_pool.h"

#if AT_MKL_ENABLED()
// MKL functions that torch's MKL builds export; weak, so a torch without them still loads (and
// the products go through at::mm_out alone). MKL_Set_Num_Threads_Local is the C interface of
// mkl_set_num_threads_local (the exported symbol of that name is the Fortran one, which takes a
// pointer); the cblas_sgemm_pack* functions are MKL's packed GEMM, LP64 (int) interface.
extern "C" {
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}
#endif

namespace pyengine {
namespace {

// The tiling constants: the only inputs to a product's tiling besides its shape. Changing them
// changes the last bits of the results (the same on every thread count).
constexpr int64_t kReduceChunk = 4096;          // a split reduction's pieces are at least this long
constexpr int64_t kPartialBudget = 1LL << 22;   // partial-product elements kept per product, at most
constexpr int64_t kTileWork = 1LL << 25;        // multiply-adds per tile, at most (down to 64 x 64)
constexpr int64_t kAlign = 64;                  // tile and piece boundaries: multiples of 64 elements
constexpr int64_t kWide = 512;                  // output tiles at least this wide are cut in rows first

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }

// BLAS runs on the calling thread only while the guard lives. Set in every tile, in and out of
// OpenMP regions: MKL picks its kernels by its thread setting (on one thread: no-copy kernels for
// narrow outputs; with more, even when nesting leaves it one, the packing ones), so a setting that
// followed torch's thread count would change the sums' order with it.
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

// MKL's packed GEMM (float32): one thread's MKL takes a no-copy kernel for a narrow output such as
// a projection's K x n (50 x 128: about 1.4x slower here than its packing kernel, which MKL takes
// when it runs on more threads); with the left operand packed first it takes the packing kernel.
enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kAMatrix = 161 };

bool packed_gemm_available() {
#if AT_MKL_ENABLED()
  return MKL_Set_Num_Threads_Local != nullptr && cblas_sgemm_pack_get_size != nullptr &&
         cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
#else
  return false;
#endif
}

// A matrix view as BLAS takes it: unit stride along one dimension. trans: stored transposed.
struct BlasView {
  bool ok = false, trans = false;
  int ld = 0;
};

BlasView blas_view(const at::Tensor& t) {
  BlasView v;
  const int64_t s0 = t.stride(0), s1 = t.stride(1), r = t.size(0), c = t.size(1);
  int64_t ld = 0;
  if (s1 == 1 && s0 >= std::max<int64_t>(c, 1)) {
    ld = s0;
  } else if (s0 == 1 && s1 >= std::max<int64_t>(r, 1)) {
    ld = s1, v.trans = true;
  } else {
    return v;
  }
  v.ok = ld <= INT_MAX && r <= INT_MAX && c <= INT_MAX;
  v.ld = static_cast<int>(ld);
  return v;
}

struct Plan {
  int64_t M = 0, N = 0, R = 0;
  int64_t pieces = 1;  // of the reduction
  int64_t bm = 0, bn = 0, tm = 0, tn = 0;  // output tile sizes and counts
  at::Tensor partial;  // (pieces - 1, M, N): pieces 1.. (piece 0 goes to out)
  int64_t pack = -1;   // packed-operand group, or -1: at::mm_out

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
  // halve the columns while tiles stay wide (one thread's MKL packs wide outputs), then the rows,
  // then the columns again
  pl.bm = pl.M, pl.bn = pl.N;
  while (pl.bm * pl.bn * rlen > kTileWork) {
    if (pl.bn >= 2 * kWide)
      pl.bn = round_up(ceil_div(pl.bn, 2), kAlign);
    else if (pl.bm > kAlign)
      pl.bm = round_up(ceil_div(pl.bm, 2), kAlign);
    else if (pl.bn > kAlign)
      pl.bn = round_up(ceil_div(pl.bn, 2), kAlign);
    else
      break;
  }
  pl.tm = ceil_div(pl.M, pl.bm), pl.tn = ceil_div(pl.N, pl.bn);
  return pl;
}

// Products that share one left operand (same memory, shape and N), packed for MKL: a task packs
// one (piece, row tile) of it into its thread's scratch and multiplies up to kShare of the products
// with it, while it is in cache.
constexpr int64_t kShare = 2;                    // products per packing (x and y of a pair)
constexpr int64_t kMinPackedN = 32;              // narrower outputs: at::mm_out
constexpr int64_t kMaxPackedTile = 4LL << 20;    // bytes of one tile of the operand, at most
struct PackGroup {
  std::vector<size_t> members;  // products; the first one's a and plan describe every member's
  int64_t chunks() const { return (int64_t(members.size()) + kShare - 1) / kShare; }
};

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
  for (const auto& mm : mms) {
    check(mm);
    plans.push_back(make_plan(mm));
    Plan& pl = plans.back();
    if (pl.pieces > 1) pl.partial = at::empty({pl.pieces - 1, pl.M, pl.N}, mm.out.options());
  }

  // float32 products whose output is one column tile of at least kMinPackedN take MKL's packed
  // GEMM, in groups that share their left operand
  std::vector<PackGroup> groups;
  int64_t scratch_floats = 0;  // the largest packed tile, in floats, rounded to 64 bytes
  if (packed_gemm_available()) {
    std::map<std::tuple<const void*, int64_t, int64_t, int64_t, int64_t, int64_t>, int64_t> index;
    for (size_t i = 0; i < mms.size(); ++i) {
      const OrderedMM& mm = mms[i];
      Plan& pl = plans[i];
      if (mm.out.scalar_type() != at::kFloat || pl.tasks() == 0 || pl.R == 0 || pl.tn != 1 || pl.N < kMinPackedN ||
          pl.N > INT_MAX || !blas_view(mm.a).ok || !blas_view(mm.b).ok)
        continue;
      int64_t longest = 0;
      for (int64_t p = 0; p < pl.pieces; ++p) longest = std::max(longest, pl.piece_begin(p + 1) - pl.piece_begin(p));
      if (pl.bm * longest * 4 > kMaxPackedTile) continue;
      // MKL asks for far more than it writes (17 MB for a 50 x 4096 tile, of which it wrote the
      // first 1.3 MB here): the untouched pages of the pooled scratch are never mapped
      const int64_t bytes = int64_t(cblas_sgemm_pack_get_size(kAMatrix, int(pl.bm), int(pl.N), int(longest)));
      scratch_floats = std::max(scratch_floats, round_up(bytes, 64) / 4);
      const auto key = std::make_tuple(mm.a.data_ptr(), mm.a.size(0), mm.a.size(1), mm.a.stride(0), mm.a.stride(1),
                                       pl.N);
      auto it = index.find(key);
      if (it == index.end()) {
        it = index.emplace(key, int64_t(groups.size())).first;
        groups.emplace_back();
      }
      groups[it->second].members.push_back(i);
      pl.pack = it->second;
    }
  }
  // the tasks: (piece, row tile, chunk of kShare products) of each packed group, then (piece, tile)
  // of each other product
  std::vector<int64_t> first{0};  // first task of each unit: groups, then the products not packed
  std::vector<int64_t> unit_of;   // unit -> group index (< groups.size()) or groups.size() + product
  for (size_t g = 0; g < groups.size(); ++g) {
    const Plan& pl = plans[groups[g].members[0]];
    first.push_back(first.back() + pl.pieces * pl.tm * groups[g].chunks());
    unit_of.push_back(int64_t(g));
  }
  for (size_t i = 0; i < mms.size(); ++i) {
    if (plans[i].pack >= 0 || plans[i].tasks() == 0) continue;
    first.push_back(first.back() + plans[i].tasks());
    unit_of.push_back(int64_t(groups.size() + i));
  }
  // one packed tile per thread
  at::Tensor scratch;
  const int64_t scratch_slots = at::get_num_threads();
  if (!groups.empty()) scratch = pooled_empty_cpu({scratch_slots * scratch_floats}, mms[0].out.options());

  // the workers run ATen ops (the tile products) in the caller's state: inference mode (the outputs
  // are inference tensors there), below autograd, autocast excluded
  const at::ThreadLocalState tls;
  at::parallel_for(0, first.back(), 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard tls_guard(tls);
    OneBlasThread one;
    size_t u = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= first[u + 1]) ++u;
      const int64_t local = t - first[u];
      if (unit_of[u] < int64_t(groups.size())) {
#if AT_MKL_ENABLED()
        const PackGroup& grp = groups[unit_of[u]];
        const Plan& pl = plans[grp.members[0]];
        const at::Tensor& a = mms[grp.members[0]].a;
        const int64_t chunk = local % grp.chunks(), tile = local / grp.chunks();
        const int64_t p = tile / pl.tm, m0 = (tile % pl.tm) * pl.bm, lm = std::min(pl.bm, pl.M - m0);
        const int64_t r0 = pl.piece_begin(p), lr = pl.piece_begin(p + 1) - r0;
        const BlasView av = blas_view(a);
        const int64_t slot = at::get_thread_num();
        TORCH_INTERNAL_ASSERT(slot < scratch_slots);
        float* packed = scratch.data_ptr<float>() + slot * scratch_floats;
        cblas_sgemm_pack(kRowMajor, kAMatrix, av.trans ? kTrans : kNoTrans, int(lm), int(pl.N), int(lr), 1.0f,
                         a.data_ptr<float>() + m0 * a.stride(0) + r0 * a.stride(1), av.ld, packed);
        const size_t j1 = std::min(grp.members.size(), size_t((chunk + 1) * kShare));
        for (size_t j = size_t(chunk * kShare); j < j1; ++j) {
          const size_t i = grp.members[j];
          const OrderedMM& mm = mms[i];
          const BlasView bv = blas_view(mm.b);
          float* c = (p == 0 ? mm.out : plans[i].partial.select(0, p - 1)).data_ptr<float>() + m0 * pl.N;
          cblas_sgemm_compute(kRowMajor, kPacked, bv.trans ? kTrans : kNoTrans, int(lm), int(pl.N), int(lr), packed,
                              int(lr), mm.b.data_ptr<float>() + r0 * mm.b.stride(0), bv.ld, 0.0f, c, int(pl.N));
        }
#endif
        continue;
      }
      const size_t i = size_t(unit_of[u]) - groups.size();
      const Plan& pl = plans[i];
      const OrderedMM& mm = mms[i];
      const int64_t per_piece = pl.tm * pl.tn;
      const int64_t p = local / per_piece, tile = local % per_piece;
      const int64_t m0 = (tile / pl.tn) * pl.bm, n0 = (tile % pl.tn) * pl.bn;
      const int64_t lm = std::min(pl.bm, pl.M - m0), ln = std::min(pl.bn, pl.N - n0);
      const int64_t r0 = pl.piece_begin(p), lr = pl.piece_begin(p + 1) - r0;
      at::Tensor dst = (p == 0 ? mm.out : pl.partial.select(0, p - 1)).narrow(0, m0, lm).narrow(1, n0, ln);
      at::mm_out(dst, mm.a.detach().narrow(0, m0, lm).narrow(1, r0, lr),
                 mm.b.detach().narrow(0, r0, lr).narrow(1, n0, ln));
    }
  });
  // out += partial[0] + partial[1] + ..., left to right for every element: one pass over the outputs
  // of every split product (a few thousand elements each for the projections: a parallel region
  // per product cost more than the additions, on a loaded machine a scheduler tick each)
  std::vector<int64_t> split_first{0};  // first element of each split product in that pass
  std::vector<size_t> split;
  for (size_t i = 0; i < mms.size(); ++i)
    if (plans[i].pieces > 1) split.push_back(i), split_first.push_back(split_first.back() + plans[i].M * plans[i].N);
  at::parallel_for(0, split_first.back(), 1 << 16, [&](int64_t e0, int64_t e1) {
    for (size_t j = 0; j < split.size(); ++j) {
      const int64_t lo = std::max(e0, split_first[j]), hi = std::min(e1, split_first[j + 1]);
      if (lo >= hi) continue;
      const Plan& pl = plans[split[j]];
      const int64_t outs = pl.M * pl.N, a = lo - split_first[j], b = hi - split_first[j];
      AT_DISPATCH_FLOATING_TYPES(pl.partial.scalar_type(), "ordered_mm_cpu", [&] {
        scalar_t* o = mms[split[j]].out.data_ptr<scalar_t>();
        const scalar_t* q = pl.partial.data_ptr<scalar_t>();
        for (int64_t p = 0; p + 1 < pl.pieces; ++p) {
          const scalar_t* s = q + p * outs;
          for (int64_t e = a; e < b; ++e) o[e] += s[e];
        }
      });
    }
  });
}

}  // namespace pyengine

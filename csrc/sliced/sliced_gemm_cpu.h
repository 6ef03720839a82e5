// The matrix products of the sliced Wasserstein ops on the CPU (the projections, and the mean's
// backward) with float sums whose order does not depend on the thread count.
//
// A BLAS GEMM splits its work by the number of threads it runs on, and where the output is small
// next to the reduction (the projections: K x n outputs, each a sum over d = C*H*W features) it
// splits the sum itself, so torch.set_num_threads(1) and (2) gave results a few ulps apart. Here
// every product is cut into tiles - output blocks, and pieces of the reduction when it is long -
// whose boundaries depend only on the shapes; each tile is one BLAS call on one thread, the threads
// share the tiles, and the pieces' partial products are added in piece order. The tiles also make
// long thin products (which BLAS keeps on one thread) parallel. With MKL (torch's x86 builds) each
// tile runs with MKL's thread-local count at 1 - its kernel choice follows that count - and float32
// tiles of narrow outputs go through MKL's packed GEMM, whose kernel is the fast one on one thread;
// elsewhere plain at::mm_out per tile.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace pyengine {

struct OrderedMM {
  at::Tensor out;  // (M, N), contiguous, on the CPU: written
  at::Tensor a;    // (M, R), any strides
  at::Tensor b;    // (R, N), any strides
};

// out = a @ b for every product, in one parallel pass over all their tiles; bitwise the same
// result on any number of threads. float32 / float64; runs on detached views of the operands.
void ordered_mm_cpu(const std::vector<OrderedMM>& mms);

}  // namespace pyengine

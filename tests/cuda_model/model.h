// A CPU model of the CUDA execution model, so that kernel sources can be run and checked on a
// machine without a GPU (tests/test_cuda_model.py; never part of the extension).
//
// Every thread of a block is a std::thread; the blocks of a grid run one after another on the same
// threads. __syncthreads is a barrier of the block; __syncwarp, shuffles and ballots meet at a
// barrier of the warp. The WMMA loads, products and stores do not synchronise (each lane reads the
// whole tile and writes its share), so a kernel that forgets a synchronisation reads racing data
// here, which ThreadSanitizer reports, as it would on a GPU. Fragments hold the whole tile in every
// lane: CUDA leaves their layout opaque, so any layout is a faithful model; loads and stores check
// the pointer alignment and leading dimension WMMA requires. Dynamic shared memory is a heap buffer
// of exactly the launch's size, refilled with garbage for each block (AddressSanitizer reports an
// access past it), and a launch above 48 KB needs the kernel's cudaFuncSetAttribute first; static
// __shared__ arrays are function-local statics. Launches (PYENGINE_LAUNCH) run the grid at once;
// the runtime calls the launchers make answer for a small device (4 multiprocessors, so grid-stride
// loops take several turns). Device atomics are host atomics.
//
// A .cu file runs here when its launchers use PYENGINE_LAUNCH and PYENGINE_DYNAMIC_SMEM
// (common/device.cuh) and it keeps what needs nvcc (CUB) under #ifndef PYENGINE_KERNEL_MODEL.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
// a static __shared__ array becomes a function-local static: one per kernel instantiation, seen by
// every thread of the block (blocks run one at a time)
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__
#define PYENGINE_DYNAMIC_SMEM(name, align) unsigned char* name = ::model::t_smem
#define PYENGINE_LAUNCH(grid, block, smem, stream, ...) ::model::Launch(grid, block, smem, __VA_ARGS__)

namespace model {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda model: %s\n", what);
  std::abort();
}

struct Warp {
  std::barrier<> bar{32};
  alignas(16) unsigned char slot[32][16];
};

inline thread_local uint3 t_thread, t_block;
inline thread_local dim3 t_block_dim, t_grid_dim;
inline thread_local Warp* t_warp = nullptr;
inline thread_local int t_lane = 0;
inline thread_local std::barrier<>* t_block_bar = nullptr;
inline thread_local unsigned char* t_smem = nullptr;

// Runs body() as every thread of every block of the grid. One std::thread per thread of a block
// runs the blocks one after another (a block barrier between two blocks, the shared memory
// refilled with garbage for the next).
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads % 32 != 0 || nthreads > 1024) fail("block size must be a multiple of 32, at most 1024");
  const size_t nblocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
  if (nblocks == 0) return;
  unsigned char* smem = smem_bytes ? new (std::align_val_t(128)) unsigned char[smem_bytes] : nullptr;
  if (smem) std::memset(smem, 0xFF, smem_bytes);  // never zero by luck: NaN in every float type, -1 in every integer
  std::barrier<> block_bar(static_cast<std::ptrdiff_t>(nthreads));
  std::vector<std::unique_ptr<Warp>> warps;
  for (unsigned w = 0; w < nthreads / 32; ++w) warps.push_back(std::make_unique<Warp>());
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < nthreads; ++t) {
    threads.emplace_back([&, t] {
      t_thread = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      t_block_dim = block;
      t_grid_dim = grid;
      t_warp = warps[t / 32].get();
      t_lane = static_cast<int>(t % 32);
      t_block_bar = &block_bar;
      t_smem = smem;
      for (size_t b = 0; b < nblocks; ++b) {
        t_block = make_uint3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                             static_cast<unsigned>(b / (static_cast<size_t>(grid.x) * grid.y)));
        body();
        block_bar.arrive_and_wait();  // the block is done
        if (t == 0 && smem) std::memset(smem, 0xFF, smem_bytes);
        block_bar.arrive_and_wait();  // the next block starts on fresh garbage
      }
    });
  }
  for (auto& th : threads) th.join();
  if (smem) ::operator delete[](smem, std::align_val_t(128));
}

// Dynamic shared memory a kernel may use: 48 KB, or what cudaFuncSetAttribute raised it to (a
// launch above that fails on a GPU).
inline std::mutex attr_mu;
inline std::map<const void*, size_t> smem_limit;
inline void set_smem_limit(const void* f, size_t bytes) {
  std::lock_guard<std::mutex> lock(attr_mu);
  smem_limit[f] = bytes;
}
inline void check_smem(const void* f, size_t bytes) {
  std::lock_guard<std::mutex> lock(attr_mu);
  const auto it = smem_limit.find(f);
  const size_t limit = it == smem_limit.end() ? 48 * 1024 : it->second;
  if (bytes > limit) fail("launch asks for more dynamic shared memory than the kernel's limit (cudaFuncSetAttribute)");
}

// kernel<<<grid, block, smem>>>(args...) as model::Launch(grid, block, smem, kernel)(args...)
template <typename F>
struct Launch {
  dim3 grid, block;
  size_t smem;
  F* kernel;
  Launch(dim3 g, dim3 b, size_t s, F* k) : grid(g), block(b), smem(s), kernel(k) {}
  template <typename... A>
  void operator()(A... args) const {
    check_smem(reinterpret_cast<const void*>(kernel), smem);
    launch(grid, block, smem, [&] { kernel(args...); });
  }
};
template <typename F>
Launch(dim3, dim3, size_t, F*) -> Launch<F>;

// The device the launchers ask about: few multiprocessors, so grid-stride loops take several turns.
inline int sm_count = 4;
inline int smem_optin = 232448;  // an H100's opt-in limit per block
inline int cc_major = 9;
inline int ptx_version = 90;  // the PTX architecture of the image a kernel runs (cudaFuncGetAttributes)

template <typename T>
T exchange(T v, int src, bool keep_own) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  std::memcpy(t_warp->slot[t_lane], &v, sizeof(T));
  t_warp->bar.arrive_and_wait();
  T r = v;
  if (!keep_own) std::memcpy(&r, t_warp->slot[src & 31], sizeof(T));
  t_warp->bar.arrive_and_wait();  // the slots are free again
  return r;
}

// The warp's predicates as a bit mask (lane l at bit l).
inline unsigned ballot(bool p) {
  t_warp->slot[t_lane][0] = p ? 1 : 0;
  t_warp->bar.arrive_and_wait();
  unsigned all = 0;
  for (int l = 0; l < 32; ++l)
    if (t_warp->slot[l][0]) all |= 1u << l;
  t_warp->bar.arrive_and_wait();
  return all;
}

}  // namespace model

#define threadIdx (::model::t_thread)
#define blockIdx (::model::t_block)
#define blockDim (::model::t_block_dim)
#define gridDim (::model::t_grid_dim)

inline void __syncthreads() { model::t_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) model::fail("__syncwarp with a partial mask is not modelled");
  model::t_warp->bar.arrive_and_wait();
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) { return model::exchange(v, src, false); }
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d) {
  const int src = model::t_lane - static_cast<int>(d);
  return model::exchange(v, src, src < 0);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int m) { return model::exchange(v, model::t_lane ^ m, false); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
// SIMD video intrinsics on the two 16-bit halves of a 32-bit word (as CUDA defines them)
namespace model {
template <typename F>
inline unsigned per_half(unsigned a, unsigned b, F f) {
  const unsigned lo = f(a & 0xffffu, b & 0xffffu) & 0xffffu, hi = f(a >> 16, b >> 16) & 0xffffu;
  return lo | (hi << 16);
}
}  // namespace model
inline unsigned __vsub2(unsigned a, unsigned b) { return model::per_half(a, b, [](unsigned x, unsigned y) { return x - y; }); }
inline unsigned __vmaxu2(unsigned a, unsigned b) { return model::per_half(a, b, [](unsigned x, unsigned y) { return x > y ? x : y; }); }
inline unsigned __vsetleu2(unsigned a, unsigned b) { return model::per_half(a, b, [](unsigned x, unsigned y) { return x <= y ? 1u : 0u; }); }
inline unsigned __vsetgtu2(unsigned a, unsigned b) { return model::per_half(a, b, [](unsigned x, unsigned y) { return x > y ? 1u : 0u; }); }
inline unsigned __vseteq2(unsigned a, unsigned b) { return model::per_half(a, b, [](unsigned x, unsigned y) { return x == y ? 1u : 0u; }); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __ballot_sync(unsigned, int p) { return model::ballot(p != 0); }
inline int atomicCAS(int* p, int cmp, int val) {
  __atomic_compare_exchange_n(p, &cmp, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline int atomicExch(int* p, int val) { return __atomic_exchange_n(p, val, __ATOMIC_SEQ_CST); }
template <typename T>
T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline bool __all_sync(unsigned, int p) { return model::ballot(p != 0) == 0xffffffffu; }
inline bool __any_sync(unsigned, int p) { return model::ballot(p != 0) != 0u; }
// redux.sync.add.u32 (sm_80): the sum over the warp, in every lane (full mask only)
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  if (mask != 0xffffffffu) model::fail("__reduce_add_sync with a partial mask is not modelled");
  unsigned sum = 0;
  for (int l = 0; l < 32; ++l) sum += model::exchange(v, l, false);
  return sum;
}
template <typename T>
T __ldg(const T* p) { return *p; }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof(d));
  return d;
}

namespace model {
inline float to_float_any(float x) { return x; }
inline float to_float_any(__half x) { return __half2float(x); }
inline float to_float_any(__nv_bfloat16 x) { return __bfloat162float(x); }
}  // namespace model

// ---- the CUDA runtime calls of the launchers, answered for the modelled device
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = model::sm_count; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = model::smem_optin; break;
    case cudaDevAttrComputeCapabilityMajor: *v = model::cc_major; break;
    default: model::fail("cudaDeviceGetAttribute: attribute not modelled");
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > model::smem_optin) return cudaErrorInvalidValue;
  model::set_smem_limit(f, static_cast<size_t>(value));
  return cudaSuccess;
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void*) {
  *a = cudaFuncAttributes{};
  a->ptxVersion = a->binaryVersion = model::ptx_version;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, const void*, int, size_t, unsigned) {
  *n = 2;
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
}

// the C++ overloads cuda_runtime.h declares for nvcc only
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F* f) {
  return cudaFuncGetAttributes(a, reinterpret_cast<const void*>(f));
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), attr, value);
}
template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* f, int block, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(n, reinterpret_cast<const void*>(f), block, smem, 0);
}

// ---- WMMA (16 x 16 x 16, half / bfloat16 inputs, float accumulator)
namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the model has the 16 x 16 x 16 shape only");
  float v[16][16];  // A: (m, k), B: (k, n), C: (m, n) - the whole tile in every lane
};

using model::to_float_any;

inline void check_mem(const void* p, unsigned ld, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) model::fail("WMMA pointer not 256-bit aligned");
  if ((ld * elem) % 16 != 0) model::fail("WMMA leading dimension not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  check_mem(p, ld, sizeof(T));
  // every lane reads the whole tile, with no barrier before or after: data written by other lanes
  // must have been published by the kernel's own __syncwarp (otherwise ThreadSanitizer reports it)
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.v[i][j] = to_float_any(std::is_same_v<Layout, row_major> ? p[i * ld + j] : p[j * ld + i]);
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float r[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int q = 0; q < 16; ++q) s += a.v[i][q] * b.v[q][j];
      r[i][j] = s;
    }
  std::memcpy(d.v, r, sizeof(r));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld,
                              layout_t layout) {
  check_mem(p, ld, sizeof(float));
  // each lane writes its own share (element e goes to lane e % 32), as the hardware's lanes do
  for (int e = model::t_lane; e < 256; e += 32) {
    const int i = e / 16, j = e % 16;
    (layout == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.v[i][j];
  }
}

}  // namespace wmma
}  // namespace nvcuda

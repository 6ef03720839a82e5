// A reuse pool for the large CPU outputs of backward ops.
//
// PyTorch's CPU allocator hands large requests straight to the C library, which maps fresh
// memory for each and unmaps it on free, so a 32 MiB gradient written anew each training step
// pays a page fault on every 4 KiB page - about 16 ms per 32 MiB on the 2-core test VM, more
// than the arithmetic that fills it. Outputs from pooled_empty_cpu() return their block to a
// process-wide pool when the tensor dies (its deleter), and the next request of the same byte
// size gets that block back, already mapped. The pool holds no reference to a live tensor: an
// output is an ordinary, uniquely owned tensor (autograd may take it over as .grad), and its
// memory is reused only after its storage is destroyed.
//
// Idle blocks are capped at PYENGINE_CPU_POOL_MB MiB (default 512; 0 turns pooling off);
// pyengine.ops.empty_cpu_cache() frees them, as torch.cuda.empty_cache() does on a GPU.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace pyengine {

// Uninitialised contiguous CPU tensor; blocks of at least 4 MiB come from the pool.
at::Tensor pooled_empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace pyengine

extern "C" {
// stats[0..4] = idle bytes, idle blocks, bytes handed out and alive, hits, misses
void pyengine_cpu_pool_stats(int64_t* stats);
// Frees every idle block; returns the bytes freed.
int64_t pyengine_cpu_pool_release();
}

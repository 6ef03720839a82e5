// pyengine._C: the one place where every operator schema is declared.
// Implementations register per dispatch key: the CPU kernels in csrc/<family>/<family>_cpu.cpp,
// the CUDA glue in csrc/<family>/*_glue.cpp (families: masked, entropy, sliced).
// The semantics of each op are documented next to its pure-PyTorch reference in pyengine/ops/.
#include <Python.h>
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>

TORCH_LIBRARY(pyengine, m) {
  // ---- masked / sparse linear (pyengine/ops/masked.py) ----
  // y = x (W*M)^T + b for 2-D x (M, K), W (N, K), bool mask M (N, K).
  m.def("masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias) -> Tensor");
  // (dx, dW, db); a gradient that is not asked for comes back as an empty tensor.
  m.def(
      "masked_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, "
      "bool need_x, bool need_w, bool need_b) -> (Tensor, Tensor, Tensor)");
  // CSR of W: (rowptr int32 [N+1], colidx int16 if K < 32768 else int32, values [nnz]).
  m.def("pack_sparse(Tensor weight) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sparse_linear(Tensor x, Tensor rowptr, Tensor colidx, Tensor values, int in_features, "
      "Tensor? bias) -> Tensor");
  // The same product with W in 16 x 64 bitmap tiles (csrc/masked/bitmap_kernels.h): bitmap int32
  // [tiles * 32], offsets int32 [tiles + 1], values [nnz]; in_features is x's last dimension.
  m.def(
      "sparse_linear_bitmap(Tensor x, Tensor bitmap, Tensor offsets, Tensor values, int out_features, "
      "Tensor? bias) -> Tensor");
  // tensors[i][masks[mask_index[i]] == 0] = 0 for every i, in one call.
  m.def("apply_masks_(Tensor(a!)[] tensors, Tensor[] masks, int[] mask_index) -> ()");

  // ---- entropy statistics (pyengine/ops/entropy.py) ----
  // (counts int64, nan_count int64 scalar). counts[c] = #samples with x ON for neuron c.
  m.def(
      "entropy_counts(Tensor x, int channel_dim, bool per_position, bool inclusive) "
      "-> (Tensor, Tensor)");
  // counts += ON counts of x, nan_count += NaNs of x, in place: no allocation, no host sync (the
  // accumulation a training-time collector needs).
  m.def(
      "entropy_counts_add_(Tensor(a!) counts, Tensor(b!) nan_count, Tensor x, int channel_dim, "
      "bool per_position, bool inclusive) -> ()");
  // entropy_counts_add_ for many tensors in one call (one launch per dtype on CUDA): counts[i] +=
  // ON counts of xs[i] along channel_dims[i], nan_count += NaNs of all (a collector's per-forward flush).
  m.def(
      "entropy_counts_add_many_(Tensor(a!)[] counts, Tensor(b!) nan_count, Tensor[] xs, int[] channel_dims, "
      "bool per_position, bool inclusive) -> ()");
  // relu(x), with the ON counts of x added into counts / nan_count in the same pass over x.
  m.def(
      "relu_count(Tensor x, Tensor(a!) counts, Tensor(b!) nan_count, int channel_dim, bool per_position, "
      "bool inclusive) -> Tensor");
  // (per-neuron entropy float32, summary float64 [mean_all, mean_nonconstant, n_on, n_off]).
  m.def("entropy_from_counts(Tensor counts, int n_samples, float eps) -> (Tensor, Tensor)");

  // ---- sliced Wasserstein (pyengine/ops/sliced.py) ----
  // x, y (B, n, d); theta (K, d) -> (dist [B], cx, cy, win); cx/cy are d dist / d projection.
  m.def(
      "sliced_wasserstein_fwd(Tensor x, Tensor y, Tensor theta, float p, bool use_max, "
      "bool need_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // (gx, gy) (B, n, d) from the forward's cx/cy: gx[b] = grad[b] * cx[b] @ theta, where for the
  // max cx is (B, n, 1) and theta[win[b]] stands in for theta. Unrequested outputs come back empty.
  m.def(
      "sliced_wasserstein_bwd(Tensor grad, Tensor cx, Tensor cy, Tensor theta, Tensor win, bool use_max, "
      "bool need_x, bool need_y) -> (Tensor, Tensor)");
  // G pairs of different dimensions at once (LaCoOT's block pairs): xs[g], ys[g] (n, d_g) with one n;
  // theta (K, sum d_g), pair g projected on its column block of every row (each block scaled to a
  // unit vector when normalize) -> dist (G,). One autograd node (csrc/sliced/sliced_grouped_autograd.cpp).
  m.def(
      "sliced_wasserstein_grouped(Tensor[] xs, Tensor[] ys, Tensor theta, float p, bool use_max, "
      "bool normalize) -> Tensor");
  // out (K, d) <- K random unit directions (normalize) or standard normals, from a counter-based
  // generator keyed by seed: the same values for a seed on any thread count (layout in
  // csrc/sliced/directions_simd.inc). CPU only; on CUDA torch.randn already draws on the device.
  m.def("fill_directions_(Tensor(a!) out, int seed, bool normalize) -> ()");
  // The same with the seed in a one-element int64 CPU tensor: what random_directions passes, so that
  // a key drawn from a generator stays a tensor under torch.compile (an int drawn from a tensor is
  // data-dependent there, and fullgraph tracing cannot pass it to an int argument).
  m.def("fill_directions_keyed_(Tensor(a!) out, Tensor seed, bool normalize) -> ()");
}

extern "C" {
int pyengine_cuda_compiled();
void pyengine_cpu_pool_stats(int64_t* stats);
int64_t pyengine_cpu_pool_release();
int pyengine_take_device_error(int device, int sync, char* buf, int len);
void pyengine_masked_cache_info(int64_t* out);
int64_t pyengine_masked_cache_clear();
}

static PyObject* cuda_compiled(PyObject*, PyObject*) {
  return PyBool_FromLong(pyengine_cuda_compiled());
}

static PyObject* cpu_pool_stats(PyObject*, PyObject*) {
  int64_t s[5];
  pyengine_cpu_pool_stats(s);
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L}", "idle_bytes", (long long)s[0], "idle_blocks", (long long)s[1],
                       "live_bytes", (long long)s[2], "hits", (long long)s[3], "misses", (long long)s[4]);
}

static PyObject* cpu_pool_release(PyObject*, PyObject*) {
  return PyLong_FromLongLong((long long)pyengine_cpu_pool_release());
}

// take_device_error(device, sync) -> str: the message of an index error a CUDA kernel recorded
// on `device` ("" if none), clearing it; with sync, after synchronising the device.
static PyObject* take_device_error(PyObject*, PyObject* args) {
  int device = 0, sync = 0;
  if (!PyArg_ParseTuple(args, "ip", &device, &sync)) return nullptr;
  char buf[1024];
  int n;
  Py_BEGIN_ALLOW_THREADS
  n = pyengine_take_device_error(device, sync, buf, static_cast<int>(sizeof(buf)));
  Py_END_ALLOW_THREADS
  return PyUnicode_FromStringAndSize(buf, n);
}

static PyObject* masked_cache_info(PyObject*, PyObject*) {
  int64_t s[5];
  pyengine_masked_cache_info(s);
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L}", "entries", (long long)s[0], "bytes", (long long)s[1], "hits",
                       (long long)s[2], "misses", (long long)s[3], "limit_bytes", (long long)s[4]);
}

static PyObject* masked_cache_clear(PyObject*, PyObject*) {
  return PyLong_FromLongLong((long long)pyengine_masked_cache_clear());
}

static PyMethodDef methods[] = {
    {"cuda_compiled", cuda_compiled, METH_NOARGS,
     "True when this build contains the CUDA kernels."},
    {"cpu_pool_stats", cpu_pool_stats, METH_NOARGS,
     "The CPU output pool: idle_bytes, idle_blocks, live_bytes, hits, misses."},
    {"cpu_pool_release", cpu_pool_release, METH_NOARGS, "Frees the CPU output pool's idle blocks; returns bytes."},
    {"take_device_error", take_device_error, METH_VARARGS,
     "take_device_error(device, sync): a pending CUDA index error's message ('' if none), cleared."},
    {"masked_cache_info", masked_cache_info, METH_NOARGS, "The CUDA masked-weight cache: entries, bytes, hits, misses."},
    {"masked_cache_clear", masked_cache_clear, METH_NOARGS, "Empties the CUDA masked-weight cache; returns bytes."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                        "pyengine native operators (registered in torch.ops.pyengine)",
                                        -1, methods};

// PYENGINE_SEGV_TRACE=1: on a segmentation fault, print the native backtrace (offsets into this
// library, for addr2line) before handing the signal to the previous handler (faulthandler).
static struct sigaction g_prev_segv;
static void segv_trace(int sig, siginfo_t* info, void*) {
  char buf[128];
  const int n = snprintf(buf, sizeof(buf), "\n[pyengine] signal %d at address %p; native backtrace:\n", sig,
                         info ? info->si_addr : nullptr);
  if (n > 0) (void)!write(2, buf, static_cast<size_t>(n));
  void* frames[64];
  const int k = backtrace(frames, 64);
  backtrace_symbols_fd(frames, k, 2);
  sigaction(SIGSEGV, &g_prev_segv, nullptr);  // returning re-raises the fault into the previous handler
}

PyMODINIT_FUNC PyInit__C(void) {
  const char* v = std::getenv("PYENGINE_SEGV_TRACE");
  if (v && *v == '1') {
    struct sigaction sa = {};
    sa.sa_sigaction = segv_trace;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_prev_segv);
  }
  return PyModule_Create(&module_def);
}

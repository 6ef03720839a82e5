// Tells Python whether this build carries the CUDA kernels.
extern "C" int pyengine_cuda_compiled() {
#ifdef PYENGINE_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

// The *_cuda entry points of a build without CUDA: every one reports IMF_ERR_NO_CUDA, so the
// C ABI (and the Python module) is the same whether or not nvcc was found.
#include "imaml_fast/imaml_fast.h"

extern "C" {

int prox_update_cuda(int, const void*, const void*, const void*, int, void*, int64_t, int64_t,
                     double, double, void*) {
  return IMF_ERR_NO_CUDA;
}

int batched_dot_cuda(int, const void*, const void*, void*, int64_t, int64_t, void*, size_t,
                     void*) {
  return IMF_ERR_NO_CUDA;
}

int cg_update_cuda(int, void*, void*, void*, const void*, void*, int8_t*, int64_t*, const void*,
                   int64_t, int64_t, void*, size_t, void*) {
  return IMF_ERR_NO_CUDA;
}

int dense_cg_cuda(int, const void*, const void*, void*, int64_t*, void*, int8_t*, int64_t,
                  int64_t, double, double, int64_t, double, void*, size_t, void*) {
  return IMF_ERR_NO_CUDA;
}

int bn_double_backward_cuda(int, const void*, const void*, const void*, const void*, const void*,
                            const void*, const void*, const void*, void*, void*, void*, int64_t,
                            int64_t, int64_t, void*) {
  return IMF_ERR_NO_CUDA;
}

}  // extern "C"

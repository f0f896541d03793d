// CPU twins of the elementwise / reduction kernels: prox_update_cpu and batched_dot_cpu.
#include "../common.h"
#include "cpu_common.h"

using namespace imaml_fast;
using namespace imaml_fast::cpu;

namespace {

template <typename T>
void prox_update_impl(const T* phi, const T* g, const T* theta, bool per_task, T* out, int64_t nT,
                      int64_t P, T lr, T lam) {
  for_tasks(nT, P, [&](int64_t t) {
    const int64_t row = t * P;
    const T* th = per_task ? theta + row : theta;
    for (int64_t i = 0; i < P; ++i) {
      // The reference's order of operations: phi - lr * (g + lam * (phi - theta)).
      const T ph = phi[row + i];
      const T d = ph - th[i];
      const T u = g[row + i] + lam * d;
      out[row + i] = ph - lr * u;
    }
  });
}

template <typename T>
void batched_dot_impl(const T* a, const T* b, T* out, int64_t nT, int64_t P) {
  for_tasks(nT, P, [&](int64_t t) {
    const T* at = a + t * P;
    const T* bt = b + t * P;
    Lanes<T> s;
    lane_loop(P, [&](int64_t i, int k) { s.v[k] += at[i] * bt[i]; });
    out[t] = s.sum();
  });
}

}  // namespace

extern "C" {

int prox_update_cpu(int dtype, const void* phi, const void* g, const void* theta,
                    int theta_per_task, void* out, int64_t T, int64_t P, double lr, double lam) {
  if (!sizes_ok(T, P)) return IMF_ERR_SIZE;
  if (T * P == 0) return IMF_OK;
  if (!phi || !g || !theta || !out) return IMF_ERR_NULL;
  switch (dtype) {
    case IMF_FLOAT32:
      prox_update_impl(static_cast<const float*>(phi), static_cast<const float*>(g),
                       static_cast<const float*>(theta), theta_per_task != 0,
                       static_cast<float*>(out), T, P, static_cast<float>(lr),
                       static_cast<float>(lam));
      return IMF_OK;
    case IMF_FLOAT64:
      prox_update_impl(static_cast<const double*>(phi), static_cast<const double*>(g),
                       static_cast<const double*>(theta), theta_per_task != 0,
                       static_cast<double*>(out), T, P, lr, lam);
      return IMF_OK;
    default:
      return IMF_ERR_DTYPE;
  }
}

int batched_dot_cpu(int dtype, const void* a, const void* b, void* out, int64_t T, int64_t P) {
  if (!sizes_ok(T, P)) return IMF_ERR_SIZE;
  if (T == 0) return IMF_OK;
  if (!out || (P > 0 && (!a || !b))) return IMF_ERR_NULL;
  switch (dtype) {
    case IMF_FLOAT32:
      batched_dot_impl(static_cast<const float*>(a), static_cast<const float*>(b),
                       static_cast<float*>(out), T, P);
      return IMF_OK;
    case IMF_FLOAT64:
      batched_dot_impl(static_cast<const double*>(a), static_cast<const double*>(b),
                       static_cast<double*>(out), T, P);
      return IMF_OK;
    default:
      return IMF_ERR_DTYPE;
  }
}

}  // extern "C"

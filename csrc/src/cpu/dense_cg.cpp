// CPU twin of dense_cg_cuda: the whole classic CG solve of (shift I + scale H_t) x = b_t from
// x0 = 0, one task after another, with the status semantics of imaml_fast.cg.cg_solve +
// cg_update_ref (flags, first-iteration steepest-descent step, last finite iterate kept).
#include <cmath>
#include <vector>

#include "../cg_scalars.h"
#include "../common.h"
#include "cpu_common.h"

using namespace imaml_fast;
using namespace imaml_fast::cpu;

namespace {

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  Lanes<T> s;
  lane_loop(n, [&](int64_t i, int k) { s.v[k] += a[i] * b[i]; });
  return s.sum();
}

template <typename T>
void dense_cg_impl(const T* H, const T* b, T* x, int64_t* iters_out, T* residual,
                   int8_t* status_out, int64_t nT, int64_t P, T shift, T scale,
                   int64_t max_iter, T tol2) {
  // Each task's work is P^2 per iteration: that is the size for_tasks weighs.
  for_tasks(nT, P * P, [&](int64_t t) {
    std::vector<T> rbuf(P), pbuf(P), qbuf(P);  // per task: tasks may run on other threads
    const T* Ht = H + t * P * P;
    const T* bt = b + t * P;
    T* xt = x + t * P;
    T* r = rbuf.data();
    T* p = pbuf.data();
    T* q = qbuf.data();  // A p, then the candidate r_new
    for (int64_t i = 0; i < P; ++i) {
      xt[i] = T(0);
      r[i] = bt[i];
      p[i] = bt[i];
    }
    T rs = dot(bt, bt, P);
    const T thresh = tol2 * rs;
    int8_t status = 0;
    if (rs <= thresh) status = 1;
    if (!imf_finite(rs)) status = 3;
    int64_t iters = 0;
    for (int64_t k = 0; k < max_iter && status == 0; ++k) {
      for (int64_t i = 0; i < P; ++i) q[i] = shift * p[i] + scale * dot(Ht + i * P, p, P);
      const T pAp = dot(p, q, P);
      if (!imf_finite(pAp)) {
        status = 3;
        break;
      }
      if (!(pAp > T(0))) {
        status = 2;
        if (iters == 0)  // steepest-descent step x0 + r0 (= b)
          for (int64_t i = 0; i < P; ++i) xt[i] = xt[i] + p[i];
        break;
      }
      const T alpha = rs / pAp;
      for (int64_t i = 0; i < P; ++i) q[i] = r[i] - alpha * q[i];
      const T rs_new = dot(q, q, P);
      if (!imf_finite(rs_new)) {  // keep the last finite iterate
        status = 3;
        break;
      }
      for (int64_t i = 0; i < P; ++i) xt[i] = xt[i] + alpha * p[i];
      ++iters;
      T* tmp = r;
      r = q;
      q = tmp;
      if (rs_new <= thresh) {
        rs = rs_new;
        status = 1;
        break;
      }
      const T beta = rs_new / rs;
      for (int64_t i = 0; i < P; ++i) p[i] = r[i] + beta * p[i];
      rs = rs_new;
    }
    iters_out[t] = iters;
    residual[t] = std::sqrt(rs);
    status_out[t] = status;
  });
}

}  // namespace

extern "C" int dense_cg_cpu(int dtype, const void* H, const void* b, void* x, int64_t* iters,
                            void* residual, int8_t* status, int64_t T, int64_t P, double shift,
                            double scale, int64_t max_iter, double tol) {
  if (!dense_sizes_ok(T, P)) return IMF_ERR_SIZE;
  if (max_iter < 0 || !(tol >= 0)) return IMF_ERR_ARG;
  if (T == 0) return IMF_OK;
  if (!iters || !residual || !status) return IMF_ERR_NULL;
  if (P > 0 && (!H || !b || !x)) return IMF_ERR_NULL;
  switch (dtype) {
    case IMF_FLOAT32:
      dense_cg_impl(static_cast<const float*>(H), static_cast<const float*>(b),
                    static_cast<float*>(x), iters, static_cast<float*>(residual), status, T, P,
                    static_cast<float>(shift), static_cast<float>(scale), max_iter,
                    static_cast<float>(tol * tol));
      return IMF_OK;
    case IMF_FLOAT64:
      dense_cg_impl(static_cast<const double*>(H), static_cast<const double*>(b),
                    static_cast<double*>(x), iters, static_cast<double*>(residual), status, T,
                    P, shift, scale, max_iter, tol * tol);
      return IMF_OK;
    default:
      return IMF_ERR_DTYPE;
  }
}

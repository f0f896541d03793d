// CPU twin of the fused masked CG iteration (cg_update_cuda): the same two passes and the
// same scalar stage (../cg_scalars.h), one task after another.
#include <cmath>
#include <limits>

#include "../cg_scalars.h"
#include "../common.h"
#include "cpu_common.h"

using namespace imaml_fast;
using namespace imaml_fast::cpu;

namespace {

template <typename T>
void cg_update_impl(T* x, T* r, T* p, const T* Ap, T* rs, int8_t* status, int64_t* iters,
                    const T* thresh, int64_t nT, int64_t P) {
  const T norm_limit = std::sqrt(std::numeric_limits<T>::max()) / T(4);
  const T elem_limit = std::numeric_limits<T>::max() / T(2);
  for_tasks(nT, P, [&](int64_t t) {
    if (status[t] != 0) return;  // finished tasks are not touched at all
    T* xt = x + t * P;
    T* rt = r + t * P;
    T* pt = p + t * P;
    const T* at = Ap + t * P;

    // Pass 1: p.Ap, r.Ap, Ap.Ap, max|r|, max|Ap|.
    Lanes<T> pAp, rAp, ApAp;
    T rmax = T(0), apmax = T(0);
    lane_loop(P, [&](int64_t i, int k) {
      const T pi = pt[i], ai = at[i], ri = rt[i];
      pAp.v[k] += pi * ai;
      rAp.v[k] += ri * ai;
      ApAp.v[k] += ai * ai;
      rmax = max_of(rmax, abs_of(ri));
      apmax = max_of(apmax, abs_of(ai));
    });
    const CgStep<T> s = cg_scalars<T>(status[t], iters[t], rs[t], pAp.sum(), rAp.sum(),
                                      ApAp.sum(), rmax, apmax, norm_limit, elem_limit);
    const T alpha = s.alpha, beta = s.beta;

    // Pass 2.
    T rs_new = T(0);
    if ((s.flags & kCgOk) && !(s.flags & kCgRisky)) {
      Lanes<T> rr;
      lane_loop(P, [&](int64_t i, int k) {
        const T pi = pt[i];
        xt[i] = xt[i] + alpha * pi;
        const T rn = rt[i] - alpha * at[i];
        rt[i] = rn;
        pt[i] = rn + beta * pi;
        rr.v[k] += rn * rn;
      });
      rs_new = rr.sum();
    } else if (s.flags & kCgOk) {  // risky: only measure the new residual
      Lanes<T> rr;
      lane_loop(P, [&](int64_t i, int k) {
        const T rn = rt[i] - alpha * at[i];
        rr.v[k] += rn * rn;
      });
      rs_new = rr.sum();
    } else if (s.flags & kCgFirstNegative) {
      for (int64_t i = 0; i < P; ++i) xt[i] = xt[i] + pt[i];
    }

    // Finish.
    const T rs_old = rs[t];
    if (cg_finish<T>(s.flags, rs_new, thresh[t], &rs[t], &status[t], &iters[t])) {
      // A risky task that did not overflow: classic CG update with the exact beta.
      const T b = rs_old > T(0) ? rs_new / rs_old : T(0);
      for (int64_t i = 0; i < P; ++i) {
        const T pi = pt[i];
        xt[i] = xt[i] + alpha * pi;
        const T rn = rt[i] - alpha * at[i];
        rt[i] = rn;
        pt[i] = rn + b * pi;
      }
    }
  });
}

}  // namespace

extern "C" int cg_update_cpu(int dtype, void* x, void* r, void* p, const void* Ap, void* rs,
                             int8_t* status, int64_t* iters, const void* thresh, int64_t T,
                             int64_t P) {
  if (!sizes_ok(T, P)) return IMF_ERR_SIZE;
  if (T == 0) return IMF_OK;
  if (!rs || !status || !iters || !thresh) return IMF_ERR_NULL;
  if (P > 0 && (!x || !r || !p || !Ap)) return IMF_ERR_NULL;
  switch (dtype) {
    case IMF_FLOAT32:
      cg_update_impl(static_cast<float*>(x), static_cast<float*>(r), static_cast<float*>(p),
                     static_cast<const float*>(Ap), static_cast<float*>(rs), status, iters,
                     static_cast<const float*>(thresh), T, P);
      return IMF_OK;
    case IMF_FLOAT64:
      cg_update_impl(static_cast<double*>(x), static_cast<double*>(r), static_cast<double*>(p),
                     static_cast<const double*>(Ap), static_cast<double*>(rs), status, iters,
                     static_cast<const double*>(thresh), T, P);
      return IMF_OK;
    default:
      return IMF_ERR_DTYPE;
  }
}

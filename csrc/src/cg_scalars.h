// The per-task scalar stage of the fused masked CG iteration, shared verbatim by the CPU twin
// and the CUDA kernels (host/device), so both decide every flag with the same code.
//
// One iteration, for every task t whose status is 0 ("running"), given Ap = A p:
//
//   Pass 1 (one read of p, Ap, r; per-task reductions in the accumulation type "acc"):
//       pAp = p.Ap,  rAp = r.Ap,  ApAp = Ap.Ap,  rmax = max|r_i|,  apmax = max|Ap_i|
//   Scalars (cg_scalars below):
//       nonfinite = !isfinite(pAp);  negative = !nonfinite && pAp <= 0;  ok = the rest
//       alpha  = rs / pAp
//       rs_est = max(rs - 2 alpha rAp + alpha^2 ApAp, 0)     (= ||r - alpha Ap||^2 exactly)
//       beta   = rs_est / rs
//       risky  = ok && the new residual might overflow: alpha, rAp or ApAp not finite, or the
//                bounds ||r_new|| <= sqrt(rs) + alpha sqrt(ApAp) and
//                |r_new_i| <= rmax + alpha apmax exceed a quarter of sqrt(acc max) / half of
//                the storage max.
//   Pass 2 (one read of x, r, p, Ap and one write of x, r, p; ok && !risky tasks):
//       x += alpha p;  r_new = r - alpha Ap;  p = r_new + beta p;  partial sums of r_new.r_new
//       risky tasks only sum r_new.r_new (nothing written);
//       negative tasks with iters == 0: x += p (the steepest-descent step: p = r0 there)
//   Finish (per task, over the [T, blocks] partials; cg_finish below):
//       rs_new = the exact sum of r_new.r_new (fixed order, deterministic)
//       ok && !isfinite(rs_new): status 3, rs kept; else rs = rs_new, iters += 1, status 1
//       when rs_new <= thresh; negative: status 2; nonfinite: status 3.
//       A risky task whose rs_new is finite is then updated like classic CG, with the exact
//       beta = rs_new / rs (a third pass, for that task only; it never happens in a sane
//       solve). A risky task whose rs_new is not finite keeps x, r and p: its last finite
//       iterate, exactly as cg_update_ref does.
//
// Why: classic CG needs three passes per iteration (p.Ap; x, r and r.r; then p, which needs
// beta = r_new.r_new / r.r). Reducing r.Ap and Ap.Ap alongside p.Ap in pass 1 gives beta
// before pass 2, so p is updated in the same pass as x and r: two passes (and two big
// launches) instead of three, and 10 vector element reads/writes instead of 11 (pass 1 reads
// r once more, the separate p pass re-read r and p); the vector ops are bandwidth bound, so
// the saving is the pass and its launch, not flops. rs_est only feeds
// beta; convergence is always decided on the exact r.r, so iteration counts and flags are
// those of classic CG (in exact arithmetic the iterates are identical). The "risky" branch
// exists so that overflow cases are flagged exactly as in the reference (cg_update_ref keeps
// the last finite iterate) although pass 2 writes in place. One difference remains on
// purpose: a task that converges in this iteration gets p = r_new + beta p, where the
// reference keeps the old p; p of a finished task is never used again.
#ifndef IMAML_FAST_CG_SCALARS_H
#define IMAML_FAST_CG_SCALARS_H

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define IMF_HD __host__ __device__ __forceinline__
#else
#define IMF_HD inline
#endif

namespace imaml_fast {

enum CgFlags : int {
  kCgActive = 1,
  kCgOk = 2,
  kCgRisky = 4,
  kCgNegative = 8,
  kCgNonfinite = 16,
  kCgFirstNegative = 32,
};

// Finite without <cmath> macros (the same code compiles for host and device); exact for IEEE
// floats as long as nobody compiles with -ffast-math (we never do).
template <typename acc_t>
IMF_HD bool imf_finite(acc_t v) {
  return (v - v) == acc_t(0);
}

template <typename acc_t>
struct CgStep {
  acc_t alpha;
  acc_t beta;
  int flags;
};

// norm_limit = sqrt(max of acc_t) / 4; elem_limit = (max of the storage type) / 2. The margins
// cover rounding in the bounds and in the sums (a factor 16 on the squared norm).
template <typename acc_t>
IMF_HD CgStep<acc_t> cg_scalars(int8_t status, int64_t iters, acc_t rs, acc_t pAp, acc_t rAp,
                                acc_t ApAp, acc_t rmax, acc_t apmax, acc_t norm_limit,
                                acc_t elem_limit) {
  CgStep<acc_t> s;
  s.alpha = acc_t(0);
  s.beta = acc_t(0);
  s.flags = 0;
  if (status != 0) return s;
  s.flags = kCgActive;
  if (!imf_finite(pAp)) {
    s.flags |= kCgNonfinite;
    return s;
  }
  if (!(pAp > acc_t(0))) {
    s.flags |= kCgNegative;
    if (iters == 0) s.flags |= kCgFirstNegative;
    return s;
  }
  s.flags |= kCgOk;
  const acc_t alpha = rs / pAp;
  acc_t rs_est = rs - acc_t(2) * alpha * rAp + alpha * alpha * ApAp;
  if (!(rs_est > acc_t(0))) rs_est = acc_t(0);
  s.alpha = alpha;
  s.beta = rs > acc_t(0) ? rs_est / rs : acc_t(0);
  const acc_t a = alpha < acc_t(0) ? -alpha : alpha;
  const bool safe = imf_finite(alpha) && imf_finite(rAp) && imf_finite(ApAp) &&
                    imf_finite(rs) && imf_finite(rmax) && imf_finite(apmax) &&
                    (std::sqrt(rs) + a * std::sqrt(ApAp) <= norm_limit) &&
                    (rmax + a * apmax <= elem_limit);
  if (!safe) s.flags |= kCgRisky;
  return s;
}

// Updates rs, status and iters of one task from the exact rs_new. Returns true when the task
// is a risky one whose update must still be applied (with beta = rs_new / old rs).
template <typename acc_t>
IMF_HD bool cg_finish(int flags, acc_t rs_new, acc_t thresh, acc_t* rs, int8_t* status,
                      int64_t* iters) {
  if (!(flags & kCgActive)) return false;
  if (flags & kCgOk) {
    if (!imf_finite(rs_new)) {  // overflow inside the update: keep the last finite iterate
      *status = 3;
      return false;
    }
    *rs = rs_new;
    *iters += 1;
    if (rs_new <= thresh) *status = 1;
    return (flags & kCgRisky) != 0;
  }
  *status = (flags & kCgNegative) ? int8_t(2) : int8_t(3);
  return false;
}

}  // namespace imaml_fast

#endif  // IMAML_FAST_CG_SCALARS_H

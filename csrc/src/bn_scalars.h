// The arithmetic of bn_double_backward, shared verbatim by the CPU twin and the CUDA kernel
// (host/device), so both compute every channel's coefficients and every element's outputs
// with the same code and order of operations (semantics and formulas:
// imaml_fast.layers.batch_norm_double_backward, imaml_fast.h).
//
// Per channel, from the five sums of pass 1 over its M elements (gy, gy xh, a, a xh, a gy):
// bn_channel gives the means and the coefficients of pass 2; bn_element then gives dgy and dx
// of one element; BnChannel::dw the channel's weight derivative. HA, HB, HC: whether the
// cotangents a (of gx), b (of gweight), c (of gbias) are present; absent ones are zero.
#ifndef IMAML_FAST_BN_SCALARS_H
#define IMAML_FAST_BN_SCALARS_H

#include "cg_scalars.h"  // IMF_HD

namespace imaml_fast {

template <typename T>
struct BnChannel {
  T mu, r;           // the channel's mean and inverse standard deviation
  T gbar, P;         // <gy>, <gy xh>
  T abar, Q, A;      // <a>, <a xh>, <a gy> (zero without a)
  T gr, grr, K;      // g r, g r^2, A - abar gbar - 3 P Q
  T bv, br, cv;      // b, b r, c of this channel (zero when absent)
  T dw;              // d/dweight: r M (A - abar gbar - P Q), zero without a
};

template <typename T, bool HA, bool HB, bool HC>
IMF_HD BnChannel<T> bn_channel(const T* sums, T Mt, T mu, T r, T g, T bv, T cv) {
  BnChannel<T> k;
  k.mu = mu;
  k.r = r;
  k.gbar = sums[0] / Mt;
  k.P = sums[1] / Mt;
  k.abar = HA ? sums[2] / Mt : T(0);
  k.Q = HA ? sums[3] / Mt : T(0);
  k.A = HA ? sums[4] / Mt : T(0);
  k.gr = g * r;
  k.grr = k.gr * r;
  k.K = k.A - k.abar * k.gbar - T(3) * k.P * k.Q;
  k.bv = HB ? bv : T(0);
  k.br = k.bv * r;
  k.cv = HC ? cv : T(0);
  k.dw = HA ? r * Mt * (k.A - k.abar * k.gbar - k.P * k.Q) : T(0);
  return k;
}

// dgy and dx of one element with input x, gy and (with HA) a (the reference's order of
// operations).
template <typename T, bool HA, bool HB, bool HC>
IMF_HD void bn_element(const BnChannel<T>& k, T xv, T gv, T av, T* dgy, T* dx) {
  const T xh = (xv - k.mu) * k.r;
  T o_gy = T(0), o_x = T(0);
  if (HA) {
    o_gy = k.gr * (av - k.abar - xh * k.Q);
    o_x = k.grr * (-xh * k.K - k.Q * (gv - k.gbar) - k.P * (av - k.abar));
  }
  if (HB) {
    o_gy = o_gy + k.bv * xh;
    o_x = o_x + k.br * (gv - k.gbar - xh * k.P);
  }
  if (HC) o_gy = o_gy + k.cv;
  *dgy = o_gy;
  *dx = o_x;
}

}  // namespace imaml_fast

#endif  // IMAML_FAST_BN_SCALARS_H

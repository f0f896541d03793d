// CPU twin of bn_double_backward_cuda: the vector-Jacobian product of BatchNorm's backward pass
// (semantics: imaml_fast.layers.batch_norm_double_backward; formulas in imaml_fast.h).
// Channels are the tasks: each channel runs on one thread (contiguous blocks of channels per
// thread, cpu_common.h channel_blocks), two passes over its M = N * S
// elements (the five sums in 8 lanes, then dgy and dx), so results do not depend on the thread
// count. The absent optional inputs (a, b, c) are template flags: their terms are dropped.
#include "../bn_scalars.h"
#include "../common.h"
#include "cpu_common.h"

using namespace imaml_fast;
using namespace imaml_fast::cpu;

namespace {

template <typename T, bool HA, bool HB, bool HC>
void bn_double_backward_impl(const T* a, const T* b, const T* c, const T* gy, const T* x,
                             const T* mean, const T* invstd, const T* weight, T* dgy, T* dx,
                             T* dw, int64_t N, int64_t C, int64_t S) {
  const int64_t M = N * S;
  const T Mt = static_cast<T>(M);
  channel_blocks(C, M, [&](int64_t ch) {
    const T mu = mean[ch];
    const T r = invstd[ch];
    // Pass 1: sums of gy, gy xh and (with a) a, a xh, a gy.
    Lanes<T> s_g, s_gx, s_a, s_ax, s_ag;
    channel_loop(N, C, S, ch, [&](int64_t i, int k) {
      const T xh = (x[i] - mu) * r;
      const T gv = gy[i];
      s_g.v[k] += gv;
      s_gx.v[k] += gv * xh;
      if (HA) {
        const T av = a[i];
        s_a.v[k] += av;
        s_ax.v[k] += av * xh;
        s_ag.v[k] += av * gv;
      }
    });
    const T sums[5] = {s_g.sum(), s_gx.sum(), s_a.sum(), s_ax.sum(), s_ag.sum()};
    const BnChannel<T> kc = bn_channel<T, HA, HB, HC>(sums, Mt, mu, r, weight ? weight[ch] : T(1),
                                                       HB ? b[ch] : T(0), HC ? c[ch] : T(0));
    // Pass 2: dgy, dx.
    channel_loop(N, C, S, ch, [&](int64_t i, int) {
      bn_element<T, HA, HB, HC>(kc, x[i], gy[i], HA ? a[i] : T(0), dgy + i, dx + i);
    });
    if (dw) dw[ch] = kc.dw;
  });
}

template <typename T>
void bn_double_backward_typed(const void* a, const void* b, const void* c, const void* gy,
                              const void* x, const void* mean, const void* invstd,
                              const void* weight, void* dgy, void* dx, void* dw, int64_t N,
                              int64_t C, int64_t S) {
  bool_dispatch(a != nullptr, [&](auto ha) {
    bool_dispatch(b != nullptr, [&](auto hb) {
      bool_dispatch(c != nullptr, [&](auto hc) {
        bn_double_backward_impl<T, decltype(ha)::value, decltype(hb)::value,
                                decltype(hc)::value>(
            static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(c),
            static_cast<const T*>(gy), static_cast<const T*>(x), static_cast<const T*>(mean),
            static_cast<const T*>(invstd), static_cast<const T*>(weight), static_cast<T*>(dgy),
            static_cast<T*>(dx), static_cast<T*>(dw), N, C, S);
      });
    });
  });
}

template <typename T>
void fill_zero(void* p, int64_t n) {
  T* q = static_cast<T*>(p);
  for (int64_t i = 0; i < n; ++i) q[i] = T(0);
}

}  // namespace

extern "C" {

int bn_double_backward_cpu(int dtype, const void* a, const void* b, const void* c, const void* gy,
                           const void* x, const void* mean, const void* invstd,
                           const void* weight, void* dgy, void* dx, void* dw, int64_t N,
                           int64_t C, int64_t S) {
  if (!bn_sizes_ok(N, C, S)) return IMF_ERR_SIZE;
  if (dtype != IMF_FLOAT32 && dtype != IMF_FLOAT64) return IMF_ERR_DTYPE;
  if (C == 0) return IMF_OK;
  if (N * S == 0) {  // no elements: only dw, which is 0
    if (dw) {
      if (dtype == IMF_FLOAT32)
        fill_zero<float>(dw, C);
      else
        fill_zero<double>(dw, C);
    }
    return IMF_OK;
  }
  if (!gy || !x || !mean || !invstd || !dgy || !dx) return IMF_ERR_NULL;
  if (dtype == IMF_FLOAT32)
    bn_double_backward_typed<float>(a, b, c, gy, x, mean, invstd, weight, dgy, dx, dw, N, C, S);
  else
    bn_double_backward_typed<double>(a, b, c, gy, x, mean, invstd, weight, dgy, dx, dw, N, C, S);
  return IMF_OK;
}

}  // extern "C"

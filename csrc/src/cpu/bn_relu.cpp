// BatchNorm with batch statistics followed by ReLU, as one layer: forward and first backward
// (semantics: imaml_fast.layers.bn_relu_forward_ref / bn_relu_backward_ref).
//
// Why: in the engine's inner loop (gradients taken once, hand-batched layers) every block of
// the paper's networks is conv -> BatchNorm -> ReLU over [N, T*C, H, W], and ATen runs the
// last two as separate passes over memory: BatchNorm writes its output, ReLU reads it and
// writes another; backward, ReLU's mask writes a masked gradient that BatchNorm's backward
// reads again. On the CPU these activations are megabytes per call (Omniglot 20-way, T = 32:
// 32 MB for the first block), so each extra pass is a trip to memory. Here each channel is
// one task of its own thread and its M = N * S elements stay in L1/L2 between passes:
//   forward:  mean, then the variance about it, then y = max(0, (x - mean) invstd w + b);
//   backward: the ReLU mask is recomputed from x (z = xh w + b > 0, the same arithmetic as the
//             forward's, so it is exactly the forward's mask), then the two sums of the
//             masked gradient g (sum g, sum g xh) and gx = w invstd (g - <g> - xh <g xh>).
// So memory sees x read and y written (forward) and gy, x read and gx written (backward).
// Channels spread over the threads, each on one thread: bit-identical for any thread count.
// Sums run in vector lanes in an order fixed by the shape (not the threads), no FMA
// contraction.
#include <cmath>
#include <cstring>

#include "../common.h"
#include "cpu_common.h"

using namespace imaml_fast;
using namespace imaml_fast::cpu;

// The vector helpers below pass 32-byte vectors by value; on the baseline build GCC notes that
// this ABI differs from an AVX build's. They are inline, internal to this file: no ABI crosses.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

// 32-byte vectors (GCC/Clang vector extensions: 8 floats or 4 doubles; two SSE registers
// each on the baseline build, one AVX register on the AVX2 build below). The auto-vectoriser
// left the backward's masked select scalar and branchy (3x slower than ATen's two passes).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int width = 32 / static_cast<int>(sizeof(T));
};

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline T lane_sum(typename Vec<T>::type v) {
  T s = T(0);
  for (int k = 0; k < Vec<T>::width; ++k) s += v[k];
  return s;
}

// The pre-activation of one element (or vector of elements): what the forward passes
// through max(0, .) and what the backward's mask tests. One expression for both, so the
// mask is the forward's, element for element (vector and scalar code round alike: no FMA
// contraction in this file).
template <typename U, typename T>
inline U pre_activation(U xv, T mu, T r, T w, T b) {
  return (xv - mu) * r * w + b;
}

// For every row n of channel ch ([N, C, S] layout): f_vec(offset) on full vectors, then
// f_one(offset) on the row's tail. The order is fixed by (N, S): any thread count gives the
// same bits.
template <typename T, typename FV, typename F1>
inline void rows(int64_t N, int64_t C, int64_t S, int64_t ch, FV&& f_vec, F1&& f_one) {
  constexpr int W = Vec<T>::width;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t base = (n * C + ch) * S;
    int64_t s = 0;
    for (; s + W <= S; s += W) f_vec(base + s);
    for (; s < S; ++s) f_one(base + s);
  }
}

template <typename T>
__attribute__((always_inline)) inline void forward_channel(const T* x, const T* weight,
                                                           const T* bias, T* y, T* mean,
                                                           T* invstd, int64_t N, int64_t C,
                                                           int64_t S, T eps, int64_t ch) {
  typedef typename Vec<T>::type V;
  const T Mt = static_cast<T>(N * S);
  V vs = {};
  T ts = T(0);
  rows<T>(N, C, S, ch, [&](int64_t i) { vs += load(x + i); }, [&](int64_t i) { ts += x[i]; });
  const T mu = (lane_sum<T>(vs) + ts) / Mt;
  V vd = {};
  T td = T(0);
  rows<T>(
      N, C, S, ch,
      [&](int64_t i) {
        const V d = load(x + i) - mu;
        vd += d * d;
      },
      [&](int64_t i) {
        const T d = x[i] - mu;
        td += d * d;
      });
  const T r = T(1) / std::sqrt((lane_sum<T>(vd) + td) / Mt + eps);
  const T w = weight ? weight[ch] : T(1);
  const T b = bias ? bias[ch] : T(0);
  const V zero = {};
  rows<T>(
      N, C, S, ch,
      [&](int64_t i) {
        const V z = pre_activation(load(x + i), mu, r, w, b);
        store(y + i, z > zero ? z : zero);
      },
      [&](int64_t i) {
        const T z = pre_activation(x[i], mu, r, w, b);
        y[i] = z > T(0) ? z : T(0);
      });
  mean[ch] = mu;
  invstd[ch] = r;
}

template <typename T>
__attribute__((always_inline)) inline void backward_channel(
    const T* gy, const T* x, const T* mean, const T* invstd, const T* weight, const T* bias,
    T* gx, T* gw, T* gb, int64_t N, int64_t C, int64_t S, int64_t ch) {
  typedef typename Vec<T>::type V;
  const T Mt = static_cast<T>(N * S);
  const T mu = mean[ch], r = invstd[ch];
  const T w = weight ? weight[ch] : T(1);
  const T b = bias ? bias[ch] : T(0);
  const V zero = {};
  V vg = {}, vgx = {};
  T tg = T(0), tgx = T(0);
  rows<T>(
      N, C, S, ch,
      [&](int64_t i) {
        const V xv = load(x + i);
        const V g = pre_activation(xv, mu, r, w, b) > zero ? load(gy + i) : zero;
        vg += g;
        vgx += g * ((xv - mu) * r);
      },
      [&](int64_t i) {
        const T g = pre_activation(x[i], mu, r, w, b) > T(0) ? gy[i] : T(0);
        tg += g;
        tgx += g * ((x[i] - mu) * r);
      });
  const T sg = lane_sum<T>(vg) + tg, sgx = lane_sum<T>(vgx) + tgx;
  if (gb) gb[ch] = sg;
  if (gw) gw[ch] = sgx;
  if (!gx) return;
  const T gbar = sg / Mt, P = sgx / Mt, wr = w * r;
  rows<T>(
      N, C, S, ch,
      [&](int64_t i) {
        const V xv = load(x + i);
        const V g = pre_activation(xv, mu, r, w, b) > zero ? load(gy + i) : zero;
        store(gx + i, wr * (g - gbar - ((xv - mu) * r) * P));
      },
      [&](int64_t i) {
        const T g = pre_activation(x[i], mu, r, w, b) > T(0) ? gy[i] : T(0);
        gx[i] = wr * (g - gbar - ((x[i] - mu) * r) * P);
      });
}

// Both per-channel functions twice on x86: for CPUs with AVX2 (one 32-byte register per
// vector) and for the baseline the library is compiled for; chosen once at run time.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define IMF_X86_DISPATCH 1
template <typename T>
__attribute__((target("avx2"))) void forward_avx2(const T* x, const T* weight, const T* bias,
                                                  T* y, T* mean, T* invstd, int64_t N,
                                                  int64_t C, int64_t S, T eps, int64_t ch) {
  forward_channel<T>(x, weight, bias, y, mean, invstd, N, C, S, eps, ch);
}
template <typename T>
__attribute__((target("avx2"))) void backward_avx2(const T* gy, const T* x, const T* mean,
                                                   const T* invstd, const T* weight,
                                                   const T* bias, T* gx, T* gw, T* gb,
                                                   int64_t N, int64_t C, int64_t S, int64_t ch) {
  backward_channel<T>(gy, x, mean, invstd, weight, bias, gx, gw, gb, N, C, S, ch);
}
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

template <typename T>
void forward_impl(const T* x, const T* weight, const T* bias, T* y, T* mean, T* invstd,
                  int64_t N, int64_t C, int64_t S, T eps) {
  channel_blocks(C, N * S, [&](int64_t ch) {
#ifdef IMF_X86_DISPATCH
    if (has_avx2()) return forward_avx2<T>(x, weight, bias, y, mean, invstd, N, C, S, eps, ch);
#endif
    forward_channel<T>(x, weight, bias, y, mean, invstd, N, C, S, eps, ch);
  });
}

template <typename T>
void backward_impl(const T* gy, const T* x, const T* mean, const T* invstd, const T* weight,
                   const T* bias, T* gx, T* gw, T* gb, int64_t N, int64_t C, int64_t S) {
  channel_blocks(C, N * S, [&](int64_t ch) {
#ifdef IMF_X86_DISPATCH
    if (has_avx2())
      return backward_avx2<T>(gy, x, mean, invstd, weight, bias, gx, gw, gb, N, C, S, ch);
#endif
    backward_channel<T>(gy, x, mean, invstd, weight, bias, gx, gw, gb, N, C, S, ch);
  });
}

bool sizes_ok(int64_t N, int64_t C, int64_t S) { return N >= 0 && C >= 0 && S >= 0; }

}  // namespace

extern "C" {

int bn_relu_forward_cpu(int dtype, const void* x, const void* weight, const void* bias, void* y,
                        void* mean, void* invstd, int64_t N, int64_t C, int64_t S, double eps) {
  if (!sizes_ok(N, C, S)) return IMF_ERR_SIZE;
  if (dtype != IMF_FLOAT32 && dtype != IMF_FLOAT64) return IMF_ERR_DTYPE;
  if (!(eps >= 0)) return IMF_ERR_ARG;
  // batch statistics need at least one element per channel
  if (C == 0) return IMF_OK;
  if (N * S == 0) return IMF_ERR_SIZE;
  if (!x || !y || !mean || !invstd) return IMF_ERR_NULL;
  if (dtype == IMF_FLOAT32)
    forward_impl<float>(static_cast<const float*>(x), static_cast<const float*>(weight),
                        static_cast<const float*>(bias), static_cast<float*>(y),
                        static_cast<float*>(mean), static_cast<float*>(invstd), N, C, S,
                        static_cast<float>(eps));
  else
    forward_impl<double>(static_cast<const double*>(x), static_cast<const double*>(weight),
                         static_cast<const double*>(bias), static_cast<double*>(y),
                         static_cast<double*>(mean), static_cast<double*>(invstd), N, C, S, eps);
  return IMF_OK;
}

int bn_relu_backward_cpu(int dtype, const void* gy, const void* x, const void* mean,
                         const void* invstd, const void* weight, const void* bias, void* gx,
                         void* gw, void* gb, int64_t N, int64_t C, int64_t S) {
  if (!sizes_ok(N, C, S)) return IMF_ERR_SIZE;
  if (dtype != IMF_FLOAT32 && dtype != IMF_FLOAT64) return IMF_ERR_DTYPE;
  if (C == 0) return IMF_OK;
  if (N * S == 0) return IMF_ERR_SIZE;
  if (!gy || !x || !mean || !invstd) return IMF_ERR_NULL;
  if (dtype == IMF_FLOAT32)
    backward_impl<float>(static_cast<const float*>(gy), static_cast<const float*>(x),
                         static_cast<const float*>(mean), static_cast<const float*>(invstd),
                         static_cast<const float*>(weight), static_cast<const float*>(bias),
                         static_cast<float*>(gx), static_cast<float*>(gw),
                         static_cast<float*>(gb), N, C, S);
  else
    backward_impl<double>(static_cast<const double*>(gy), static_cast<const double*>(x),
                          static_cast<const double*>(mean), static_cast<const double*>(invstd),
                          static_cast<const double*>(weight), static_cast<const double*>(bias),
                          static_cast<double*>(gx), static_cast<double*>(gw),
                          static_cast<double*>(gb), N, C, S);
  return IMF_OK;
}

}  // extern "C"

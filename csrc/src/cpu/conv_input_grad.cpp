// conv2d_input_grad_cpu: the input gradient of a grouped 2-D convolution (what
// torch.ops.aten.convolution_backward computes with output_mask [True, False, False]), for
// the engine's per-task convolutions: the tasks are the groups, each group a small GEMM.
//
// Why: oneDNN's backward-data primitive for a grouped, strided convolution with small
// images ran at a third of the rate of the same layer's forward pass on the 2-core EPYCs
// (Omniglot layer 2, T = 32 tasks as groups: 10-16 ms against 5 ms, then a copy out of its
// own layout), and it is called by every inner-loop gradient and every Hessian-vector
// product. Here, per group g (groups spread over the threads, each on one thread, so the
// result does not depend on the thread count):
//   1. gather gy[:, g] into B [O, N*Ho*Wo] (zero-padded to a multiple of the vector width);
//   2. for each input channel c: cols [KH*KW, N*Ho*Wo] = W[g][:, c]^T B, a register-tiled
//      product (up to 5 kernel taps x two vectors of outputs per tile, the taps' weights
//      broadcast): cols stays in L1/L2;
//   3. col2im: scatter-add cols into gx[:, g*C + c] (zeroed first), tap by tap.
// So the only passes over memory are reading gy and W once and writing gx once.
//
// Vectors are GCC/Clang vector extensions (32 bytes: 8 floats or 4 doubles), no intrinsics;
// on x86 the per-group function is compiled twice, for AVX2+FMA and for the baseline, and
// the CPU picks at run time (__builtin_cpu_supports). Unlike the other CPU twins this file is compiled with
// -ffp-contract=fast (CMakeLists.txt): a multiply-add is one FMA, as in oneDNN's kernels;
// the reference (ATen's convolution backward) fixes no rounding, so tests compare with a
// tolerance (tests/test_csrc.py), float64 to 1e-12.
#include <cstring>
#include <vector>

#include "../common.h"
#include "cpu_common.h"

using namespace imaml_fast;
using namespace imaml_fast::cpu;

namespace {

constexpr int kVecBytes = 32;
// Kernel taps per register tile: 5 taps x 2 vectors = 10 accumulators (AVX2 has 16
// registers). A broadcast per multiply-add limited 9 x 1 tiles on Zen 3 (its broadcasts share
// pipes with the FMAs): Omniglot layer 2's products took 8.9 ms against 7.7 ms with these,
// one thread; 3 x 4 tiles spilled and ran at half the rate.
constexpr int kMaxTile = 5;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int width = kVecBytes / static_cast<int>(sizeof(T));
};

struct Shape {
  int64_t N, G, C, O, H, W, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw;
};

// cols[r][p .. p + NV*V) = sum_o wt[o][r] * B[o][p .. p + NV*V) for the R taps r of one tile:
// R * NV accumulators; each broadcast weight feeds NV multiply-adds.
// wt: [O, ldw] (this channel's taps, tap-minor), B: [O, ldb], cols: [R, ldb].
template <typename T, int R, int NV>
__attribute__((always_inline)) inline void tile(const T* wt, int64_t ldw, const T* B, int64_t ldb,
                                                int64_t O, int64_t p, T* cols) {
  typedef typename Vec<T>::type V;
  constexpr int W = Vec<T>::width;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t o = 0; o < O; ++o) {
    V b[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], B + o * ldb + p + v * W, sizeof(V));
    const T* w = wt + o * ldw;
    for (int r = 0; r < R; ++r) {
      const T s = w[r];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(cols + r * ldb + p + v * W, &acc[r][v], sizeof(V));
}

// Two vectors per tile where they fit (ldb is a multiple of one vector), then one.
template <typename T, int R>
__attribute__((always_inline)) inline void taps(const T* wt, int64_t ldw, const T* B, int64_t ldb,
                                                int64_t O, T* cols) {
  constexpr int W = Vec<T>::width;
  int64_t p = 0;
  for (; p + 2 * W <= ldb; p += 2 * W) tile<T, R, 2>(wt, ldw, B, ldb, O, p, cols);
  for (; p < ldb; p += W) tile<T, R, 1>(wt, ldw, B, ldb, O, p, cols);
}

// The product for taps [k0, k0 + R) of one channel, R = 1 .. kMaxTile.
template <typename T>
__attribute__((always_inline)) inline void product(int R, const T* wt, int64_t ldw, const T* B,
                                                   int64_t ldb, int64_t O, T* cols) {
  switch (R) {
    case 1: taps<T, 1>(wt, ldw, B, ldb, O, cols); break;
    case 2: taps<T, 2>(wt, ldw, B, ldb, O, cols); break;
    case 3: taps<T, 3>(wt, ldw, B, ldb, O, cols); break;
    case 4: taps<T, 4>(wt, ldw, B, ldb, O, cols); break;
    default: taps<T, 5>(wt, ldw, B, ldb, O, cols); break;
  }
}

// The first a >= 0 with a * s >= lo (lo: how far the tap reaches before the image).
inline int64_t first_inside(int64_t lo, int64_t s) { return lo <= 0 ? 0 : (lo + s - 1) / s; }
// One past the last a < n with a * s < hi (hi: the image's end, shifted the same way).
inline int64_t end_inside(int64_t hi, int64_t s, int64_t n) {
  if (hi <= 0) return 0;
  const int64_t e = (hi + s - 1) / s;
  return e < n ? e : n;
}

// One group: gx[:, g*C .. (g+1)*C) from gy[:, g*O .. (g+1)*O) and w[g*O .. (g+1)*O).
// B, wt, cols: the calling thread's scratch.
template <typename T>
__attribute__((always_inline)) inline void group_impl(const T* gy, const T* w, T* gx,
                                                      const Shape& s, int64_t g,
                                                      std::vector<T>& B, std::vector<T>& wt,
                                                      std::vector<T>& cols) {
  const int64_t V = Vec<T>::width;
  const int64_t So = s.Ho * s.Wo, Si = s.H * s.W, KK = s.KH * s.KW;
  const int64_t NP = s.N * So;
  const int64_t ldb = (NP + V - 1) / V * V;
  B.assign(static_cast<size_t>(s.O * ldb), T(0));
  for (int64_t o = 0; o < s.O; ++o)
    for (int64_t n = 0; n < s.N; ++n)
      std::memcpy(B.data() + o * ldb + n * So, gy + (n * s.G * s.O + g * s.O + o) * So,
                  static_cast<size_t>(So) * sizeof(T));
  // wt[c][o][k] = w[g*O + o][c][k]: each channel's taps contiguous per o
  wt.resize(static_cast<size_t>(s.C * s.O * KK));
  for (int64_t o = 0; o < s.O; ++o)
    for (int64_t c = 0; c < s.C; ++c)
      std::memcpy(wt.data() + (c * s.O + o) * KK, w + ((g * s.O + o) * s.C + c) * KK,
                  static_cast<size_t>(KK) * sizeof(T));
  cols.resize(static_cast<size_t>(KK * ldb));
  for (int64_t c = 0; c < s.C; ++c) {
    const T* wc = wt.data() + c * s.O * KK;
    for (int64_t k0 = 0; k0 < KK; k0 += kMaxTile) {
      const int R = static_cast<int>(KK - k0 < kMaxTile ? KK - k0 : kMaxTile);
      product<T>(R, wc + k0, KK, B.data(), ldb, s.O, cols.data() + k0 * ldb);
    }
    // col2im: gx[n, g*C + c, i, j] += cols[k][n*So + a*Wo + b], i = a*sh - ph + kh*dh,
    // j = b*sw - pw + kw*dw, over the (a, b) ranges that land inside the image
    for (int64_t n = 0; n < s.N; ++n) {
      T* out = gx + (n * s.G * s.C + g * s.C + c) * Si;
      std::memset(out, 0, static_cast<size_t>(Si) * sizeof(T));
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t a0 = first_inside(s.ph - kh * s.dh, s.sh);
        const int64_t a1 = end_inside(s.H + s.ph - kh * s.dh, s.sh, s.Ho);
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const int64_t b0 = first_inside(s.pw - kw * s.dw, s.sw);
          const int64_t b1 = end_inside(s.W + s.pw - kw * s.dw, s.sw, s.Wo);
          const T* src = cols.data() + (kh * s.KW + kw) * ldb + n * So;
          for (int64_t a = a0; a < a1; ++a) {
            T* row = out + (a * s.sh - s.ph + kh * s.dh) * s.W - s.pw + kw * s.dw;
            const T* in = src + a * s.Wo;
            for (int64_t b = b0; b < b1; ++b) row[b * s.sw] += in[b];
          }
        }
      }
    }
  }
}

// The group function twice: for CPUs with AVX2 and FMA (32-byte vectors, one FMA per
// multiply-add) and for the baseline the library is compiled for; chosen once at run time.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define IMF_X86_DISPATCH 1
__attribute__((target("avx2,fma"))) void group_avx2(
    const float* gy, const float* w, float* gx, const Shape& s, int64_t g,
    std::vector<float>& B, std::vector<float>& wt, std::vector<float>& c) {
  group_impl<float>(gy, w, gx, s, g, B, wt, c);
}
__attribute__((target("avx2,fma"))) void group_avx2(
    const double* gy, const double* w, double* gx, const Shape& s, int64_t g,
    std::vector<double>& B, std::vector<double>& wt, std::vector<double>& c) {
  group_impl<double>(gy, w, gx, s, g, B, wt, c);
}
bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

// Every group of one call, spread over the workers, each with its own scratch.
template <typename T>
int run(const void* gy, const void* w, void* gx, const Shape& s) {
  int64_t workers = imaml_fast_cpu_threads();
  if (workers < 1) workers = 1;
  std::vector<std::vector<T>> B(workers), wt(workers), cols(workers);  // scratch per worker
  const T* gy_t = static_cast<const T*>(gy);
  const T* w_t = static_cast<const T*>(w);
  T* gx_t = static_cast<T*>(gx);
  for_tasks_on_workers(s.G, s.N * (s.C + s.O) * s.H * s.W, [&](int64_t g, int64_t k) {
#ifdef IMF_X86_DISPATCH
    if (has_avx2_fma()) return group_avx2(gy_t, w_t, gx_t, s, g, B[k], wt[k], cols[k]);
#endif
    group_impl<T>(gy_t, w_t, gx_t, s, g, B[k], wt[k], cols[k]);
  });
  return IMF_OK;
}

}  // namespace

extern "C" int conv2d_input_grad_cpu(int dtype, const void* gy, const void* w, void* gx,
                                     int64_t N, int64_t G, int64_t C, int64_t O, int64_t H,
                                     int64_t W, int64_t Ho, int64_t Wo, int64_t KH, int64_t KW,
                                     int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                                     int64_t dw) {
  const int64_t dims[] = {N, G, C, O, H, W, Ho, Wo, KH, KW};
  for (int64_t d : dims)
    if (d < 0) return IMF_ERR_SIZE;
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 || pw < 0) return IMF_ERR_ARG;
  // the kernel must fit the padded input
  if (H + 2 * ph < dh * (KH - 1) + 1 || W + 2 * pw < dw * (KW - 1) + 1) return IMF_ERR_ARG;
  // the output size a convolution with these settings gives
  if (Ho != (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1 ||
      Wo != (W + 2 * pw - dw * (KW - 1) - 1) / sw + 1)
    return IMF_ERR_ARG;
  if (N * G * C * H * W == 0) return IMF_OK;
  if (!gy || !w || !gx) return IMF_ERR_NULL;
  const Shape s{N, G, C, O, H, W, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw};
  if (dtype == IMF_FLOAT32) return run<float>(gy, w, gx, s);
  if (dtype == IMF_FLOAT64) return run<double>(gy, w, gx, s);
  return IMF_ERR_DTYPE;
}

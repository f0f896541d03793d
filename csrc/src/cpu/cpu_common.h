// Helpers for the CPU twins: plain loops, no intrinsics, no OpenMP. Sums use 8 independent
// lanes (then a fixed pairwise combination): deterministic, about sqrt(8) times more accurate
// than one running sum, and a shape the compiler can vectorise without -ffast-math.
#ifndef IMAML_FAST_CPU_COMMON_H
#define IMAML_FAST_CPU_COMMON_H

#include <cstdint>

namespace imaml_fast {
namespace cpu {

template <typename T>
struct Lanes {
  static constexpr int N = 8;
  T v[N] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  T sum() const { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }
};

// Calls f(i, lane) for i in [0, n): blocks of 8 with lane = i % 8, then the tail.
template <typename F>
inline void lane_loop(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) f(i + k, k);
  for (int k = 0; i < n; ++i, ++k) f(i, k);
}

template <typename T>
inline T abs_of(T v) {
  return v < T(0) ? -v : v;
}

// max that ignores NaN (NaN in r or Ap also makes a dot product NaN, which is checked).
template <typename T>
inline T max_of(T a, T b) {
  return b > a ? b : a;
}

}  // namespace cpu
}  // namespace imaml_fast

#endif  // IMAML_FAST_CPU_COMMON_H

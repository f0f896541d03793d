// Helpers for the CPU twins: plain loops, no intrinsics. Sums use 8 independent lanes (then a
// fixed pairwise combination): deterministic, about sqrt(8) times more accurate than one
// running sum, and a shape the compiler can vectorise without -ffast-math.
// Tasks are independent: for_tasks spreads them over imaml_fast_cpu_threads() threads (every
// task on one thread, so the numbers do not depend on the thread count). The threads are an
// OpenMP team where the build has OpenMP (CMakeLists.txt), else std::threads started per
// call. OpenMP matters next to PyTorch: its CPU wheels run ATen on libgomp, whose idle
// workers spin for a while after every parallel ATen op; threads of our own then share the
// cores with those spinning workers (an Omniglot convolution input gradient right after an
// ATen op took 12.7 ms against 7.3 ms with the workers made passive, 2 cores). The same
// libgomp.so.1 serves both libraries in one process, so a team here reuses ATen's workers.
#ifndef IMAML_FAST_CPU_COMMON_H
#define IMAML_FAST_CPU_COMMON_H

#include <cstdint>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "imaml_fast/imaml_fast.h"

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

// Calls f(i, lane) for the M = N * S elements of channel ch of a contiguous [N, C, S] array,
// in order m = n * S + s, with i = (n * C + ch) * S + s and lane = m % 8, whatever S. Each row
// is a head that runs its lane counter up to 8, blocks of 8 starting at lane 0 (lane_loop's
// vectorisable shape), and a tail: the Omniglot network's S = 196 and 49 vectorise too, and
// every element keeps its lane and its place in the lane's order (the same bits as one running
// counter; tests/test_csrc.py).
template <typename F>
inline void channel_loop(int64_t N, int64_t C, int64_t S, int64_t ch, F&& f) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t base = (n * C + ch) * S;
    int k = static_cast<int>((n * S) & 7);
    int64_t s = 0;
    for (; k != 0 && s < S; ++s, k = (k + 1) & 7) f(base + s, k);
    for (; s + 8 <= S; s += 8)
      for (int j = 0; j < 8; ++j) f(base + s + j, j);
    for (int j = 0; s < S; ++s, ++j) f(base + s, j);
  }
}

// Below this many elements (T * P) a call stays on the calling thread: starting threads
// (tens of microseconds) would cost more than the work.
constexpr int64_t kMinParallelElements = 1 << 16;

// Calls f(t, w) for every task t in [0, nT), task t on worker w = t % n (n: the number of
// workers, at most imaml_fast_cpu_threads(); w = 0 for every task when the call stays on the
// calling thread), so that f can use per-worker scratch.
template <typename F>
inline void for_tasks_on_workers(int64_t nT, int64_t P, F&& f) {
  int64_t n = imaml_fast_cpu_threads();
  if (n > nT) n = nT;
  if (n <= 1 || nT * P < kMinParallelElements) {
    for (int64_t t = 0; t < nT; ++t) f(t, int64_t(0));
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(n))
  {
    // the team may be smaller than asked (OMP_DYNAMIC): stride by its real size
    const int64_t w = omp_get_thread_num(), team = omp_get_num_threads();
    for (int64_t t = w; t < nT; t += team) f(t, w);
  }
  return;
#endif
  auto worker = [&](int64_t w) {
    for (int64_t t = w; t < nT; t += n) f(t, w);
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(n - 1));
  for (int64_t w = 1; w < n; ++w) pool.emplace_back(worker, w);
  worker(0);
  for (auto& th : pool) th.join();
}

// Calls f(t) for every task t in [0, nT), task t on worker t % n.
template <typename F>
inline void for_tasks(int64_t nT, int64_t P, F&& f) {
  for_tasks_on_workers(nT, P, [&](int64_t t, int64_t) { f(t); });
}

// f(ch) for the C channels of an [N, C, S] array, cut into one contiguous block of channels
// per thread (M: a channel's elements, for the serial cut-off). Not for_tasks' round robin:
// neighbouring channels share cache lines where their rows meet (a row of S = 196 floats is
// 12.25 lines), and two threads writing alternate channels ran slower than one (bn_relu's
// forward on Omniglot layer 1, 5-way: 2.2 ms on two threads against 1.0 ms on one). Each
// channel still runs whole on one thread: the same bits for any thread count.
template <typename F>
void channel_blocks(int64_t C, int64_t M, F&& f) {
  int64_t blocks = imaml_fast_cpu_threads();
  if (blocks < 1) blocks = 1;
  if (blocks > C) blocks = C;
  const int64_t per = (C + blocks - 1) / blocks;
  for_tasks(blocks, per * M, [&](int64_t k) {
    const int64_t end = (k + 1) * per < C ? (k + 1) * per : C;
    for (int64_t ch = k * per; ch < end; ++ch) f(ch);
  });
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

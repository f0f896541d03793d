// Internal helpers shared by the CPU twins, the CUDA launchers and the workspace-size queries.
#ifndef IMAML_FAST_COMMON_H
#define IMAML_FAST_COMMON_H

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "imaml_fast/imaml_fast.h"

namespace imaml_fast {

// T * P (and T * P * P for dense_cg) must fit int64 comfortably.
inline bool sizes_ok(int64_t T, int64_t P) {
  if (T < 0 || P < 0) return false;
  if (P == 0 || T == 0) return true;
  return T <= (std::numeric_limits<int64_t>::max() / 4) / P;
}

// dense_cg: T * P * P must fit as well.
inline bool dense_sizes_ok(int64_t T, int64_t P) {
  if (!sizes_ok(T, P)) return false;
  if (P == 0 || T == 0) return true;
  if (P > (int64_t(1) << 30)) return false;
  return T <= (std::numeric_limits<int64_t>::max() / 4) / P / P;
}

// bn_double_backward: N, C, S >= 0 and N * C * S fits int64 comfortably.
inline bool bn_sizes_ok(int64_t N, int64_t C, int64_t S) {
  return sizes_ok(N, C) && sizes_ok(N * C, S);
}

// Calls f(std::true_type{}) or f(std::false_type{}): turns run-time flags (an optional input
// is present) into template arguments, so that kernels drop the absent terms at compile time.
template <typename F>
inline auto bool_dispatch(bool v, F&& f) {
  return v ? f(std::true_type{}) : f(std::false_type{});
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- CUDA launch geometry (host code, also used for workspace sizes in CPU-only builds) ----
// Passes over [T, P] run on a grid of (blocks per task) x T blocks of kThreads threads.
constexpr int kThreads = 256;
// Elements a block covers per sweep: 16 per thread = four 16-byte loads of float per array,
// enough bytes in flight per thread to approach HBM bandwidth.
constexpr int64_t kChunk = 4096;

// Blocks per task: enough to cover P in one sweep, capped so that (a) the whole grid stays
// around a few thousand blocks (H100: 132 SMs x 8 resident blocks of 256 threads) and (b) the
// fixed-order sums over the per-block partials stay short (<= 512 values per task).
inline int blocks_per_task(int64_t T, int64_t P) {
  int64_t want = ceil_div(P > 0 ? P : 1, kChunk);
  int64_t cap = ceil_div(16384, T > 0 ? T : 1);
  if (cap < 4) cap = 4;
  if (cap > 512) cap = 512;
  return static_cast<int>(want < cap ? want : cap);
}

// Workspace segments are 256-byte aligned.
inline size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

inline size_t dtype_size(int dtype) {
  switch (dtype) {
    case IMF_FLOAT32: return 4;
    case IMF_FLOAT64: return 8;
    case IMF_FLOAT16: return 2;
    case IMF_BFLOAT16: return 2;
    default: return 0;
  }
}

// Size of the accumulation type: fp64 for fp64 vectors, fp32 for the others.
inline size_t acc_size(int dtype) { return dtype == IMF_FLOAT64 ? 8 : 4; }

// cg_update workspace: pass-1 partials [T, nb, 5], pass-2 partials [T, nb], per-task alpha and
// beta [T, 2] (acc) and flags [T] (int32).
struct CgWorkspace {
  size_t part1, part2, step, flags, total;
};
inline CgWorkspace cg_workspace_layout(int dtype, int64_t T, int64_t P) {
  const size_t a = acc_size(dtype);
  const size_t nb = static_cast<size_t>(blocks_per_task(T, P));
  const size_t t = static_cast<size_t>(T);
  CgWorkspace w;
  w.part1 = 0;
  w.part2 = w.part1 + align_up(t * nb * 5 * a);
  w.step = w.part2 + align_up(t * nb * a);
  w.flags = w.step + align_up(t * 2 * a);
  w.total = w.flags + align_up(t * sizeof(int32_t));
  return w;
}

}  // namespace imaml_fast

#endif  // IMAML_FAST_COMMON_H

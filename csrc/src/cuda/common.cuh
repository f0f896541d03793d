// Device helpers shared by the CUDA kernels: storage/accumulation types, 16-byte packs,
// deterministic block reductions, and dtype dispatch for the launchers.
#ifndef IMAML_FAST_CUDA_COMMON_CUH
#define IMAML_FAST_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "../common.h"

namespace imaml_fast {
namespace cuda {

// ---- types: reductions and arithmetic run in float for half/bfloat16 vectors ---------------
template <typename T>
struct Acc {
  using type = T;
};
template <>
struct Acc<__half> {
  using type = float;
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Largest finite value of the storage type (host side; passed to kernels as an argument).
template <typename T>
struct StorageMax;
template <>
struct StorageMax<float> {
  static constexpr double value = FLT_MAX;
};
template <>
struct StorageMax<double> {
  static constexpr double value = DBL_MAX;
};
template <>
struct StorageMax<__half> {
  static constexpr double value = 65504.0;
};
template <>
struct StorageMax<__nv_bfloat16> {
  static constexpr double value = 3.3895313892515355e38;
};

// ---- 16-byte packs: one ld.global.v4 / st.global.v4 per thread and array ------------------
// Used when every base pointer is 16-byte aligned and P is a multiple of the pack width, so
// that every row starts aligned; otherwise the kernels take scalar (still coalesced) loads.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

template <typename T>
constexpr int pack_width() {
  return static_cast<int>(16 / sizeof(T));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- deterministic reductions ---------------------------------------------------------------
// Fixed shuffle tree inside each warp, then warp 0 combines the per-warp values: the same
// order every run (no atomics), so results are bitwise reproducible for a given launch shape.
struct SumOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a + b;
  }
};
struct MaxOp {  // NaN-ignoring; NaN in the data also makes a dot product NaN, which is checked
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return b > a ? b : a;
  }
};

template <typename A, typename Op>
__device__ __forceinline__ A warp_reduce(A v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
  return v;
}

// Reduces N values per thread over the block; the results are valid in thread 0. Every thread
// of the block must call it (it synchronises). blockDim.x must be a multiple of 32, <= 1024.
template <int N, typename A, typename Op>
__device__ __forceinline__ void block_reduce(A (&v)[N], Op op) {
  __shared__ A sh[N][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = warp_reduce(v[k], op);
    if (lane == 0) sh[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A w = lane < nwarps ? sh[k][lane] : A(0);
      v[k] = warp_reduce(w, op);
    }
  }
  __syncthreads();  // sh may be reused by the next call
}

// Sum over the block, returned to every thread.
template <typename A>
__device__ __forceinline__ A block_sum_all(A v) {
  __shared__ A result;
  A a[1] = {v};
  block_reduce<1>(a, SumOp());
  if (threadIdx.x == 0) result = a[0];
  __syncthreads();
  const A out = result;
  __syncthreads();
  return out;
}

// ---- launch helpers --------------------------------------------------------------------------
inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Grid y (tasks) is limited to 65535; kernels loop over tasks with a stride of gridDim.y.
inline unsigned grid_tasks(int64_t T) { return static_cast<unsigned>(T < 65535 ? T : 65535); }

// Calls f(T{}) with the storage type named by dtype.
template <typename F>
int dispatch_all(int dtype, F&& f) {
  switch (dtype) {
    case IMF_FLOAT32: return f(float{});
    case IMF_FLOAT64: return f(double{});
    case IMF_FLOAT16: return f(__half{});
    case IMF_BFLOAT16: return f(__nv_bfloat16{});
    default: return IMF_ERR_DTYPE;
  }
}

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace cuda
}  // namespace imaml_fast

#endif  // IMAML_FAST_CUDA_COMMON_CUH

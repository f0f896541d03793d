// CUDA kernels of the elementwise / reduction ops: prox_update_cuda and batched_dot_cuda.
// CPU twins: ../cpu/vector_ops.cpp.
#include "common.cuh"

using namespace imaml_fast;
using namespace imaml_fast::cuda;

namespace {

// out = phi - lr * (g + lam * (phi - theta)) over a (blocks of P) x T grid. The 2-D grid keeps
// the broadcast of a shared theta [P] a plain index (no 64-bit modulo per element) and lets a
// shared theta stay in L2 for all tasks. One launch; arithmetic in the accumulation type.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    prox_update_kernel(const T* phi /* may alias out */, const T* __restrict__ g,
                       const T* __restrict__ theta, bool per_task, T* out, int64_t nT,
                       int64_t P, typename Acc<T>::type lr, typename Acc<T>::type lam) {
  using A = typename Acc<T>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t t = blockIdx.y; t < nT; t += gridDim.y) {
    const int64_t row = t * P;
    const T* th = per_task ? theta + row : theta;
#pragma unroll 4
    for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < P;
         i += stride) {
      const Pack<T, V> ph = load_pack<T, V>(phi + row + i);
      const Pack<T, V> gg = load_pack<T, V>(g + row + i);
      const Pack<T, V> tt = load_pack<T, V>(th + i);
      Pack<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A p = to_acc(ph.v[k]);
        o.v[k] = from_acc<T>(p - lr * (to_acc(gg.v[k]) + lam * (p - to_acc(tt.v[k]))));
      }
      store_pack<T, V>(out + row + i, o);
    }
  }
}

// Per-(block, task) partial sums of a.b in the accumulation type. When one block covers a
// task (nb == 1) the partial is the result and goes straight to out: one launch for small P.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    dot_partials_kernel(const T* __restrict__ a, const T* __restrict__ b,
                        typename Acc<T>::type* __restrict__ part, int64_t nT, int64_t P) {
  using A = typename Acc<T>::type;
  const int nb = gridDim.x;
  const int64_t stride = static_cast<int64_t>(nb) * blockDim.x * V;
  for (int64_t t = blockIdx.y; t < nT; t += gridDim.y) {
    const int64_t row = t * P;
    A s[1] = {A(0)};
#pragma unroll 4
    for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < P;
         i += stride) {
      const Pack<T, V> x = load_pack<T, V>(a + row + i);
      const Pack<T, V> y = load_pack<T, V>(b + row + i);
#pragma unroll
      for (int k = 0; k < V; ++k) s[0] += to_acc(x.v[k]) * to_acc(y.v[k]);
    }
    block_reduce<1>(s, SumOp());
    if (threadIdx.x == 0) part[t * nb + blockIdx.x] = s[0];
  }
}

// out[t] = the fixed-order sum of the nb partials of task t: one block per task.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t nT, int nb) {
  for (int64_t t = blockIdx.x; t < nT; t += gridDim.x) {
    A s[1] = {A(0)};
    for (int j = threadIdx.x; j < nb; j += blockDim.x) s[0] += part[t * nb + j];
    block_reduce<1>(s, SumOp());
    if (threadIdx.x == 0) out[t] = s[0];
  }
}

template <typename T>
int prox_update_launch(const void* phi, const void* g, const void* theta, int per_task, void* out,
                       int64_t nT, int64_t P, double lr, double lam, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  constexpr int V = pack_width<T>();
  const dim3 grid(blocks_per_task(nT, P), grid_tasks(nT));
  const bool vec = P % V == 0 && aligned16(phi) && aligned16(g) && aligned16(theta) &&
                   aligned16(out);
  auto ph = static_cast<const T*>(phi);
  auto gg = static_cast<const T*>(g);
  auto th = static_cast<const T*>(theta);
  auto o = static_cast<T*>(out);
  if (vec)
    prox_update_kernel<T, V><<<grid, kThreads, 0, stream>>>(ph, gg, th, per_task != 0, o, nT, P,
                                                             A(lr), A(lam));
  else
    prox_update_kernel<T, 1><<<grid, kThreads, 0, stream>>>(ph, gg, th, per_task != 0, o, nT, P,
                                                             A(lr), A(lam));
  return launch_status();
}

template <typename T>
int batched_dot_launch(const void* a, const void* b, void* out, int64_t nT, int64_t P,
                       void* ws, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  constexpr int V = pack_width<T>();
  const int nb = blocks_per_task(nT, P);
  const dim3 grid(nb, grid_tasks(nT));
  A* part = nb == 1 ? static_cast<A*>(out) : static_cast<A*>(ws);
  const bool vec = P % V == 0 && aligned16(a) && aligned16(b);
  auto x = static_cast<const T*>(a);
  auto y = static_cast<const T*>(b);
  if (vec)
    dot_partials_kernel<T, V><<<grid, kThreads, 0, stream>>>(x, y, part, nT, P);
  else
    dot_partials_kernel<T, 1><<<grid, kThreads, 0, stream>>>(x, y, part, nT, P);
  if (nb > 1) {
    const unsigned blocks = static_cast<unsigned>(nT < (1 << 20) ? nT : (1 << 20));
    sum_partials_kernel<A><<<blocks, kThreads, 0, stream>>>(part, static_cast<A*>(out), nT, nb);
  }
  return launch_status();
}

}  // namespace

extern "C" {

int prox_update_cuda(int dtype, const void* phi, const void* g, const void* theta,
                     int theta_per_task, void* out, int64_t T, int64_t P, double lr, double lam,
                     void* stream) {
  if (!sizes_ok(T, P)) return IMF_ERR_SIZE;
  if (T * P == 0) return IMF_OK;
  if (!phi || !g || !theta || !out) return IMF_ERR_NULL;
  return dispatch_all(dtype, [&](auto tag) {
    return prox_update_launch<decltype(tag)>(phi, g, theta, theta_per_task, out, T, P, lr, lam,
                                             as_stream(stream));
  });
}

int batched_dot_cuda(int dtype, const void* a, const void* b, void* out, int64_t T, int64_t P,
                     void* workspace, size_t workspace_bytes, void* stream) {
  if (!sizes_ok(T, P)) return IMF_ERR_SIZE;
  if (T == 0) return IMF_OK;
  if (!out || (P > 0 && (!a || !b))) return IMF_ERR_NULL;
  if (dtype_size(dtype) == 0) return IMF_ERR_DTYPE;
  if (blocks_per_task(T, P) > 1 &&
      (!workspace || workspace_bytes < batched_dot_cuda_workspace_size(dtype, T, P)))
    return IMF_ERR_WORKSPACE;
  return dispatch_all(dtype, [&](auto tag) {
    return batched_dot_launch<decltype(tag)>(a, b, out, T, P, workspace, as_stream(stream));
  });
}

}  // extern "C"

// CUDA kernels of the fused masked CG iteration: three launches per iteration,
//   pass 1  (grid: blocks of P x T)  p.Ap, r.Ap, Ap.Ap, max|r|, max|Ap| partials per block
//   pass 2  (grid: blocks of P x T)  every block sums its task's pass-1 partials in a fixed
//            order, runs the scalar stage, updates its slice of x, r, p in place and writes
//            its partial of r_new.r_new
//   finish  (one block per task)     exact rs_new, status, iters; the rare "risky" update
// The formulation and why it is two passes: ../cg_scalars.h. CPU twin: ../cpu/cg_update.cpp.
// Finished tasks (status != 0) exit at the top of every kernel: no memory traffic for them.
#include <cmath>

#include "../cg_scalars.h"
#include "common.cuh"

using namespace imaml_fast;
using namespace imaml_fast::cuda;

namespace {

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    cg_pass1_kernel(const T* __restrict__ r, const T* __restrict__ p, const T* __restrict__ Ap,
                    const int8_t* __restrict__ status, typename Acc<T>::type* __restrict__ part,
                    int64_t nT, int64_t P) {
  using A = typename Acc<T>::type;
  const int nb = gridDim.x;
  const int64_t stride = static_cast<int64_t>(nb) * blockDim.x * V;
  for (int64_t t = blockIdx.y; t < nT; t += gridDim.y) {
    if (status[t] != 0) continue;  // uniform over the block
    const int64_t row = t * P;
    A s[3] = {A(0), A(0), A(0)};  // p.Ap, r.Ap, Ap.Ap
    A m[2] = {A(0), A(0)};        // max|r|, max|Ap|
#pragma unroll 4
    for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < P;
         i += stride) {
      const Pack<T, V> pv = load_pack<T, V>(p + row + i);
      const Pack<T, V> av = load_pack<T, V>(Ap + row + i);
      const Pack<T, V> rv = load_pack<T, V>(r + row + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A pk = to_acc(pv.v[k]), ak = to_acc(av.v[k]), rk = to_acc(rv.v[k]);
        s[0] += pk * ak;
        s[1] += rk * ak;
        s[2] += ak * ak;
        m[0] = MaxOp()(m[0], fabs(rk));
        m[1] = MaxOp()(m[1], fabs(ak));
      }
    }
    block_reduce<3>(s, SumOp());
    block_reduce<2>(m, MaxOp());
    if (threadIdx.x == 0) {
      A* o = part + (t * nb + blockIdx.x) * 5;
      o[0] = s[0];
      o[1] = s[1];
      o[2] = s[2];
      o[3] = m[0];
      o[4] = m[1];
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    cg_pass2_kernel(T* __restrict__ x, T* __restrict__ r, T* __restrict__ p,
                    const T* __restrict__ Ap, const typename Acc<T>::type* __restrict__ rs,
                    const int8_t* __restrict__ status, const int64_t* __restrict__ iters,
                    const typename Acc<T>::type* __restrict__ part1,
                    typename Acc<T>::type* __restrict__ part2,
                    typename Acc<T>::type* __restrict__ step, int32_t* __restrict__ flags_out,
                    int64_t nT, int64_t P, typename Acc<T>::type norm_limit,
                    typename Acc<T>::type elem_limit) {
  using A = typename Acc<T>::type;
  __shared__ CgStep<A> sh_step;
  const int nb = gridDim.x;
  const int64_t stride = static_cast<int64_t>(nb) * blockDim.x * V;
  for (int64_t t = blockIdx.y; t < nT; t += gridDim.y) {
    const int8_t st = status[t];
    if (st != 0) {
      if (blockIdx.x == 0 && threadIdx.x == 0) flags_out[t] = 0;  // finish: not active
      continue;
    }
    // Every block of the task sums the same partials in the same order, so all blocks get
    // bitwise the same scalars (and block 0's copy in `step` equals them).
    A s[3] = {A(0), A(0), A(0)};
    A m[2] = {A(0), A(0)};
    for (int j = threadIdx.x; j < nb; j += blockDim.x) {
      const A* q = part1 + (t * nb + j) * 5;
      s[0] += q[0];
      s[1] += q[1];
      s[2] += q[2];
      m[0] = MaxOp()(m[0], q[3]);
      m[1] = MaxOp()(m[1], q[4]);
    }
    block_reduce<3>(s, SumOp());
    block_reduce<2>(m, MaxOp());
    if (threadIdx.x == 0) {
      sh_step = cg_scalars<A>(st, iters[t], rs[t], s[0], s[1], s[2], m[0], m[1], norm_limit,
                              elem_limit);
      if (blockIdx.x == 0) {
        step[2 * t] = sh_step.alpha;
        step[2 * t + 1] = sh_step.beta;
        flags_out[t] = sh_step.flags;
      }
    }
    __syncthreads();
    const int flags = sh_step.flags;
    const A alpha = sh_step.alpha, beta = sh_step.beta;
    __syncthreads();  // sh_step is rewritten for the next task of this block
    const int64_t row = t * P;
    const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
    A rr[1] = {A(0)};
    if ((flags & kCgOk) && !(flags & kCgRisky)) {
#pragma unroll 4
      for (int64_t i = i0; i < P; i += stride) {
        Pack<T, V> xv = load_pack<T, V>(x + row + i);
        Pack<T, V> rv = load_pack<T, V>(r + row + i);
        Pack<T, V> pv = load_pack<T, V>(p + row + i);
        const Pack<T, V> av = load_pack<T, V>(Ap + row + i);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A pk = to_acc(pv.v[k]);
          xv.v[k] = from_acc<T>(to_acc(xv.v[k]) + alpha * pk);
          const T rn = from_acc<T>(to_acc(rv.v[k]) - alpha * to_acc(av.v[k]));
          const A rk = to_acc(rn);  // the stored value, as the reference sums it
          rv.v[k] = rn;
          pv.v[k] = from_acc<T>(rk + beta * pk);
          rr[0] += rk * rk;
        }
        store_pack<T, V>(x + row + i, xv);
        store_pack<T, V>(r + row + i, rv);
        store_pack<T, V>(p + row + i, pv);
      }
    } else if (flags & kCgOk) {  // risky: measure r_new.r_new, write nothing
      for (int64_t i = i0; i < P; i += stride) {
        const Pack<T, V> rv = load_pack<T, V>(r + row + i);
        const Pack<T, V> av = load_pack<T, V>(Ap + row + i);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A rk = to_acc(from_acc<T>(to_acc(rv.v[k]) - alpha * to_acc(av.v[k])));
          rr[0] += rk * rk;
        }
      }
    } else if (flags & kCgFirstNegative) {  // steepest-descent step x + r0 (p = r0 here)
      for (int64_t i = i0; i < P; i += stride) {
        Pack<T, V> xv = load_pack<T, V>(x + row + i);
        const Pack<T, V> pv = load_pack<T, V>(p + row + i);
#pragma unroll
        for (int k = 0; k < V; ++k) xv.v[k] = from_acc<T>(to_acc(xv.v[k]) + to_acc(pv.v[k]));
        store_pack<T, V>(x + row + i, xv);
      }
    }
    if (flags & kCgOk) {  // uniform over the block
      block_reduce<1>(rr, SumOp());
      if (threadIdx.x == 0) part2[t * nb + blockIdx.x] = rr[0];
    }
  }
}

// One block per task: exact rs_new (fixed-order sum of the pass-2 partials), status, iters;
// then, for a risky task that did not overflow, the classic update over the whole row with the
// exact beta (one block does it: a slow path for a case that needs an overflow-scale residual).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cg_finish_kernel(T* __restrict__ x, T* __restrict__ r, T* __restrict__ p,
                     const T* __restrict__ Ap, typename Acc<T>::type* __restrict__ rs,
                     int8_t* __restrict__ status, int64_t* __restrict__ iters,
                     const typename Acc<T>::type* __restrict__ thresh,
                     const typename Acc<T>::type* __restrict__ part2,
                     const typename Acc<T>::type* __restrict__ step,
                     const int32_t* __restrict__ flags_in, int64_t nT, int64_t P, int nb) {
  using A = typename Acc<T>::type;
  __shared__ int sh_apply;
  __shared__ A sh_beta;
  for (int64_t t = blockIdx.x; t < nT; t += gridDim.x) {
    const int flags = flags_in[t];
    if (!(flags & kCgActive)) continue;  // uniform over the block
    A s[1] = {A(0)};
    if (flags & kCgOk)
      for (int j = threadIdx.x; j < nb; j += blockDim.x) s[0] += part2[t * nb + j];
    block_reduce<1>(s, SumOp());
    if (threadIdx.x == 0) {
      const A rs_old = rs[t];
      const bool apply = cg_finish<A>(flags, s[0], thresh[t], rs + t, status + t, iters + t);
      sh_apply = apply ? 1 : 0;
      sh_beta = rs_old > A(0) ? s[0] / rs_old : A(0);
    }
    __syncthreads();
    if (sh_apply) {
      const A alpha = step[2 * t], beta = sh_beta;
      const int64_t row = t * P;
      for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
        const A pk = to_acc(p[row + i]);
        x[row + i] = from_acc<T>(to_acc(x[row + i]) + alpha * pk);
        const T rn = from_acc<T>(to_acc(r[row + i]) - alpha * to_acc(Ap[row + i]));
        r[row + i] = rn;
        p[row + i] = from_acc<T>(to_acc(rn) + beta * pk);
      }
    }
    __syncthreads();  // sh_apply / sh_beta are rewritten for the next task of this block
  }
}

template <typename T>
int cg_update_launch(int dtype, void* x, void* r, void* p, const void* Ap, void* rs,
                     int8_t* status, int64_t* iters, const void* thresh, int64_t nT, int64_t P,
                     void* workspace, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  constexpr int V = pack_width<T>();
  const int nb = blocks_per_task(nT, P);
  const CgWorkspace w = cg_workspace_layout(dtype, nT, P);
  char* ws = static_cast<char*>(workspace);
  A* part1 = reinterpret_cast<A*>(ws + w.part1);
  A* part2 = reinterpret_cast<A*>(ws + w.part2);
  A* step = reinterpret_cast<A*>(ws + w.step);
  int32_t* flags = reinterpret_cast<int32_t*>(ws + w.flags);
  const A norm_limit = static_cast<A>(std::sqrt(static_cast<double>(StorageMax<A>::value)) / 4);
  const A elem_limit = static_cast<A>(StorageMax<T>::value / 2);

  T* xx = static_cast<T*>(x);
  T* rr = static_cast<T*>(r);
  T* pp = static_cast<T*>(p);
  const T* aa = static_cast<const T*>(Ap);
  A* rss = static_cast<A*>(rs);
  const A* th = static_cast<const A*>(thresh);
  const dim3 grid(nb, grid_tasks(nT));
  const bool vec = P % V == 0 && aligned16(x) && aligned16(r) && aligned16(p) && aligned16(Ap);
  if (vec) {
    cg_pass1_kernel<T, V><<<grid, kThreads, 0, stream>>>(rr, pp, aa, status, part1, nT, P);
    cg_pass2_kernel<T, V><<<grid, kThreads, 0, stream>>>(xx, rr, pp, aa, rss, status, iters,
                                                          part1, part2, step, flags, nT, P,
                                                          norm_limit, elem_limit);
  } else {
    cg_pass1_kernel<T, 1><<<grid, kThreads, 0, stream>>>(rr, pp, aa, status, part1, nT, P);
    cg_pass2_kernel<T, 1><<<grid, kThreads, 0, stream>>>(xx, rr, pp, aa, rss, status, iters,
                                                          part1, part2, step, flags, nT, P,
                                                          norm_limit, elem_limit);
  }
  const unsigned blocks = static_cast<unsigned>(nT < (1 << 20) ? nT : (1 << 20));
  cg_finish_kernel<T><<<blocks, kThreads, 0, stream>>>(xx, rr, pp, aa, rss, status, iters, th,
                                                        part2, step, flags, nT, P, nb);
  return launch_status();
}

}  // namespace

extern "C" int cg_update_cuda(int dtype, void* x, void* r, void* p, const void* Ap, void* rs,
                              int8_t* status, int64_t* iters, const void* thresh, int64_t T,
                              int64_t P, void* workspace, size_t workspace_bytes, void* stream) {
  if (!sizes_ok(T, P)) return IMF_ERR_SIZE;
  if (T == 0) return IMF_OK;
  if (!rs || !status || !iters || !thresh) return IMF_ERR_NULL;
  if (P > 0 && (!x || !r || !p || !Ap)) return IMF_ERR_NULL;
  if (dtype_size(dtype) == 0) return IMF_ERR_DTYPE;
  if (!workspace || workspace_bytes < cg_update_cuda_workspace_size(dtype, T, P))
    return IMF_ERR_WORKSPACE;
  return dispatch_all(dtype, [&](auto tag) {
    return cg_update_launch<decltype(tag)>(dtype, x, r, p, Ap, rs, status, iters, thresh, T, P,
                                           workspace, as_stream(stream));
  });
}

// dense_cg_cuda: the whole CG solve of (shift I + scale H_t) x_t = b_t for every task in ONE
// launch: one thread block per task runs all iterations, with block-level reductions in
// shared memory and no host round trip (a matrix-free solve pays 3 launches per iteration plus
// the matvec's). Meant for small P, where H [T, P, P] is materialised (e.g. tests, the
// last-layer / sinusoid settings); each iteration streams H_t once (L2-resident for P <= ~1k).
// Semantics: classic CG from x0 = 0 as in imaml_fast.cg.cg_solve + cg_update_ref. CPU twin:
// ../cpu/dense_cg.cpp.
#include <cmath>

#include "../cg_scalars.h"
#include "common.cuh"

using namespace imaml_fast;
using namespace imaml_fast::cuda;

namespace {

// The vectors live in global memory (x in the output, r / p / q in the workspace) so any P
// works; __syncthreads() orders the block's global-memory accesses between phases. Every
// decision uses values broadcast to the whole block, so `break` is uniform.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dense_cg_kernel(const T* __restrict__ H, const T* __restrict__ b, T* __restrict__ x,
                    int64_t* __restrict__ iters_out, T* __restrict__ residual,
                    int8_t* __restrict__ status_out, T* __restrict__ ws, int64_t nT, int64_t P,
                    T shift, T scale, int64_t max_iter, T tol2) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t t = blockIdx.x; t < nT; t += gridDim.x) {
    const T* Ht = H + t * P * P;
    const T* bt = b + t * P;
    T* xt = x + t * P;
    T* r = ws + t * 3 * P;
    T* p = r + P;
    T* q = p + P;  // A p, then the candidate r_new (swapped with r when accepted)
    T bb = T(0);
    for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
      const T v = bt[i];
      xt[i] = T(0);
      r[i] = v;
      p[i] = v;
      bb += v * v;
    }
    T rs = block_sum_all(bb);
    const T thresh = tol2 * rs;
    int status = 0;
    if (rs <= thresh) status = 1;
    if (!imf_finite(rs)) status = 3;
    int64_t iters = 0;
    for (int64_t k = 0; k < max_iter && status == 0; ++k) {
      __syncthreads();  // p (and r) of the previous iteration are visible to every warp
      // q = shift p + scale H p: one warp per row, lanes stride the row (coalesced reads of
      // H), fixed shuffle tree per row.
      for (int64_t i = warp; i < P; i += nwarps) {
        const T* hrow = Ht + i * P;
        T s = T(0);
        for (int64_t j = lane; j < P; j += 32) s += hrow[j] * p[j];
        s = warp_reduce(s, SumOp());
        if (lane == 0) q[i] = shift * p[i] + scale * s;
      }
      __syncthreads();
      T part = T(0);
      for (int64_t i = threadIdx.x; i < P; i += blockDim.x) part += p[i] * q[i];
      const T pAp = block_sum_all(part);
      if (!imf_finite(pAp)) {
        status = 3;
        break;
      }
      if (!(pAp > T(0))) {
        status = 2;
        if (iters == 0)  // steepest-descent step x0 + r0 (= b)
          for (int64_t i = threadIdx.x; i < P; i += blockDim.x) xt[i] = xt[i] + p[i];
        break;
      }
      const T alpha = rs / pAp;
      part = T(0);
      for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
        const T rn = r[i] - alpha * q[i];
        q[i] = rn;
        part += rn * rn;
      }
      const T rs_new = block_sum_all(part);
      if (!imf_finite(rs_new)) {  // keep the last finite iterate
        status = 3;
        break;
      }
      for (int64_t i = threadIdx.x; i < P; i += blockDim.x) xt[i] = xt[i] + alpha * p[i];
      ++iters;
      T* tmp = r;
      r = q;
      q = tmp;
      if (rs_new <= thresh) {
        rs = rs_new;
        status = 1;
        break;
      }
      const T beta = rs_new / rs;
      for (int64_t i = threadIdx.x; i < P; i += blockDim.x) p[i] = r[i] + beta * p[i];
      rs = rs_new;
    }
    if (threadIdx.x == 0) {
      iters_out[t] = iters;
      residual[t] = sqrt(rs);
      status_out[t] = static_cast<int8_t>(status);
    }
  }
}

template <typename T>
int dense_cg_launch(const void* H, const void* b, void* x, int64_t* iters, void* residual,
                    int8_t* status, int64_t nT, int64_t P, double shift, double scale,
                    int64_t max_iter, double tol, void* ws, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(nT < (1 << 20) ? nT : (1 << 20));
  dense_cg_kernel<T><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(H), static_cast<const T*>(b), static_cast<T*>(x), iters,
      static_cast<T*>(residual), status, static_cast<T*>(ws), nT, P, static_cast<T>(shift),
      static_cast<T>(scale), max_iter, static_cast<T>(tol * tol));
  return launch_status();
}

}  // namespace

extern "C" int dense_cg_cuda(int dtype, const void* H, const void* b, void* x, int64_t* iters,
                             void* residual, int8_t* status, int64_t T, int64_t P, double shift,
                             double scale, int64_t max_iter, double tol, void* workspace,
                             size_t workspace_bytes, void* stream) {
  if (!dense_sizes_ok(T, P)) return IMF_ERR_SIZE;
  if (max_iter < 0 || !(tol >= 0)) return IMF_ERR_ARG;
  if (dtype != IMF_FLOAT32 && dtype != IMF_FLOAT64) return IMF_ERR_DTYPE;
  if (T == 0) return IMF_OK;
  if (!iters || !residual || !status) return IMF_ERR_NULL;
  if (P > 0 && (!H || !b || !x)) return IMF_ERR_NULL;
  if (P > 0 && (!workspace || workspace_bytes < dense_cg_cuda_workspace_size(dtype, T, P)))
    return IMF_ERR_WORKSPACE;
  if (dtype == IMF_FLOAT32)
    return dense_cg_launch<float>(H, b, x, iters, residual, status, T, P, shift, scale, max_iter,
                                  tol, workspace, as_stream(stream));
  return dense_cg_launch<double>(H, b, x, iters, residual, status, T, P, shift, scale, max_iter,
                                 tol, workspace, as_stream(stream));
}

// CUDA kernel of bn_double_backward: the vector-Jacobian product of BatchNorm's backward pass
// (semantics: imaml_fast.layers.batch_norm_double_backward; formulas in imaml_fast.h).
// CPU twin: ../cpu/batch_norm.cpp.
//
// One thread block per channel (grid-stride over channels): each thread walks the channel's
// M = N * S elements m = tid, tid + blockDim, ... summing gy, gy xh, a, a xh, a gy in the
// accumulation type; a deterministic block reduction (fixed shuffle tree, no atomics) gives
// the five means; then the same walk writes dgy and dx. The absent optional inputs (a, b, c)
// are template flags: their terms (and loads) are dropped at compile time.
//
// Element m = n * S + s of channel ch sits at (n * C + ch) * S + s. The walk advances (n, s)
// by blockDim without a 64-bit division per element. Loads are coalesced along s; for 2-D
// inputs (S = 1) the threads of a block read a strided column (one channel per block is the
// price of a single launch with no workspace and no atomics).
#include "../bn_scalars.h"
#include "common.cuh"

using namespace imaml_fast;
using namespace imaml_fast::cuda;

namespace {

template <typename T, bool HA, bool HB, bool HC>
__global__ void __launch_bounds__(kThreads)
    bn_double_backward_kernel(const T* __restrict__ a, const T* __restrict__ b,
                              const T* __restrict__ c, const T* __restrict__ gy,
                              const T* __restrict__ x, const T* __restrict__ mean,
                              const T* __restrict__ invstd, const T* __restrict__ weight,
                              T* __restrict__ dgy, T* __restrict__ dx, T* __restrict__ dw,
                              int64_t N, int64_t C, int64_t S) {
  __shared__ T sums[5];
  const int64_t M = N * S;
  const T Mt = static_cast<T>(M);
  const int64_t nt = blockDim.x;
  const int64_t step_n = nt / S, step_s = nt % S;  // (n, s) advance per step of the walk
  const int64_t n0 = threadIdx.x / S, s0 = threadIdx.x % S;
  for (int64_t ch = blockIdx.x; ch < C; ch += gridDim.x) {
    const T mu = mean[ch];
    const T r = invstd[ch];
    // Pass 1: sums of gy, gy xh and (with a) a, a xh, a gy.
    T v[5] = {T(0), T(0), T(0), T(0), T(0)};
    {
      int64_t n = n0, s = s0;
      for (int64_t m = threadIdx.x; m < M; m += nt) {
        const int64_t i = (n * C + ch) * S + s;
        const T xh = (x[i] - mu) * r;
        const T gv = gy[i];
        v[0] += gv;
        v[1] += gv * xh;
        if (HA) {
          const T av = a[i];
          v[2] += av;
          v[3] += av * xh;
          v[4] += av * gv;
        }
        n += step_n;
        s += step_s;
        if (s >= S) {
          s -= S;
          ++n;
        }
      }
    }
    block_reduce<5>(v, SumOp());
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < 5; ++k) sums[k] = v[k];
    }
    __syncthreads();
    const BnChannel<T> kc = bn_channel<T, HA, HB, HC>(
        sums, Mt, mu, r, weight ? weight[ch] : T(1), HB ? b[ch] : T(0), HC ? c[ch] : T(0));
    __syncthreads();  // sums is rewritten for the next channel
    // Pass 2: dgy, dx.
    {
      int64_t n = n0, s = s0;
      for (int64_t m = threadIdx.x; m < M; m += nt) {
        const int64_t i = (n * C + ch) * S + s;
        bn_element<T, HA, HB, HC>(kc, x[i], gy[i], HA ? a[i] : T(0), dgy + i, dx + i);
        n += step_n;
        s += step_s;
        if (s >= S) {
          s -= S;
          ++n;
        }
      }
    }
    if (dw != nullptr && threadIdx.x == 0) dw[ch] = kc.dw;
  }
}

template <typename T>
__global__ void fill_zero_kernel(T* __restrict__ p, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = T(0);
}

inline unsigned channel_blocks(int64_t C) {
  return static_cast<unsigned>(C < (int64_t(1) << 20) ? C : (int64_t(1) << 20));
}

template <typename T>
int bn_double_backward_launch(const void* a, const void* b, const void* c, const void* gy,
                              const void* x, const void* mean, const void* invstd,
                              const void* weight, void* dgy, void* dx, void* dw, int64_t N,
                              int64_t C, int64_t S, cudaStream_t stream) {
  if (N * S == 0) {  // no elements: only dw, which is 0
    if (dw) {
      const int64_t want = ceil_div(C, kThreads);
      const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
      fill_zero_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<T*>(dw), C);
    }
    return launch_status();
  }
  bool_dispatch(a != nullptr, [&](auto ha) {
    bool_dispatch(b != nullptr, [&](auto hb) {
      bool_dispatch(c != nullptr, [&](auto hc) {
        bn_double_backward_kernel<T, decltype(ha)::value, decltype(hb)::value,
                                  decltype(hc)::value>
            <<<channel_blocks(C), kThreads, 0, stream>>>(
                static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(c),
                static_cast<const T*>(gy), static_cast<const T*>(x),
                static_cast<const T*>(mean), static_cast<const T*>(invstd),
                static_cast<const T*>(weight), static_cast<T*>(dgy), static_cast<T*>(dx),
                static_cast<T*>(dw), N, C, S);
      });
    });
  });
  return launch_status();
}

}  // namespace

extern "C" {

int bn_double_backward_cuda(int dtype, const void* a, const void* b, const void* c,
                            const void* gy, const void* x, const void* mean, const void* invstd,
                            const void* weight, void* dgy, void* dx, void* dw, int64_t N,
                            int64_t C, int64_t S, void* stream) {
  if (!bn_sizes_ok(N, C, S)) return IMF_ERR_SIZE;
  if (dtype != IMF_FLOAT32 && dtype != IMF_FLOAT64) return IMF_ERR_DTYPE;
  if (C == 0) return IMF_OK;
  if (N * S > 0 && (!gy || !x || !mean || !invstd || !dgy || !dx)) return IMF_ERR_NULL;
  if (dtype == IMF_FLOAT32)
    return bn_double_backward_launch<float>(a, b, c, gy, x, mean, invstd, weight, dgy, dx, dw,
                                            N, C, S, as_stream(stream));
  return bn_double_backward_launch<double>(a, b, c, gy, x, mean, invstd, weight, dgy, dx, dw, N,
                                           C, S, as_stream(stream));
}

}  // extern "C"

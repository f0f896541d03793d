/* imaml_fast: the C ABI of the kernel library (CPU twins and CUDA kernels).
 *
 * Every function takes raw pointers, sizes and a dtype code, and (for CUDA) a stream and a
 * caller-allocated device workspace. Nothing here knows about PyTorch: one build of the
 * library serves every torch version (the Python bindings pass tensor.data_ptr() values).
 *
 * Layout: every vector argument is a contiguous row-major [T, P] array (T tasks, P
 * parameters per task); per-task scalars are contiguous [T] arrays. Reductions accumulate in
 * the accumulation type: float for float16/bfloat16 vectors, the vector type itself for
 * float32/float64 ("acc" below).
 *
 * Return value: 0 on success; a negative IMF_ERR_* code for a bad argument; a positive value
 * is a cudaError_t from the launch. imaml_fast_strerror() turns either into a message.
 * The *_cuda functions exist in every build; without CUDA they return IMF_ERR_NO_CUDA.
 * Kernels are launched asynchronously on `stream` (a cudaStream_t; NULL is the legacy
 * default stream) on the calling thread's current device.
 */
#ifndef IMAML_FAST_IMAML_FAST_H
#define IMAML_FAST_IMAML_FAST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define IMAML_FAST_ABI_VERSION 3

/* dtype codes */
#define IMF_FLOAT32 0
#define IMF_FLOAT64 1
#define IMF_FLOAT16 2
#define IMF_BFLOAT16 3

/* error codes (negative; positive values are cudaError_t) */
#define IMF_OK 0
#define IMF_ERR_DTYPE (-1)        /* dtype not supported by this op / twin */
#define IMF_ERR_SIZE (-2)         /* T or P negative, or too large */
#define IMF_ERR_NULL (-3)         /* a required pointer is NULL while T * P > 0 */
#define IMF_ERR_WORKSPACE (-4)    /* workspace missing or smaller than *_workspace_size() */
#define IMF_ERR_NO_CUDA (-5)      /* the library was built without CUDA */
#define IMF_ERR_ARG (-6)          /* another bad argument (e.g. max_iter < 0) */

/* CG status codes (int8 per task), the same as imaml_fast.cg */
#define IMF_CG_MAX_ITER 0 /* still running / ran out of iterations */
#define IMF_CG_CONVERGED 1
#define IMF_CG_NEGATIVE_CURVATURE 2
#define IMF_CG_NONFINITE 3

/* ---- library information ---------------------------------------------------------------- */
int imaml_fast_abi_version(void);
int imaml_fast_has_cuda(void);               /* 1 when the CUDA kernels were compiled in */
const char* imaml_fast_cuda_archs(void);     /* e.g. "80;90", "" without CUDA */
const char* imaml_fast_no_cuda_reason(void); /* why CUDA is absent, "" when present */
const char* imaml_fast_cxx_compiler(void);   /* e.g. "GNU 12.2.0" */
const char* imaml_fast_cuda_compiler(void);  /* e.g. "NVIDIA 13.0.88", "" without CUDA */
const char* imaml_fast_strerror(int code);

/* ---- CPU twins: threads ---------------------------------------------------------------------
 * The *_cpu functions split their tasks over this many threads (default 1; values < 1 mean 1).
 * Each task is computed by one thread with the same operations in the same order, so results
 * are bit-identical for every thread count. Small calls (T * P below 65,536) stay on the
 * calling thread. Per calling thread, like OpenMP's own count: a thread's setting applies to
 * the calls it makes (threads that each run calls concurrently can each use one thread). */
void imaml_fast_set_cpu_threads(int n);
int imaml_fast_cpu_threads(void);

/* ---- prox_update: out = phi - lr * (g + lam * (phi - theta)) -------------------------------
 * phi, g, out: [T, P]; theta: [P] when theta_per_task == 0, else [T, P]. out may alias phi.
 * CPU: float32/float64. CUDA: float32/float64/float16/bfloat16 (computed in float). */
int prox_update_cpu(int dtype, const void* phi, const void* g, const void* theta,
                    int theta_per_task, void* out, int64_t T, int64_t P, double lr, double lam);
int prox_update_cuda(int dtype, const void* phi, const void* g, const void* theta,
                     int theta_per_task, void* out, int64_t T, int64_t P, double lr, double lam,
                     void* stream);

/* ---- batched_dot: out[t] = sum_i a[t, i] * b[t, i], out in acc type ------------------------
 * Deterministic: per-block partial sums, then a fixed-order sum (no float atomics). */
int batched_dot_cpu(int dtype, const void* a, const void* b, void* out, int64_t T, int64_t P);
size_t batched_dot_cuda_workspace_size(int dtype, int64_t T, int64_t P);
int batched_dot_cuda(int dtype, const void* a, const void* b, void* out, int64_t T, int64_t P,
                     void* workspace, size_t workspace_bytes, void* stream);

/* ---- cg_update: one masked conjugate-gradient iteration for all T tasks, in place ---------
 * x, r, p (updated), Ap (read): [T, P] of dtype; rs (updated), thresh (read): [T] acc;
 * status: [T] int8 (updated); iters: [T] int64 (updated). Tasks whose status is not
 * IMF_CG_MAX_ITER are not touched. Semantics: imaml_fast.cg.cg_update_ref; formulation: the
 * two-pass fused iteration described in src/cg_scalars.h. */
int cg_update_cpu(int dtype, void* x, void* r, void* p, const void* Ap, void* rs, int8_t* status,
                  int64_t* iters, const void* thresh, int64_t T, int64_t P);
size_t cg_update_cuda_workspace_size(int dtype, int64_t T, int64_t P);
int cg_update_cuda(int dtype, void* x, void* r, void* p, const void* Ap, void* rs,
                   int8_t* status, int64_t* iters, const void* thresh, int64_t T, int64_t P,
                   void* workspace, size_t workspace_bytes, void* stream);

/* ---- dense_cg: the whole CG solve of (shift I + scale H_t) x_t = b_t, x0 = 0 ----------------
 * H: [T, P, P] row-major; b, x (written): [T, P]; iters: [T] int64, residual: [T] (sqrt of
 * the recursive r.r), status: [T] int8 (all written). float32/float64 only. Classic CG with
 * the status semantics of imaml_fast.cg.cg_solve + cg_update_ref. CUDA: one thread block per
 * task runs every iteration (one launch); the workspace holds r, p and Ap. */
int dense_cg_cpu(int dtype, const void* H, const void* b, void* x, int64_t* iters,
                 void* residual, int8_t* status, int64_t T, int64_t P, double shift, double scale,
                 int64_t max_iter, double tol);
size_t dense_cg_cuda_workspace_size(int dtype, int64_t T, int64_t P);
int dense_cg_cuda(int dtype, const void* H, const void* b, void* x, int64_t* iters,
                  void* residual, int8_t* status, int64_t T, int64_t P, double shift,
                  double scale, int64_t max_iter, double tol, void* workspace,
                  size_t workspace_bytes, void* stream);

/* ---- bn_double_backward: the vector-Jacobian product of BatchNorm's backward pass ----------
 * BatchNorm with batch statistics over M = N * S elements per channel; its backward pass is
 * gx = g r (gy - <gy> - xh <gy xh>), gweight = M <gy xh>, gbias = M <gy>, with
 * xh = (x - mean) invstd, r = invstd, g = weight and <.> the per-channel mean. Given the
 * cotangents a, b, c of (gx, gweight, gbias) this computes, per channel, with abar = <a>,
 * gbar = <gy>, P = <gy xh>, Q = <a xh>, A = <a gy>:
 *   dgy = g r (a - abar - xh Q) + b xh + c
 *   dx  = g r^2 (-xh (A - abar gbar - 3 P Q) - Q (gy - gbar) - P (a - abar))
 *         + b r (gy - gbar - xh P)
 *   dw  = r M (A - abar gbar - P Q)
 * (semantics: imaml_fast.layers.batch_norm_double_backward).
 * x, gy, a, dgy, dx: contiguous [N, C, S] (S = product of the spatial dims, 1 for [N, C]);
 * mean, invstd, weight, b, c, dw: [C]. a, b, c may be NULL (zero: their terms are dropped);
 * weight may be NULL (g = 1); dw may be NULL (not written); dw = 0 when a is NULL. With
 * M == 0 only dw is written (0). Two passes over each channel's data: the five sums (acc
 * type), then dgy and dx. CPU: channels spread over the threads (each channel on one
 * thread: bit-identical for any thread count). CUDA: one thread block per channel,
 * deterministic block reductions. float32/float64 only (IMF_ERR_DTYPE otherwise). */
int bn_double_backward_cpu(int dtype, const void* a, const void* b, const void* c, const void* gy,
                           const void* x, const void* mean, const void* invstd,
                           const void* weight, void* dgy, void* dx, void* dw, int64_t N,
                           int64_t C, int64_t S);
int bn_double_backward_cuda(int dtype, const void* a, const void* b, const void* c,
                            const void* gy, const void* x, const void* mean, const void* invstd,
                            const void* weight, void* dgy, void* dx, void* dw, int64_t N,
                            int64_t C, int64_t S, void* stream);

/* ---- conv2d_input_grad: the input gradient of a grouped 2-D convolution (CPU only) ----
 * gx = d<gy, conv2d(x, w, stride, padding, dilation, groups=G)>/dx, what
 * aten::convolution_backward returns first with output_mask [True, False, False].
 * gy [N, G*O, Ho, Wo], w [G*O, C, KH, KW], gx [N, G*C, H, W] (overwritten), all contiguous;
 * Ho and Wo must be the convolution's output size. Groups spread over the threads, each
 * group on one thread (bit-identical for any thread count); per group a register-tiled
 * product per input channel and a scatter-add into gx (csrc/src/cpu/conv_input_grad.cpp).
 * float32/float64 (IMF_ERR_DTYPE otherwise). */
int conv2d_input_grad_cpu(int dtype, const void* gy, const void* w, void* gx, int64_t N,
                          int64_t G, int64_t C, int64_t O, int64_t H, int64_t W, int64_t Ho,
                          int64_t Wo, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph,
                          int64_t pw, int64_t dh, int64_t dw);

/* ---- bn_relu: BatchNorm with batch statistics, then ReLU, as one layer (CPU only) ----
 * x, y, gy, gx: contiguous [N, C, S] (S: the spatial elements, 1 for [N, C]); weight, bias:
 * [C] or NULL (1 and 0); mean, invstd: [C].
 * forward:  mean_c, invstd_c = 1/sqrt(var_c + eps) (biased variance over the N*S elements of
 *           channel c), y = max(0, (x - mean) invstd w + b); writes y, mean, invstd.
 * backward: with z = (x - mean) invstd w + b and g = gy where z > 0, else 0 (the forward's
 *           mask, recomputed from x): gb = sum g, gw = sum g xh, gx = w invstd (g - <g> -
 *           xh <g xh>), xh = (x - mean) invstd, <.> the channel's mean; gx, gw, gb may each be
 *           NULL (not computed).
 * Channels spread over the threads (each on one thread: bit-identical for any thread
 * count), the channel's elements kept in cache between passes (csrc/src/cpu/bn_relu.cpp).
 * N * S must be positive (IMF_ERR_SIZE). float32/float64 (IMF_ERR_DTYPE otherwise). */
int bn_relu_forward_cpu(int dtype, const void* x, const void* weight, const void* bias, void* y,
                        void* mean, void* invstd, int64_t N, int64_t C, int64_t S, double eps);
int bn_relu_backward_cpu(int dtype, const void* gy, const void* x, const void* mean,
                         const void* invstd, const void* weight, const void* bias, void* gx,
                         void* gw, void* gb, int64_t N, int64_t C, int64_t S);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* IMAML_FAST_IMAML_FAST_H */

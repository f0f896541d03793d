// imaml_fast._C: the C ABI of csrc/include/imaml_fast/imaml_fast.h for Python. Tensors travel
// as their data_ptr() ints (plus sizes and a dtype code), streams as ints
// (torch.cuda.current_stream().cuda_stream): no PyTorch headers, so one build serves every
// torch version. Argument checking (shapes, dtypes, devices, contiguity) is done by the
// Python wrappers in imaml_fast/backends/cpp.py; a non-zero return code raises RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "imaml_fast/imaml_fast.h"

namespace py = pybind11;

namespace {

template <typename T = void>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(int rc, const char* op) {
  if (rc != IMF_OK)
    throw std::runtime_error(std::string("imaml_fast._C.") + op + " failed (code " +
                             std::to_string(rc) + "): " + imaml_fast_strerror(rc));
}

// Runs the call without the GIL (the CPU twins can take a while; CUDA launches are
// asynchronous) and raises on a non-zero code once the GIL is back.
template <typename F>
void call(const char* op, F&& f) {
  int rc;
  {
    py::gil_scoped_release release;
    rc = f();
  }
  check(rc, op);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "imaml_fast C++/CUDA kernels (CPU twins always; CUDA kernels when built with nvcc)";
  m.attr("FLOAT32") = IMF_FLOAT32;
  m.attr("FLOAT64") = IMF_FLOAT64;
  m.attr("FLOAT16") = IMF_FLOAT16;
  m.attr("BFLOAT16") = IMF_BFLOAT16;
  m.attr("ABI_VERSION") = IMAML_FAST_ABI_VERSION;

  m.def("build_info", []() {
    py::dict d;
    d["cuda"] = imaml_fast_has_cuda() != 0;
    d["cuda_archs"] = std::string(imaml_fast_cuda_archs());
    d["no_cuda_reason"] = std::string(imaml_fast_no_cuda_reason());
    d["cxx_compiler"] = std::string(imaml_fast_cxx_compiler());
    d["cuda_compiler"] = std::string(imaml_fast_cuda_compiler());
    d["abi_version"] = imaml_fast_abi_version();
#ifdef _OPENMP
    d["openmp"] = true;  // the CPU twins' threads are an OpenMP team (csrc/src/cpu/cpu_common.h)
#else
    d["openmp"] = false;
#endif
    d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                    std::to_string(PYBIND11_VERSION_MINOR) + "." +
                    std::to_string(PYBIND11_VERSION_PATCH);
    return d;
  }, "What this build contains: cuda (bool), cuda_archs, no_cuda_reason, compiler versions, "
     "openmp (bool).");

  m.def("set_cpu_threads", &imaml_fast_set_cpu_threads, py::arg("n"),
        "Threads the CPU twins spread the calling thread's calls over (< 1 means 1).");
  m.def("cpu_threads", &imaml_fast_cpu_threads, "The CPU twins' thread count for calls from this thread.");

  // ---- prox_update
  m.def("prox_update_cpu",
        [](int dtype, std::uintptr_t phi, std::uintptr_t g, std::uintptr_t theta, bool per_task,
           std::uintptr_t out, int64_t T, int64_t P, double lr, double lam) {
          call("prox_update_cpu", [&] {
            return prox_update_cpu(dtype, ptr(phi), ptr(g), ptr(theta), per_task, ptr(out), T, P,
                                   lr, lam);
          });
        },
        py::arg("dtype"), py::arg("phi"), py::arg("g"), py::arg("theta"), py::arg("theta_per_task"),
        py::arg("out"), py::arg("T"), py::arg("P"), py::arg("lr"), py::arg("lam"));
  m.def("prox_update_cuda",
        [](int dtype, std::uintptr_t phi, std::uintptr_t g, std::uintptr_t theta, bool per_task,
           std::uintptr_t out, int64_t T, int64_t P, double lr, double lam,
           std::uintptr_t stream) {
          call("prox_update_cuda", [&] {
            return prox_update_cuda(dtype, ptr(phi), ptr(g), ptr(theta), per_task, ptr(out), T,
                                    P, lr, lam, ptr(stream));
          });
        },
        py::arg("dtype"), py::arg("phi"), py::arg("g"), py::arg("theta"), py::arg("theta_per_task"),
        py::arg("out"), py::arg("T"), py::arg("P"), py::arg("lr"), py::arg("lam"),
        py::arg("stream"));

  // ---- batched_dot
  m.def("batched_dot_cpu",
        [](int dtype, std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int64_t T,
           int64_t P) {
          call("batched_dot_cpu",
               [&] { return batched_dot_cpu(dtype, ptr(a), ptr(b), ptr(out), T, P); });
        },
        py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("out"), py::arg("T"), py::arg("P"));
  m.def("batched_dot_cuda_workspace_size", &batched_dot_cuda_workspace_size, py::arg("dtype"),
        py::arg("T"), py::arg("P"));
  m.def("batched_dot_cuda",
        [](int dtype, std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int64_t T,
           int64_t P, std::uintptr_t ws, size_t ws_bytes, std::uintptr_t stream) {
          call("batched_dot_cuda", [&] {
            return batched_dot_cuda(dtype, ptr(a), ptr(b), ptr(out), T, P, ptr(ws), ws_bytes,
                                    ptr(stream));
          });
        },
        py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("out"), py::arg("T"), py::arg("P"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));

  // ---- cg_update
  m.def("cg_update_cpu",
        [](int dtype, std::uintptr_t x, std::uintptr_t r, std::uintptr_t p, std::uintptr_t Ap,
           std::uintptr_t rs, std::uintptr_t status, std::uintptr_t iters, std::uintptr_t thresh,
           int64_t T, int64_t P) {
          call("cg_update_cpu", [&] {
            return cg_update_cpu(dtype, ptr(x), ptr(r), ptr(p), ptr(Ap), ptr(rs),
                                 ptr<int8_t>(status), ptr<int64_t>(iters), ptr(thresh), T, P);
          });
        },
        py::arg("dtype"), py::arg("x"), py::arg("r"), py::arg("p"), py::arg("Ap"), py::arg("rs"),
        py::arg("status"), py::arg("iters"), py::arg("thresh"), py::arg("T"), py::arg("P"));
  m.def("cg_update_cuda_workspace_size", &cg_update_cuda_workspace_size, py::arg("dtype"),
        py::arg("T"), py::arg("P"));
  m.def("cg_update_cuda",
        [](int dtype, std::uintptr_t x, std::uintptr_t r, std::uintptr_t p, std::uintptr_t Ap,
           std::uintptr_t rs, std::uintptr_t status, std::uintptr_t iters, std::uintptr_t thresh,
           int64_t T, int64_t P, std::uintptr_t ws, size_t ws_bytes, std::uintptr_t stream) {
          call("cg_update_cuda", [&] {
            return cg_update_cuda(dtype, ptr(x), ptr(r), ptr(p), ptr(Ap), ptr(rs),
                                  ptr<int8_t>(status), ptr<int64_t>(iters), ptr(thresh), T, P,
                                  ptr(ws), ws_bytes, ptr(stream));
          });
        },
        py::arg("dtype"), py::arg("x"), py::arg("r"), py::arg("p"), py::arg("Ap"), py::arg("rs"),
        py::arg("status"), py::arg("iters"), py::arg("thresh"), py::arg("T"), py::arg("P"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));

  // ---- dense_cg
  m.def("dense_cg_cpu",
        [](int dtype, std::uintptr_t H, std::uintptr_t b, std::uintptr_t x, std::uintptr_t iters,
           std::uintptr_t residual, std::uintptr_t status, int64_t T, int64_t P, double shift,
           double scale, int64_t max_iter, double tol) {
          call("dense_cg_cpu", [&] {
            return dense_cg_cpu(dtype, ptr(H), ptr(b), ptr(x), ptr<int64_t>(iters),
                                ptr(residual), ptr<int8_t>(status), T, P, shift, scale,
                                max_iter, tol);
          });
        },
        py::arg("dtype"), py::arg("H"), py::arg("b"), py::arg("x"), py::arg("iters"),
        py::arg("residual"), py::arg("status"), py::arg("T"), py::arg("P"), py::arg("shift"),
        py::arg("scale"), py::arg("max_iter"), py::arg("tol"));
  m.def("dense_cg_cuda_workspace_size", &dense_cg_cuda_workspace_size, py::arg("dtype"),
        py::arg("T"), py::arg("P"));
  m.def("dense_cg_cuda",
        [](int dtype, std::uintptr_t H, std::uintptr_t b, std::uintptr_t x, std::uintptr_t iters,
           std::uintptr_t residual, std::uintptr_t status, int64_t T, int64_t P, double shift,
           double scale, int64_t max_iter, double tol, std::uintptr_t ws, size_t ws_bytes,
           std::uintptr_t stream) {
          call("dense_cg_cuda", [&] {
            return dense_cg_cuda(dtype, ptr(H), ptr(b), ptr(x), ptr<int64_t>(iters),
                                 ptr(residual), ptr<int8_t>(status), T, P, shift, scale,
                                 max_iter, tol, ptr(ws), ws_bytes, ptr(stream));
          });
        },
        py::arg("dtype"), py::arg("H"), py::arg("b"), py::arg("x"), py::arg("iters"),
        py::arg("residual"), py::arg("status"), py::arg("T"), py::arg("P"), py::arg("shift"),
        py::arg("scale"), py::arg("max_iter"), py::arg("tol"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"));

  // ---- bn_double_backward (a, b, c, weight and dw may be 0: absent)
  m.def("bn_double_backward_cpu",
        [](int dtype, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t gy,
           std::uintptr_t x, std::uintptr_t mean, std::uintptr_t invstd, std::uintptr_t weight,
           std::uintptr_t dgy, std::uintptr_t dx, std::uintptr_t dw, int64_t N, int64_t C,
           int64_t S) {
          call("bn_double_backward_cpu", [&] {
            return bn_double_backward_cpu(dtype, ptr(a), ptr(b), ptr(c), ptr(gy), ptr(x),
                                          ptr(mean), ptr(invstd), ptr(weight), ptr(dgy), ptr(dx),
                                          ptr(dw), N, C, S);
          });
        },
        py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("gy"), py::arg("x"),
        py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("dgy"), py::arg("dx"),
        py::arg("dw"), py::arg("N"), py::arg("C"), py::arg("S"));
  m.def("bn_double_backward_cuda",
        [](int dtype, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t gy,
           std::uintptr_t x, std::uintptr_t mean, std::uintptr_t invstd, std::uintptr_t weight,
           std::uintptr_t dgy, std::uintptr_t dx, std::uintptr_t dw, int64_t N, int64_t C,
           int64_t S, std::uintptr_t stream) {
          call("bn_double_backward_cuda", [&] {
            return bn_double_backward_cuda(dtype, ptr(a), ptr(b), ptr(c), ptr(gy), ptr(x),
                                           ptr(mean), ptr(invstd), ptr(weight), ptr(dgy),
                                           ptr(dx), ptr(dw), N, C, S, ptr(stream));
          });
        },
        py::arg("dtype"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("gy"), py::arg("x"),
        py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("dgy"), py::arg("dx"),
        py::arg("dw"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("stream"));

  // ---- conv2d_input_grad (CPU only)
  m.def("conv2d_input_grad_cpu",
        [](int dtype, std::uintptr_t gy, std::uintptr_t w, std::uintptr_t gx, int64_t N,
           int64_t G, int64_t C, int64_t O, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
           int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
           int64_t dw) {
          call("conv2d_input_grad_cpu", [&] {
            return conv2d_input_grad_cpu(dtype, ptr(gy), ptr(w), ptr(gx), N, G, C, O, H, W, Ho,
                                         Wo, KH, KW, sh, sw, ph, pw, dh, dw);
          });
        },
        py::arg("dtype"), py::arg("gy"), py::arg("w"), py::arg("gx"), py::arg("N"), py::arg("G"),
        py::arg("C"), py::arg("O"), py::arg("H"), py::arg("W"), py::arg("Ho"), py::arg("Wo"),
        py::arg("KH"), py::arg("KW"), py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"),
        py::arg("dh"), py::arg("dw"));

  // ---- bn_relu (CPU only)
  m.def("bn_relu_forward_cpu",
        [](int dtype, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias,
           std::uintptr_t y, std::uintptr_t mean, std::uintptr_t invstd, int64_t N, int64_t C,
           int64_t S, double eps) {
          call("bn_relu_forward_cpu", [&] {
            return bn_relu_forward_cpu(dtype, ptr(x), ptr(weight), ptr(bias), ptr(y), ptr(mean),
                                       ptr(invstd), N, C, S, eps);
          });
        },
        py::arg("dtype"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"),
        py::arg("mean"), py::arg("invstd"), py::arg("N"), py::arg("C"), py::arg("S"),
        py::arg("eps"));
  m.def("bn_relu_backward_cpu",
        [](int dtype, std::uintptr_t gy, std::uintptr_t x, std::uintptr_t mean,
           std::uintptr_t invstd, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t gx,
           std::uintptr_t gw, std::uintptr_t gb, int64_t N, int64_t C, int64_t S) {
          call("bn_relu_backward_cpu", [&] {
            return bn_relu_backward_cpu(dtype, ptr(gy), ptr(x), ptr(mean), ptr(invstd),
                                        ptr(weight), ptr(bias), ptr(gx), ptr(gw), ptr(gb), N, C,
                                        S);
          });
        },
        py::arg("dtype"), py::arg("gy"), py::arg("x"), py::arg("mean"), py::arg("invstd"),
        py::arg("weight"), py::arg("bias"), py::arg("gx"), py::arg("gw"), py::arg("gb"),
        py::arg("N"), py::arg("C"), py::arg("S"));
}

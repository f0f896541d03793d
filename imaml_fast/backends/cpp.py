"""The "cpp" backend: the C++ CPU twins of the CUDA kernels (csrc/, through imaml_fast._C).

Ops (what `load_ops()` returns; every tensor contiguous, [T, P] row-major):

    prox_update(phi, g, theta, lr, lam) -> new phi       phi - lr * (g + lam * (phi - theta))
    batched_dot(a, b) -> [T]                             per-task dot products (acc dtype)
    cg_update(x, r, p, Ap, rs, status, iters, thresh)    one masked CG iteration, in place
    dense_cg(H, b, shift, scale, max_iter, tol)          a whole CG solve per task, H [T, P, P]
    bn_double_backward(a, b, c, gy, x, mean, invstd, weight) -> (dgy, dx, dw or None)
                                                         BatchNorm's double backward, x [N, C, ...]
    conv_input_grad(gy, x, weight, stride, padding, dilation, groups) -> gx
                                                         a convolution's input gradient (CPU only)
    bn_relu_forward(x, weight, bias, eps) -> (y, mean, invstd)
    bn_relu_backward(gy, x, mean, invstd, weight, bias, output_mask) -> (gx, gweight, gbias)
                                                         BatchNorm then ReLU as one layer, first
                                                         derivatives (CPU only)

`cg_update` runs the two-pass fused formulation written out in csrc/src/cg_scalars.h; its
pure-PyTorch twin is `cg_update_fused_ref` below (tests compare the kernels with it to 1e-12
in fp64, and with imaml_fast.cg.cg_update_ref for flags and iteration counts). dense_cg's
reference is imaml_fast.dense.dense_cg_ref (cg_solve with a dense matvec). bn_double_backward's
is imaml_fast.layers.batch_norm_double_backward (same signature and return convention); the
kernels take float32/float64, and the wrapper hands other dtypes (and inputs that need autograd
or have no elements) to that reference. conv_input_grad's is imaml_fast.layers.
conv_input_grad_ref (ATen's convolution_backward); its kernel (conv2d_input_grad below) runs
only where it measured faster than ATen's, strided 2-D convolutions with two or more groups (the
engine's per-task convolutions), and the reference everywhere else. bn_relu_forward's and
bn_relu_backward's are imaml_fast.layers.bn_relu_forward_ref / bn_relu_backward_ref; the
kernels (csrc/src/cpu/bn_relu.cpp) take float32/float64 and the wrappers hand anything else
to those.

This module is imported with imaml_fast; it never imports imaml_fast._C or touches CUDA at
import time. The shared wrapper code here (argument checks, calls into _C) also serves the
"cuda" backend (cuda.py), which differs only in device, dtypes, stream and workspace.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Tuple

import torch

from .. import _ext
from ..cg import CG_CONVERGED, CG_MAX_ITER, CG_NEGATIVE_CURVATURE, CG_NONFINITE, acc_dtype

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DENSE_DTYPES = (torch.float32, torch.float64)


# ---- backend protocol ---------------------------------------------------------------------------

def why_not(device, dtype) -> List[str]:
    """Why the CPU twin cannot run on (device, dtype); empty when it can."""
    device = torch.device(device)
    reasons = []
    if device.type != "cpu":
        reasons.append(f"tensors are on {device.type} (the CPU twin runs on cpu tensors)")
    if dtype not in CPU_DTYPES:
        reasons.append(f"dtype {dtype} not supported by the CPU twin (float32, float64)")
    module, why = _ext.load()
    if module is None:
        reasons.append(f"imaml_fast._C is not built: {why}")
    return reasons


def load_ops() -> Dict[str, object]:
    """The CPU twin's ops; RuntimeError when imaml_fast._C is not built."""
    _module()
    return {"cg_update": cg_update, "prox_update": prox_update, "batched_dot": batched_dot,
            "dense_cg": dense_cg, "bn_double_backward": bn_double_backward,
            "conv_input_grad": conv_input_grad, "bn_relu_forward": bn_relu_forward,
            "bn_relu_backward": bn_relu_backward}


def _threads() -> None:
    """The twins spread tasks over as many threads as torch uses (torch.set_num_threads);
    results do not depend on it (each task runs on one thread, csrc/src/cpu/cpu_common.h)."""
    m = _module()
    n = torch.get_num_threads()
    if m.cpu_threads() != n:
        m.set_cpu_threads(n)


def prox_update(phi, g, theta, lr, lam):
    """phi - lr * (g + lam * (phi - theta)) on the CPU twin; theta [P] or [T, P]."""
    _threads()
    return _prox_update("cpu", phi, g, theta, lr, lam)


def batched_dot(a, b):
    """Per-task dot products [T] of [T, P] tensors on the CPU twin."""
    _threads()
    return _batched_dot("cpu", a, b)


def cg_update(x, r, p, Ap, rs, status, iters, thresh):
    """One masked CG iteration on the CPU twin, in place; returns (x, r, p, rs, status, iters)."""
    _threads()
    return _cg_update("cpu", x, r, p, Ap, rs, status, iters, thresh)


def dense_cg(H, b, shift, scale, max_iter, tol):
    """Solve (shift I + scale H_t) x_t = b_t for every task on the CPU twin.
    Returns (x, iters, residual, status)."""
    _threads()
    return _dense_cg("cpu", H, b, shift, scale, max_iter, tol)


def bn_double_backward(a, b, c, gy, x, mean, invstd, weight, eps=None):
    """The vector-Jacobian product of BatchNorm's backward pass on the CPU twin (channels over
    the threads); same signature and results as imaml_fast.layers.batch_norm_double_backward
    (inputs that need autograd go to it). Returns (dgy, dx, dw or None)."""
    _threads()
    return _bn_double_backward("cpu", a, b, c, gy, x, mean, invstd, weight, eps)


def conv_input_grad(gy, x, weight, stride, padding, dilation, groups):
    """The input gradient of a convolution (imaml_fast.layers.conv_input_grad_ref's
    signature and result): the C++ kernel where it pays, ATen's convolution_backward
    elsewhere.

    The kernel runs for 2-D convolutions with a stride above 1 and at least 2 groups, in
    float32/float64, on plain tensors that need no autograd. Measured on a 2-core AMD EPYC
    (Zen 3), two threads, float32, ms against ATen's: Omniglot layers with the 32 tasks as
    groups (N = 5, 64 channels) 6.8 vs 9.8 (14x14 input), 2.5 vs 3.9 (8x8); 84x84 images, 32
    channels, stride 2: 126 vs 339; 4 groups 0.97 vs 2.31. It lost with one group (0.52 vs
    0.33: one group is one thread) and at stride 1 (14x14 to 84x84 images: 1.0-2.4x slower;
    ATen's input gradient of an unstrided convolution is a plain convolution)."""
    from ..layers import conv_input_grad_ref, kernel_can_take

    if conv_input_grad_applies(x, weight, stride, groups) and kernel_can_take([gy, x, weight],
                                                                              CPU_DTYPES):
        return conv2d_input_grad(gy, x, weight, stride, padding, dilation, groups)
    return conv_input_grad_ref(gy, x, weight, stride, padding, dilation, groups)


def conv_input_grad_applies(x, weight, stride, groups) -> bool:
    """Whether conv_input_grad runs its kernel for a convolution of this kind (2-D, a stride
    above 1, 2+ groups, float32/float64 on the CPU); the layers ask before routing a
    convolution to it, so that one ATen call is not split into two where the kernel would not
    run anyway (a loop over tasks: one group per call)."""
    return (isinstance(weight, torch.Tensor) and weight.dim() == 4 and int(groups) >= 2
            and any(int(v) > 1 for v in stride) and x.device.type == "cpu"
            and x.dtype in CPU_DTYPES)


conv_input_grad.applies = conv_input_grad_applies


def conv2d_input_grad(gy, x, weight, stride, padding, dilation, groups):
    """The C++ kernel behind conv_input_grad, for any 2-D convolution it can take: gy
    [N, groups*O, Ho, Wo], x [N, groups*C, H, W] (only its shape is used), weight
    [groups*O, C, KH, KW], float32/float64 CPU tensors; stride, padding, dilation: pairs or
    ints. Returns gx shaped like x. Raises ValueError naming the argument that does not fit."""
    op = "conv2d_input_grad"
    for name, t in (("gy", gy), ("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a 4-D tensor (a 2-D convolution), got {got}")
        if t.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {t.device}; this kernel runs on cpu tensors")
        if t.dtype not in CPU_DTYPES or t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; gy, x and weight must all be "
                             f"float32 or all float64")

    def pair(name, v, minimum):
        v = [int(v)] * 2 if isinstance(v, numbers.Integral) else [int(u) for u in v]
        if len(v) != 2 or min(v) < minimum:
            raise ValueError(f"{op}: {name} must be an int or a pair of ints >= {minimum}, "
                             f"got {v}")
        return v

    (sh, sw), (ph, pw), (dh, dw) = (pair("stride", stride, 1), pair("padding", padding, 0),
                                    pair("dilation", dilation, 1))
    G = int(groups)
    N, GC, H, W = x.shape
    GO, C, KH, KW = weight.shape
    if G < 1 or GC != G * C or GO % G:
        raise ValueError(f"{op}: x has {GC} channels and weight is {tuple(weight.shape)}, which "
                         f"does not fit groups={groups} (x needs groups * weight.shape[1] "
                         f"channels, weight.shape[0] a multiple of groups)")
    Ho = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1 or tuple(gy.shape) != (N, GO, Ho, Wo):
        raise ValueError(f"{op}: gy has shape {tuple(gy.shape)}, but this convolution of x "
                         f"{tuple(x.shape)} gives {(N, GO, Ho, Wo)}")
    _threads()
    module = _module()
    gy, weight = gy.contiguous(), weight.contiguous()
    gx = torch.empty(x.shape, dtype=x.dtype)
    module.conv2d_input_grad_cpu(_ext.DTYPE_CODES[x.dtype], gy.data_ptr(), weight.data_ptr(),
                                 gx.data_ptr(), N, G, C, GO // G, H, W, Ho, Wo, KH, KW, sh, sw,
                                 ph, pw, dh, dw)
    return gx


def _bn_relu_checked(op, x, named):
    """Shared argument checks of the bn_relu wrappers: x [N, C, ...] on the CPU, the others
    (name, tensor or None, expected shape) on x's device with that shape."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be [N, C, ...] (batch, channels, spatial...), got {got}")
    if x.device.type != "cpu":
        raise ValueError(f"{op}: x is on {x.device}; this kernel runs on cpu tensors")
    for name, t, shape in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor or None, got "
                             f"{type(t).__name__}")
        if tuple(t.shape) != shape or t.device != x.device:
            raise ValueError(f"{op}: {name} is {tuple(t.shape)} on {t.device}, expected {shape} "
                             f"on {x.device}")


def bn_relu_forward(x, weight, bias, eps):
    """relu(batch_norm(x)) with batch statistics and its (mean, invstd): the C++ kernel on
    float32/float64 tensors it can take, imaml_fast.layers.bn_relu_forward_ref otherwise
    (other dtypes, mixed dtypes, no elements, inputs that need autograd, torch.func wrappers).
    Returns (y, mean [C], invstd [C])."""
    from ..layers import bn_relu_forward_ref, kernel_can_take

    C = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0
    _bn_relu_checked("bn_relu_forward", x, [("weight", weight, (C,)), ("bias", bias, (C,))])
    tensors = [x] + [t for t in (weight, bias) if t is not None]
    if not kernel_can_take(tensors, CPU_DTYPES) or not math.isfinite(eps) or eps < 0:
        return bn_relu_forward_ref(x, weight, bias, eps)
    _threads()
    x, weight, bias = (None if t is None else t.contiguous() for t in (x, weight, bias))
    y = torch.empty_like(x)
    mean = torch.empty(C, dtype=x.dtype)
    invstd = torch.empty(C, dtype=x.dtype)
    _module().bn_relu_forward_cpu(_ext.DTYPE_CODES[x.dtype], x.data_ptr(), _ptr(weight),
                                  _ptr(bias), y.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
                                  x.shape[0], C, math.prod(x.shape[2:]), float(eps))
    return y, mean, invstd


def bn_relu_backward(gy, x, mean, invstd, weight, bias, output_mask):
    """The gradients (gx, gweight, gbias) of bn_relu_forward's y, each None where output_mask
    says so (or its parameter is None): the C++ kernel where it can take the tensors,
    imaml_fast.layers.bn_relu_backward_ref otherwise."""
    from ..layers import bn_relu_backward_ref, kernel_can_take

    C = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
    _bn_relu_checked("bn_relu_backward", x, [
        ("gy", gy, shape), ("mean", mean, (C,)), ("invstd", invstd, (C,)),
        ("weight", weight, (C,)), ("bias", bias, (C,))])
    if gy is None or mean is None or invstd is None:
        raise ValueError("bn_relu_backward: gy, mean and invstd are required")
    tensors = [x, gy, mean, invstd] + [t for t in (weight, bias) if t is not None]
    if not kernel_can_take(tensors, CPU_DTYPES):
        return bn_relu_backward_ref(gy, x, mean, invstd, weight, bias, output_mask)
    _threads()
    gy, x, mean, invstd, weight, bias = (None if t is None else t.contiguous()
                                         for t in (gy, x, mean, invstd, weight, bias))
    gx = torch.empty_like(x) if output_mask[0] else None
    gw = torch.empty(C, dtype=x.dtype) if output_mask[1] and weight is not None else None
    gb = torch.empty(C, dtype=x.dtype) if output_mask[2] and bias is not None else None
    _module().bn_relu_backward_cpu(_ext.DTYPE_CODES[x.dtype], gy.data_ptr(), x.data_ptr(),
                                   mean.data_ptr(), invstd.data_ptr(), _ptr(weight), _ptr(bias),
                                   _ptr(gx), _ptr(gw), _ptr(gb), x.shape[0], C,
                                   math.prod(x.shape[2:]))
    return gx, gw, gb


def _ptr(t):
    return 0 if t is None else t.data_ptr()


# ---- pure-PyTorch references ----------------------------------------------------------------------

def cg_update_fused_ref(x, r, p, Ap, rs, status, iters, thresh):
    """The fused two-pass CG iteration of the kernels (csrc/src/cg_scalars.h), in PyTorch, out
    of place. Same signature and status semantics as imaml_fast.cg.cg_update_ref; the iterates
    equal classic CG in exact arithmetic. Differences from cg_update_ref on purpose: beta comes
    from rs_est = rs - 2 alpha r.Ap + alpha^2 Ap.Ap (known before the update pass), and a task
    that converges in this iteration gets p = r_new + beta p (the reference keeps p; a finished
    task's p is never used). Vector arithmetic runs in the accumulation dtype with one rounding
    to the storage dtype, as the kernels do."""
    dt = x.dtype
    acc = acc_dtype(dt)
    xa, ra, pa, apa = (v.to(acc) for v in (x, r, p, Ap))
    zero = torch.zeros_like(rs)
    one = torch.ones_like(rs)
    active = status == CG_MAX_ITER
    # Pass 1.
    pAp = (pa * apa).sum(-1)
    rAp = (ra * apa).sum(-1)
    ApAp = (apa * apa).sum(-1)
    if x.shape[-1] > 0:
        rmax = ra.abs().amax(-1)
        apmax = apa.abs().amax(-1)
    else:
        rmax = apmax = zero
    # Scalars.
    nonfinite = active & ~torch.isfinite(pAp)
    negative = active & ~nonfinite & (pAp <= 0)
    ok = active & ~nonfinite & ~negative
    first_neg = negative & (iters == 0)
    alpha = torch.where(ok, rs / torch.where(ok, pAp, one), zero)
    rs_est = rs - 2 * alpha * rAp + alpha * alpha * ApAp
    rs_est = torch.where(rs_est > 0, rs_est, zero)
    rs_pos = ok & (rs > 0)
    beta = torch.where(rs_pos, rs_est / torch.where(rs_pos, rs, one), zero)
    norm_limit = math.sqrt(torch.finfo(acc).max) / 4
    elem_limit = torch.finfo(dt).max / 2
    a = alpha.abs()
    safe = (torch.isfinite(alpha) & torch.isfinite(rAp) & torch.isfinite(ApAp) & torch.isfinite(rs)
            & torch.isfinite(rmax) & torch.isfinite(apmax)
            & (rs.sqrt() + a * ApAp.sqrt() <= norm_limit) & (rmax + a * apmax <= elem_limit))
    fast = ok & safe
    risky = ok & ~safe
    # Pass 2 (computed for every task, applied by mask).
    al = alpha.unsqueeze(-1)
    r_new = (ra - al * apa).to(dt)
    rn = r_new.to(acc)
    x_new = (xa + al * pa).to(dt)
    rs_new = (rn * rn).sum(-1)
    # Finish.
    blown = ok & ~torch.isfinite(rs_new)
    apply_risky = risky & ~blown
    beta_exact = torch.where(apply_risky & (rs > 0), rs_new / torch.where(rs > 0, rs, one), zero)
    write = (fast | apply_risky).unsqueeze(-1)
    x_out = torch.where(write, x_new, x)
    x_out = torch.where(first_neg.unsqueeze(-1), (xa + pa).to(dt), x_out)
    r_out = torch.where(write, r_new, r)
    p_fast = (rn + beta.unsqueeze(-1) * pa).to(dt)
    p_risky = (rn + beta_exact.unsqueeze(-1) * pa).to(dt)
    p_out = torch.where(fast.unsqueeze(-1), p_fast, torch.where(apply_risky.unsqueeze(-1), p_risky, p))
    ok2 = ok & ~blown
    rs_out = torch.where(ok2, rs_new, rs)
    status = torch.where(ok2 & (rs_new <= thresh), torch.full_like(status, CG_CONVERGED), status)
    status = torch.where(negative, torch.full_like(status, CG_NEGATIVE_CURVATURE), status)
    status = torch.where(nonfinite | blown, torch.full_like(status, CG_NONFINITE), status)
    return x_out, r_out, p_out, rs_out, status, iters + ok2.long()


# ---- the wrappers shared with the cuda backend ------------------------------------------------

def _module():
    module, why = _ext.load()
    if module is None:
        raise RuntimeError(f"imaml_fast._C is not built: {why}")
    return module


_increment_version = getattr(getattr(torch.autograd, "graph", None), "increment_version", None)


def _mark_modified(*tensors):
    """The kernels write through raw pointers; bump the version counters as an in-place torch
    op would, so autograd notices stale saved tensors instead of using them silently."""
    if _increment_version is None:
        return
    for t in tensors:
        if not t.is_inference():
            _increment_version(t)


def _check(op, name, t, kind, *, dtypes=None, dtype=None, shape=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != kind:
        raise ValueError(f"{op}: {name} is on {t.device}, but the {_BACKEND[kind]} backend needs "
                         f"{kind} tensors (move it with .to('{kind}'))")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other tensors are on {device}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; the {_BACKEND[kind]} backend supports "
                         f"{', '.join(str(d) for d in dtypes)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous() on it)")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name} requires grad; the kernels are not differentiable "
                         "(call them under torch.no_grad() or pass detached tensors)")


def _check_2d(op, name, t):
    if isinstance(t, torch.Tensor) and t.dim() != 2:
        raise ValueError(f"{op}: {name} must be [T, P] (tasks x parameters), got shape "
                         f"{tuple(t.shape)}")


def _check_number(op, name, v, *, minimum=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{op}: {name}={v!r} must be a finite real number")
    if minimum is not None and v < minimum:
        raise ValueError(f"{op}: {name}={v!r} must be >= {minimum}")


def _no_alias(op, named):
    seen = {}
    for name, t in named:
        if t.numel() == 0:
            continue
        ptr = t.data_ptr()
        if ptr in seen:
            raise ValueError(f"{op}: {name} and {seen[ptr]} share memory; the kernel updates them "
                             "in place and needs separate tensors (clone one)")
        seen[ptr] = name


_BACKEND = {"cpu": "cpp", "cuda": "cuda"}
_DTYPES = {"cpu": CPU_DTYPES, "cuda": CUDA_DTYPES}


class _Launch:
    """Where a call goes: the device guard and stream for CUDA, nothing for the CPU twin."""

    def __init__(self, kind, device):
        self.kind, self.device = kind, device

    def __enter__(self):
        self._guard = torch.cuda.device(self.device) if self.kind == "cuda" else None
        if self._guard is not None:
            self._guard.__enter__()
        return self

    def __exit__(self, *exc):
        if self._guard is not None:
            self._guard.__exit__(*exc)

    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def workspace(self, nbytes: int) -> Tuple[int, int]:
        # torch's caching allocator on the same device and stream: no cudaMalloc per call and
        # safe under CUDA graph capture.
        ws = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=self.device)
        self._ws = ws  # keep it alive until the launch is queued
        return ws.data_ptr(), int(nbytes)


def _prox_update(kind, phi, g, theta, lr, lam):
    op = "prox_update"
    _check_2d(op, "phi", phi)
    _check(op, "phi", phi, kind, dtypes=_DTYPES[kind])
    T, P = phi.shape
    _check(op, "g", g, kind, dtype=phi.dtype, shape=(T, P), device=phi.device)
    if not isinstance(theta, torch.Tensor) or tuple(theta.shape) not in ((P,), (T, P)):
        got = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise ValueError(f"{op}: theta must be [P] = ({P},) (shared by all tasks) or [T, P] = "
                         f"({T}, {P}), got {got}")
    _check(op, "theta", theta, kind, dtype=phi.dtype, device=phi.device)
    _check_number(op, "lr", lr)
    _check_number(op, "lam", lam)
    module = _module()
    out = torch.empty_like(phi)
    code = _ext.DTYPE_CODES[phi.dtype]
    per_task = theta.dim() == 2
    with _Launch(kind, phi.device) as launch:
        if kind == "cpu":
            module.prox_update_cpu(code, phi.data_ptr(), g.data_ptr(), theta.data_ptr(), per_task,
                                   out.data_ptr(), T, P, float(lr), float(lam))
        else:
            module.prox_update_cuda(code, phi.data_ptr(), g.data_ptr(), theta.data_ptr(),
                                    per_task, out.data_ptr(), T, P, float(lr), float(lam),
                                    launch.stream())
    return out


def _batched_dot(kind, a, b):
    op = "batched_dot"
    _check_2d(op, "a", a)
    _check(op, "a", a, kind, dtypes=_DTYPES[kind])
    T, P = a.shape
    _check(op, "b", b, kind, dtype=a.dtype, shape=(T, P), device=a.device)
    module = _module()
    out = torch.empty(T, dtype=acc_dtype(a.dtype), device=a.device)
    code = _ext.DTYPE_CODES[a.dtype]
    with _Launch(kind, a.device) as launch:
        if kind == "cpu":
            module.batched_dot_cpu(code, a.data_ptr(), b.data_ptr(), out.data_ptr(), T, P)
        else:
            ws, nbytes = launch.workspace(module.batched_dot_cuda_workspace_size(code, T, P))
            module.batched_dot_cuda(code, a.data_ptr(), b.data_ptr(), out.data_ptr(), T, P, ws,
                                    nbytes, launch.stream())
    return out


def _cg_update(kind, x, r, p, Ap, rs, status, iters, thresh):
    op = "cg_update"
    _check_2d(op, "x", x)
    _check(op, "x", x, kind, dtypes=_DTYPES[kind])
    T, P = x.shape
    dev = x.device
    for name, t in (("r", r), ("p", p), ("Ap", Ap)):
        _check(op, name, t, kind, dtype=x.dtype, shape=(T, P), device=dev)
    acc = acc_dtype(x.dtype)
    _check(op, "rs", rs, kind, dtype=acc, shape=(T,), device=dev)
    _check(op, "thresh", thresh, kind, dtype=acc, shape=(T,), device=dev)
    _check(op, "status", status, kind, dtype=torch.int8, shape=(T,), device=dev)
    _check(op, "iters", iters, kind, dtype=torch.int64, shape=(T,), device=dev)
    _no_alias(op, [("x", x), ("r", r), ("p", p), ("Ap", Ap)])
    _no_alias(op, [("rs", rs), ("thresh", thresh)])
    module = _module()
    code = _ext.DTYPE_CODES[x.dtype]
    ptrs = (x.data_ptr(), r.data_ptr(), p.data_ptr(), Ap.data_ptr(), rs.data_ptr(),
            status.data_ptr(), iters.data_ptr(), thresh.data_ptr())
    with _Launch(kind, dev) as launch:
        if kind == "cpu":
            module.cg_update_cpu(code, *ptrs, T, P)
        else:
            ws, nbytes = launch.workspace(module.cg_update_cuda_workspace_size(code, T, P))
            module.cg_update_cuda(code, *ptrs, T, P, ws, nbytes, launch.stream())
    _mark_modified(x, r, p, rs, status, iters)
    return x, r, p, rs, status, iters


def _dense_cg(kind, H, b, shift, scale, max_iter, tol):
    op = "dense_cg"
    _check_2d(op, "b", b)
    _check(op, "b", b, kind, dtypes=DENSE_DTYPES)
    T, P = b.shape
    if isinstance(H, torch.Tensor) and tuple(H.shape) != (T, P, P):
        raise ValueError(f"{op}: H must be [T, P, P] = ({T}, {P}, {P}) to match b, got "
                         f"{tuple(H.shape)}")
    _check(op, "H", H, kind, dtype=b.dtype, device=b.device)
    _check_number(op, "shift", shift)
    _check_number(op, "scale", scale)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        raise ValueError(f"{op}: max_iter={max_iter!r} must be an int >= 0")
    _check_number(op, "tol", tol, minimum=0)
    module = _module()
    x = torch.empty_like(b)
    iters = torch.empty(T, dtype=torch.int64, device=b.device)
    residual = torch.empty(T, dtype=b.dtype, device=b.device)
    status = torch.empty(T, dtype=torch.int8, device=b.device)
    code = _ext.DTYPE_CODES[b.dtype]
    args = (code, H.data_ptr(), b.data_ptr(), x.data_ptr(), iters.data_ptr(),
            residual.data_ptr(), status.data_ptr(), T, P, float(shift), float(scale),
            int(max_iter), float(tol))
    with _Launch(kind, b.device) as launch:
        if kind == "cpu":
            module.dense_cg_cpu(*args)
        else:
            ws, nbytes = launch.workspace(module.dense_cg_cuda_workspace_size(code, T, P))
            module.dense_cg_cuda(*args, ws, nbytes, launch.stream())
    return x, iters, residual, status


BN_DTYPES = (torch.float32, torch.float64)


def _bn_double_backward(kind, a, b, c, gy, x, mean, invstd, weight, eps=None):
    """Shared by the cpp and cuda backends: checks, then the kernel on contiguous copies, or
    imaml_fast.layers.batch_norm_double_backward where the kernels do not apply (a dtype other
    than float32/float64 or mixed dtypes, inputs that need autograd, no elements, torch.func
    wrappers such as vmap's BatchedTensors). eps is the
    reference's: it matters only on its differentiable path (grad mode on, x requiring grad),
    which is one of those cases; the kernels use mean and invstd as given."""
    from ..layers import batch_norm_double_backward as reference, kernel_can_take

    op = "bn_double_backward"
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be [N, C, ...] (batch, channels, spatial...), got {got}")
    if x.device.type != kind:
        raise ValueError(f"{op}: x is on {x.device}, but the {_BACKEND[kind]} backend needs "
                         f"{kind} tensors (move it with .to('{kind}'))")
    C = x.shape[1]
    named = [("a", a, tuple(x.shape)), ("b", b, (C,)), ("c", c, (C,)), ("gy", gy, tuple(x.shape)),
             ("mean", mean, (C,)), ("invstd", invstd, (C,)), ("weight", weight, (C,))]
    for name, t, shape in named:
        if t is None and name in ("a", "b", "c", "weight"):
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {shape}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if not kernel_can_take([x] + [t for _, t, _ in named if t is not None], BN_DTYPES):
        return reference(a, b, c, gy, x, mean, invstd, weight, eps)
    module = _module()
    N = x.shape[0]
    S = math.prod(x.shape[2:])
    x, gy, mean, invstd = (t.contiguous() for t in (x, gy, mean, invstd))
    a, b, c, weight = (None if t is None else t.contiguous() for t in (a, b, c, weight))
    dgy = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = None if weight is None else torch.empty(C, dtype=x.dtype, device=x.device)

    p = _ptr
    args = (_ext.DTYPE_CODES[x.dtype], p(a), p(b), p(c), p(gy), p(x), p(mean), p(invstd),
            p(weight), p(dgy), p(dx), p(dw), N, C, S)
    with _Launch(kind, x.device) as launch:
        if kind == "cpu":
            module.bn_double_backward_cpu(*args)
        else:
            module.bn_double_backward_cuda(*args, launch.stream())
    return dgy, dx, dw

"""The "cuda" backend: the CUDA kernels of csrc/ (through imaml_fast._C), on the caller's
current stream (torch.cuda.current_stream().cuda_stream), with workspaces from torch's caching
allocator, so they are safe to capture in CUDA graphs and make no host synchronisation.

Same ops and signatures as the cpp backend (imaml_fast.backends.cpp), whose CPU twins test
the same formulation everywhere: prox_update, batched_dot and cg_update take float32, float64,
float16 and bfloat16 (float32 accumulation for the last two); dense_cg float32 and float64;
bn_double_backward float32 and float64 (one thread block per channel; other dtypes go to its
reference, imaml_fast.layers.batch_norm_double_backward).

Importing this module does not import imaml_fast._C and does not initialise CUDA; why_not()
loads the extension, and asks for the device's compute capability only for CUDA devices.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .. import _ext
from .cpp import (CUDA_DTYPES, _batched_dot, _bn_double_backward, _cg_update, _dense_cg, _module,
                  _prox_update)


def why_not(device, dtype) -> List[str]:
    """Why the CUDA kernels cannot run on (device, dtype); empty when they can."""
    device = torch.device(device)
    reasons = []
    if device.type != "cuda":
        reasons.append(f"tensors are on {device.type} (the CUDA kernels need cuda tensors)")
    if dtype not in CUDA_DTYPES:
        reasons.append(f"dtype {dtype} not supported by the CUDA kernels "
                       "(float32, float64, float16, bfloat16)")
    module, why = _ext.load()
    if module is None:
        reasons.append(f"imaml_fast._C is not built: {why}")
    else:
        info = _ext.build_info()
        if not info["cuda"]:
            reasons.append(f"built without CUDA ({info['no_cuda_reason']}); rebuild imaml_fast "
                           "with nvcc on PATH")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA GPU is available (torch.cuda.is_available() is False)")
        elif device.type == "cuda":
            cc = torch.cuda.get_device_capability(device)
            if not arch_supported(cc, info["cuda_archs"]):
                reasons.append(f"the GPU has compute capability {cc[0]}.{cc[1]} but the kernels "
                               f"were built for {info['cuda_archs']} (set IMAML_FAST_CUDA_ARCHS "
                               "and rebuild)")
    return reasons


def arch_supported(cc, archs: str) -> bool:
    """Whether code built for `archs` (CMake's list as build_info reports it, e.g.
    "80-real 90") runs on a GPU of compute capability cc = (major, minor): machine code for
    the same major version and a minor version <= the GPU's, or PTX for an arch <= the GPU's."""
    have = cc[0] * 10 + cc[1]
    for a in archs.replace(";", " ").split():
        real_only = a.endswith("-real")
        num = a.split("-")[0].rstrip("abf")
        if not num.isdigit():
            continue
        n = int(num)
        if not a.endswith("-virtual") and n // 10 == cc[0] and n <= have:
            return True
        if not real_only and n <= have:
            return True
    return False


def load_ops() -> Dict[str, object]:
    """The CUDA kernels' ops; RuntimeError when imaml_fast._C is not built."""
    _module()
    return {"cg_update": cg_update, "prox_update": prox_update, "batched_dot": batched_dot,
            "dense_cg": dense_cg, "bn_double_backward": bn_double_backward}


def prox_update(phi, g, theta, lr, lam):
    """phi - lr * (g + lam * (phi - theta)) in one launch; theta [P] or [T, P]."""
    return _prox_update("cuda", phi, g, theta, lr, lam)


def batched_dot(a, b):
    """Per-task dot products [T] of [T, P] tensors (fp32 accumulation for half types)."""
    return _batched_dot("cuda", a, b)


def cg_update(x, r, p, Ap, rs, status, iters, thresh):
    """One masked CG iteration in three launches (pass 1, pass 2, finish), in place; returns
    (x, r, p, rs, status, iters)."""
    return _cg_update("cuda", x, r, p, Ap, rs, status, iters, thresh)


def dense_cg(H, b, shift, scale, max_iter, tol):
    """The whole solve of (shift I + scale H_t) x_t = b_t in one launch (one block per task).
    Returns (x, iters, residual, status)."""
    return _dense_cg("cuda", H, b, shift, scale, max_iter, tol)


def bn_double_backward(a, b, c, gy, x, mean, invstd, weight, eps=None):
    """The vector-Jacobian product of BatchNorm's backward pass in one launch (one thread block
    per channel); same signature and results as imaml_fast.layers.batch_norm_double_backward
    (inputs that need autograd go to it). Returns (dgy, dx, dw or None)."""
    return _bn_double_backward("cuda", a, b, c, gy, x, mean, invstd, weight, eps)

"""Vector kernels over flat [T, P] buffers: the proximal inner update and per-task dots.

Each is one launch over a (T, cdiv(P, BLOCK)) grid, whatever the number of parameter tensors
(the flat layout is what makes that possible). References: imaml_fast.inner.prox_update_ref
and imaml_fast.cg.batched_dot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


def _check(name, t, like):
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must match phi: {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() first")


@triton.jit
def _prox_update_kernel(phi_ptr, g_ptr, theta_ptr, out_ptr, coef_ptr, P,
                        THETA_PER_TASK: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    row = t.to(tl.int64) * P
    phi = tl.load(phi_ptr + row + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + row + offs, mask=mask, other=0.0)
    if THETA_PER_TASK:
        theta = tl.load(theta_ptr + row + offs, mask=mask, other=0.0)
    else:
        theta = tl.load(theta_ptr + offs, mask=mask, other=0.0)
    # lr and lam come from a small tensor in the arithmetic dtype: a Python float argument
    # would be passed as fp32 and round an fp64 update at 1e-8.
    lr = tl.load(coef_ptr)
    lam = tl.load(coef_ptr + 1)
    if phi.dtype == tl.float64:
        new = phi - lr * (g + lam * (phi - theta))
    else:  # bf16/fp16/fp32 storage, fp32 arithmetic
        phi32 = phi.to(tl.float32)
        new = phi32 - lr * (g.to(tl.float32) + lam * (phi32 - theta.to(tl.float32)))
    tl.store(out_ptr + row + offs, new.to(phi.dtype), mask=mask)


def prox_update(phi: torch.Tensor, g: torch.Tensor, theta: torch.Tensor, lr: float, lam: float):
    """phi - lr * (g + lam * (phi - theta)) over [T, P]; theta [P] or [T, P]. One launch."""
    _check("g", g, phi)
    if not phi.is_contiguous():
        raise ValueError("phi must be contiguous; call .contiguous() first")
    T, P = phi.shape
    per_task = theta.dim() == 2
    if per_task:
        _check("theta", theta, phi)
    elif theta.shape != (P,) or theta.dtype != phi.dtype or not theta.is_contiguous():
        raise ValueError(f"theta must be [P] = [{P}] or [T, P], contiguous {phi.dtype}; got "
                         f"{tuple(theta.shape)} {theta.dtype}")
    out = torch.empty_like(phi)
    grid = (T, triton.cdiv(P, BLOCK))
    coef = coefficients((lr, lam), acc_dtype(phi.dtype), phi.device)
    _prox_update_kernel[grid](phi, g, theta, out, coef, P, THETA_PER_TASK=per_task, BLOCK=BLOCK)
    return out


@triton.jit
def _dot_partial_kernel(a_ptr, b_ptr, part_ptr, P, NB, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    row = t.to(tl.int64) * P
    a = tl.load(a_ptr + row + offs, mask=mask, other=0.0)
    b = tl.load(b_ptr + row + offs, mask=mask, other=0.0)
    if a.dtype == tl.float64:
        s = tl.sum(a * b, axis=0)
    else:
        s = tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=0)
    tl.store(part_ptr + t * NB + blk, s)


_COEFS = {}


def coefficients(values, dtype, device):
    """A small device tensor of scalar coefficients, cached: building it anew would copy from
    pageable host memory on every call, which synchronises the stream and cannot be captured
    in a CUDA graph."""
    key = (tuple(float(v) for v in values), dtype, str(device))
    t = _COEFS.get(key)
    if t is None:
        if len(_COEFS) > 256:
            _COEFS.clear()
        t = _COEFS[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return t


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def batched_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-task dot products [T] with fp32 accumulation (fp64 for fp64). Deterministic: one
    partial per block, then a fixed-order sum of the [T, blocks] partials."""
    _check("b", b, a)
    if not a.is_contiguous():
        raise ValueError("a must be contiguous; call .contiguous() first")
    T, P = a.shape
    nb = triton.cdiv(P, BLOCK)
    part = torch.empty(T, nb, dtype=acc_dtype(a.dtype), device=a.device)
    _dot_partial_kernel[(T, nb)](a, b, part, P, nb, BLOCK=BLOCK)
    return part.sum(1)

"""BatchNorm's double backward: the vector-Jacobian product of its backward pass.

One program per channel, two loops over the channel's M = N * S elements in blocks of BLOCK:
the five sums (gy, gy x^, a, a x^, a gy; per-lane partials, then one tl.sum: deterministic),
then dgy and dx. Arithmetic in the inputs' dtype: float32 (fp32 accumulation) or float64.
Reference and formulas: imaml_fast.layers.batch_norm_double_backward (same signature and
return convention); the C++/CUDA twins are csrc/src/{cpu,cuda}/batch_norm.*.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024
DTYPES = (torch.float32, torch.float64)


@triton.jit
def _channel_block(start, ch, C, S, M, BLOCK: tl.constexpr):
    """Offsets and mask of elements start .. start + BLOCK of channel ch: element m = n * S + s
    of the channel sits at (n * C + ch) * S + s."""
    m = start + tl.arange(0, BLOCK)
    n = m // S
    return (n.to(tl.int64) * C + ch) * S + (m - n * S), m < M


@triton.jit
def _bn_double_backward_kernel(a_ptr, b_ptr, c_ptr, gy_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr,
                               dgy_ptr, dx_ptr, dw_ptr, C, S, M,
                               HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr,
                               HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    ch = tl.program_id(0)
    mu = tl.load(mean_ptr + ch)
    r = tl.load(invstd_ptr + ch)
    zero = tl.zeros([BLOCK], dtype=mu.dtype)
    s_g = zero
    s_gx = zero
    s_a = zero
    s_ax = zero
    s_ag = zero
    # Pass 1: the sums.
    for start in range(0, M, BLOCK):
        off, mask = _channel_block(start, ch, C, S, M, BLOCK)
        xv = tl.load(x_ptr + off, mask=mask, other=0.0)
        gv = tl.load(gy_ptr + off, mask=mask, other=0.0)
        xh = tl.where(mask, (xv - mu) * r, 0.0)
        s_g += gv
        s_gx += gv * xh
        if HAS_A:
            av = tl.load(a_ptr + off, mask=mask, other=0.0)
            s_a += av
            s_ax += av * xh
            s_ag += av * gv
    gbar = tl.sum(s_g, axis=0) / M
    P = tl.sum(s_gx, axis=0) / M
    abar = tl.sum(s_a, axis=0) / M
    Q = tl.sum(s_ax, axis=0) / M
    A = tl.sum(s_ag, axis=0) / M
    if HAS_W:
        gr = tl.load(w_ptr + ch) * r
    else:
        gr = r
    grr = gr * r
    K = A - abar * gbar - 3.0 * P * Q
    # Pass 2: dgy and dx.
    for start in range(0, M, BLOCK):
        off, mask = _channel_block(start, ch, C, S, M, BLOCK)
        xv = tl.load(x_ptr + off, mask=mask, other=0.0)
        gv = tl.load(gy_ptr + off, mask=mask, other=0.0)
        xh = (xv - mu) * r
        o_gy = zero
        o_x = zero
        if HAS_A:
            av = tl.load(a_ptr + off, mask=mask, other=0.0)
            o_gy = gr * (av - abar - xh * Q)
            o_x = grr * (-xh * K - Q * (gv - gbar) - P * (av - abar))
        if HAS_B:
            bv = tl.load(b_ptr + ch)
            o_gy = o_gy + bv * xh
            o_x = o_x + (bv * r) * (gv - gbar - xh * P)
        if HAS_C:
            o_gy = o_gy + tl.load(c_ptr + ch)
        tl.store(dgy_ptr + off, o_gy, mask=mask)
        tl.store(dx_ptr + off, o_x, mask=mask)
    if HAS_W:
        if HAS_A:
            tl.store(dw_ptr + ch, r * M * (A - abar * gbar - P * Q))
        else:
            tl.store(dw_ptr + ch, tl.sum(zero, axis=0))


def bn_double_backward(a, b, c, gy, x, mean, invstd, weight, eps=None):
    """(dgy, dx, dw or None): the vector-Jacobian product of BatchNorm's backward pass, x
    [N, C, ...], one launch (one program per channel). float32/float64 tensors of one dtype;
    other dtypes, inputs that need autograd, empty inputs and torch.func wrappers (vmap's
    BatchedTensors) go to the reference, imaml_fast.layers.batch_norm_double_backward (eps is
    passed on to it: it matters only on its differentiable path; the kernel uses mean and
    invstd as given)."""
    from imaml_fast.layers import batch_norm_double_backward as reference, kernel_can_take

    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"bn_double_backward: x must be [N, C, ...], got {got}")
    C = x.shape[1]
    named = [("a", a, x.shape), ("b", b, (C,)), ("c", c, (C,)), ("gy", gy, x.shape),
             ("mean", mean, (C,)), ("invstd", invstd, (C,)), ("weight", weight, (C,))]
    for name, t, shape in named:
        if t is None and name in ("a", "b", "c", "weight"):
            continue
        if (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape)
                or t.device != x.device):
            got = (f"{tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"bn_double_backward: {name} must be {tuple(shape)} on {x.device}, "
                             f"got {got}")
    if not kernel_can_take([x] + [t for _, t, _ in named if t is not None], DTYPES):
        return reference(a, b, c, gy, x, mean, invstd, weight, eps)
    N = x.shape[0]
    S = math.prod(x.shape[2:])
    M = N * S
    if M >= 2 ** 31 or x.numel() >= 2 ** 62:
        return reference(a, b, c, gy, x, mean, invstd, weight, eps)
    x, gy, mean, invstd = (t.contiguous() for t in (x, gy, mean, invstd))
    a, b, c, weight = (None if t is None else t.contiguous() for t in (a, b, c, weight))
    dgy = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = None if weight is None else torch.empty(C, dtype=x.dtype, device=x.device)
    block = max(16, min(BLOCK, triton.next_power_of_2(M)))
    _bn_double_backward_kernel[(C,)](
        x if a is None else a, x if b is None else b, x if c is None else c, gy, x, mean, invstd,
        x if weight is None else weight, dgy, dx, dx if dw is None else dw, C, S, M,
        HAS_A=a is not None, HAS_B=b is not None, HAS_C=c is not None, HAS_W=weight is not None,
        BLOCK=block)
    return dgy, dx, dw

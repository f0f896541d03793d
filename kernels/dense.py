"""The whole CG solve of a small model in one launch: one program per task.

Reference: imaml_fast.dense.dense_cg_ref (the matrix-free batched CG with a dense matvec).
Each program keeps its task's x, r, p, Ap in a [T, 4, P] workspace and runs every iteration
itself: Ap = shift p + scale H p by row tiles, the masked update, convergence on the exact
r.r, the same flags and first-iteration negative-curvature step as cg_update_ref. With
T = 32 tasks and P = 1,761 the H tiles dominate the traffic (12 MB per task in fp32), so one
launch replaces the 5 x ~30 launches of a matrix-free solve whose products are latency
bound. tl.debug_barrier() orders the workspace writes of one phase before the next phase
reads them (different threads of the program touch different elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .vector import coefficients


@triton.jit
def _dense_cg_kernel(H_ptr, b_ptr, ws_ptr, iters_ptr, res_ptr, status_ptr, coef_ptr, P,
                     max_iter, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    vb = t.to(tl.int64) * P
    hb = t.to(tl.int64) * P * P
    xw = ws_ptr + (t.to(tl.int64) * 4) * P
    rw = xw + P
    pw = rw + P
    aw = pw + P
    # shift, scale, tol^2 in the vectors' dtype (a Python float would arrive as fp32)
    shift = tl.load(coef_ptr)
    scale = tl.load(coef_ptr + 1)
    tol2 = tl.load(coef_ptr + 2)
    if shift.dtype == tl.float64:
        zero = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        zero = tl.zeros([BLOCK], dtype=tl.float32)
    rs = tl.sum(zero, axis=0)
    for c in range(0, P, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        m = offs < P
        b = tl.load(b_ptr + vb + offs, mask=m, other=0.0).to(zero.dtype)
        tl.store(xw + offs, zero, mask=m)
        tl.store(rw + offs, b, mask=m)
        tl.store(pw + offs, b, mask=m)
        rs += tl.sum(b * b, axis=0)
    tl.debug_barrier()
    thresh = tol2 * rs
    status = tl.where(rs <= thresh, 1, 0)
    status = tl.where((rs == rs) & (rs < float("inf")), status, 3)
    iters = 0
    for _ in range(0, max_iter):
        if status == 0:
            # Ap = shift p + scale H p, and p.Ap
            pAp = tl.sum(zero, axis=0)
            for r0 in range(0, P, ROWS):
                rows = r0 + tl.arange(0, ROWS)
                rm = rows < P
                acc = tl.zeros([ROWS], dtype=zero.dtype)
                for c in range(0, P, BLOCK):
                    cols = c + tl.arange(0, BLOCK)
                    cm = cols < P
                    h = tl.load(H_ptr + hb + rows[:, None].to(tl.int64) * P + cols[None, :],
                                mask=rm[:, None] & cm[None, :], other=0.0).to(zero.dtype)
                    pc = tl.load(pw + cols, mask=cm, other=0.0)
                    acc += tl.sum(h * pc[None, :], axis=1)
                pr = tl.load(pw + rows, mask=rm, other=0.0)
                ap = shift * pr + scale * acc
                tl.store(aw + rows, ap, mask=rm)
                pAp += tl.sum(tl.where(rm, pr * ap, 0.0), axis=0)
            tl.debug_barrier()
            finite = (pAp == pAp) & (tl.abs(pAp) < float("inf"))
            if not finite:
                status = 3
            elif pAp <= 0:
                if iters == 0:  # steepest-descent step x0 + r0 = b
                    for c in range(0, P, BLOCK):
                        offs = c + tl.arange(0, BLOCK)
                        m = offs < P
                        tl.store(xw + offs, tl.load(pw + offs, mask=m, other=0.0), mask=m)
                status = 2
            else:
                alpha = rs / pAp
                rr = tl.sum(zero, axis=0)
                for c in range(0, P, BLOCK):
                    offs = c + tl.arange(0, BLOCK)
                    m = offs < P
                    rn = tl.load(rw + offs, mask=m, other=0.0) - alpha * tl.load(aw + offs, mask=m, other=0.0)
                    rr += tl.sum(rn * rn, axis=0)
                if (rr == rr) & (rr < float("inf")):
                    for c in range(0, P, BLOCK):
                        offs = c + tl.arange(0, BLOCK)
                        m = offs < P
                        pc = tl.load(pw + offs, mask=m, other=0.0)
                        tl.store(xw + offs, tl.load(xw + offs, mask=m, other=0.0) + alpha * pc, mask=m)
                        tl.store(rw + offs, tl.load(rw + offs, mask=m, other=0.0) - alpha * tl.load(aw + offs, mask=m, other=0.0), mask=m)
                    tl.debug_barrier()
                    iters += 1
                    if rr <= thresh:
                        status = 1
                    else:
                        beta = rr / rs
                        for c in range(0, P, BLOCK):
                            offs = c + tl.arange(0, BLOCK)
                            m = offs < P
                            tl.store(pw + offs, tl.load(rw + offs, mask=m, other=0.0) + beta * tl.load(pw + offs, mask=m, other=0.0), mask=m)
                        tl.debug_barrier()
                    rs = rr
                else:
                    status = 3
    tl.store(iters_ptr + t, iters.to(tl.int64))
    tl.store(res_ptr + t, tl.sqrt(rs))
    tl.store(status_ptr + t, status.to(tl.int8))


def dense_cg(H: torch.Tensor, b: torch.Tensor, shift: float, scale: float, max_iter: int,
             tol: float):
    """(x, iters, residual, status) of CG on (shift I + scale H_t) x = b_t, H [T, P, P],
    b [T, P], fp32 or fp64; one launch for the whole solve."""
    if H.dim() != 3 or H.shape[1] != H.shape[2] or b.shape != H.shape[:2]:
        raise ValueError(f"dense_cg: H must be [T, P, P] and b [T, P], got {tuple(H.shape)} and {tuple(b.shape)}")
    if H.dtype != b.dtype or H.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dense_cg: H and b must both be float32 or float64, got {H.dtype} and {b.dtype}")
    H, b = H.contiguous(), b.contiguous()
    T, P = b.shape
    ws = torch.empty(T, 4, P, dtype=b.dtype, device=b.device)
    iters = torch.empty(T, dtype=torch.long, device=b.device)
    res = torch.empty(T, dtype=b.dtype, device=b.device)
    status = torch.empty(T, dtype=torch.int8, device=b.device)
    coef = coefficients((shift, scale, float(tol) ** 2), b.dtype, b.device)
    _dense_cg_kernel[(T,)](H, b, ws, iters, res, status, coef, P, int(max_iter), ROWS=16, BLOCK=128)
    return ws[:, 0].clone(), iters, res, status

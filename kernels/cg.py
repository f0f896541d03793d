"""Fused masked CG iteration over T tasks in Triton.

Reference: imaml_fast.cg.cg_update_ref (same signature, same status semantics). Classic CG
needs three passes over the vectors per iteration (p.Ap; x and r with r.r; then p, which
needs beta = r_new.r_new / r.r). This kernel needs two, by reducing three dot products at
once in the first pass:

    pass 1 (reduce):   pAp = p.Ap,  rAp = r.Ap,  ApAp = Ap.Ap          per task, per block
    pass 2 (update):   alpha = rs / pAp
                       rs_est = rs - 2 alpha rAp + alpha^2 ApAp  (= ||r - alpha Ap||^2)
                       x += alpha p;  r -= alpha Ap;  p = r + (rs_est / rs) p
                       and the exact r.r of the new r, per block
    finish ([T] only): rs = exact r.r; status (converged / negative curvature / non-finite);
                       iters += 1 for the tasks that moved

rs_est only feeds beta; convergence is always decided on the exact r.r, so the iteration
counts and flags are those of classic CG. Partial sums go to a small [T, blocks] workspace
and are summed in a fixed order (no float atomics): the results are deterministic.
Accumulation is fp32 for fp32/bf16/fp16 vectors and fp64 for fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
RUNNING, CONVERGED, NEGATIVE, NONFINITE = 0, 1, 2, 3


@triton.jit
def _cg_dots_kernel(p_ptr, ap_ptr, r_ptr, part_ptr, T, P, NB, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    row = t.to(tl.int64) * P
    p = tl.load(p_ptr + row + offs, mask=mask, other=0.0)
    ap = tl.load(ap_ptr + row + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + row + offs, mask=mask, other=0.0)
    if p.dtype != tl.float64:
        p = p.to(tl.float32)
        ap = ap.to(tl.float32)
        r = r.to(tl.float32)
    # part: [3, T, NB]
    tl.store(part_ptr + t * NB + blk, tl.sum(p * ap, axis=0))
    tl.store(part_ptr + (T + t) * NB + blk, tl.sum(r * ap, axis=0))
    tl.store(part_ptr + (2 * T + t) * NB + blk, tl.sum(ap * ap, axis=0))


@triton.jit
def _all_finite(pAp, rAp, ApAp):
    return (pAp == pAp) & (tl.abs(pAp) < float("inf")) & (rAp == rAp) & \
        (tl.abs(rAp) < float("inf")) & (ApAp == ApAp) & (ApAp < float("inf"))


@triton.jit
def _task_dots(part_ptr, t, T, NB, NB_POW: tl.constexpr):
    i = tl.arange(0, NB_POW)
    m = i < NB
    pAp = tl.sum(tl.load(part_ptr + t * NB + i, mask=m, other=0.0), axis=0)
    rAp = tl.sum(tl.load(part_ptr + (T + t) * NB + i, mask=m, other=0.0), axis=0)
    ApAp = tl.sum(tl.load(part_ptr + (2 * T + t) * NB + i, mask=m, other=0.0), axis=0)
    return pAp, rAp, ApAp


@triton.jit
def _cg_update_kernel(x_ptr, r_ptr, p_ptr, ap_ptr, rs_ptr, status_ptr, iters_ptr, part_ptr,
                      rr_ptr, T, P, NB, NB_POW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    blk = tl.program_id(1)
    pAp, rAp, ApAp = _task_dots(part_ptr, t, T, NB, NB_POW)
    rs = tl.load(rs_ptr + t)
    active = tl.load(status_ptr + t) == 0
    finite = _all_finite(pAp, rAp, ApAp)
    negative = active & finite & (pAp <= 0)
    ok = active & finite & (pAp > 0)
    first_neg = negative & (tl.load(iters_ptr + t) == 0)
    alpha = tl.where(ok, rs / tl.where(ok, pAp, 1.0), 0.0)
    rs_est = tl.maximum(rs - 2.0 * alpha * rAp + alpha * alpha * ApAp, 0.0)
    beta = tl.where(ok, rs_est / tl.where(ok, rs, 1.0), 0.0)

    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    row = t.to(tl.int64) * P
    x_raw = tl.load(x_ptr + row + offs, mask=mask, other=0.0)
    r_raw = tl.load(r_ptr + row + offs, mask=mask, other=0.0)
    p_raw = tl.load(p_ptr + row + offs, mask=mask, other=0.0)
    ap = tl.load(ap_ptr + row + offs, mask=mask, other=0.0).to(rs.dtype)
    x = x_raw.to(rs.dtype)
    r = r_raw.to(rs.dtype)
    p = p_raw.to(rs.dtype)
    x_new = x + alpha * p
    r_new = r - alpha * ap
    p_new = r_new + beta * p
    if ok:
        tl.store(x_ptr + row + offs, x_new.to(x_raw.dtype), mask=mask)
        tl.store(r_ptr + row + offs, r_new.to(r_raw.dtype), mask=mask)
        tl.store(p_ptr + row + offs, p_new.to(p_raw.dtype), mask=mask)
    if first_neg:
        # Negative curvature on the task's first iteration: the steepest-descent step x0 + r0.
        tl.store(x_ptr + row + offs, (x + p).to(x_raw.dtype), mask=mask)
    # Exact r.r of the new r as stored (rounded to the storage dtype, as the next pass reads
    # it); the finish kernel reads it only for tasks that moved.
    r_st = r_new.to(r_raw.dtype).to(rs.dtype)
    tl.store(rr_ptr + t * NB + blk, tl.sum(tl.where(mask, r_st * r_st, 0.0), axis=0))


@triton.jit
def _cg_finish_kernel(rs_ptr, thresh_ptr, status_ptr, iters_ptr, part_ptr, rr_ptr, T, NB,
                      NB_POW: tl.constexpr):
    t = tl.program_id(0)
    pAp, rAp, ApAp = _task_dots(part_ptr, t, T, NB, NB_POW)
    status = tl.load(status_ptr + t)
    active = status == 0
    finite = _all_finite(pAp, rAp, ApAp)
    nonfinite = active & ~finite
    negative = active & finite & (pAp <= 0)
    ok = active & finite & (pAp > 0)
    i = tl.arange(0, NB_POW)
    rr = tl.sum(tl.load(rr_ptr + t * NB + i, mask=i < NB, other=0.0), axis=0)
    blown = ok & ~((rr == rr) & (rr < float("inf")))
    rs = tl.load(rs_ptr + t)
    tl.store(rs_ptr + t, tl.where(ok & ~blown, rr, rs))
    converged = ok & ~blown & (rr <= tl.load(thresh_ptr + t))
    new = tl.where(converged, 1, status.to(tl.int32))
    new = tl.where(negative, 2, new)
    new = tl.where(nonfinite | blown, 3, new)
    tl.store(status_ptr + t, new.to(tl.int8))
    tl.store(iters_ptr + t, tl.load(iters_ptr + t) + ok.to(tl.int64))


def cg_update(x, r, p, Ap, rs, status, iters, thresh):
    """One masked CG iteration for all tasks, in place; returns (x, r, p, rs, status, iters).
    Same contract as imaml_fast.cg.cg_update_ref."""
    T, P = x.shape
    for name, v in (("r", r), ("p", p), ("Ap", Ap)):
        if v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
            raise ValueError(f"{name} must match x ({tuple(x.shape)} {x.dtype}), got {tuple(v.shape)} {v.dtype}")
    for name, v in (("x", x), ("r", r), ("p", p), ("Ap", Ap)):
        if not v.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if rs.dtype != acc or thresh.dtype != acc:
        raise ValueError(f"rs and thresh must be {acc} for {x.dtype} vectors")
    if status.dtype != torch.int8 or iters.dtype != torch.int64:
        raise ValueError("status must be int8 and iters int64")
    Ap = Ap.contiguous()
    nb = triton.cdiv(P, BLOCK)
    nb_pow = triton.next_power_of_2(nb)
    part = torch.empty(3, T, nb, dtype=acc, device=x.device)
    rr = torch.empty(T, nb, dtype=acc, device=x.device)
    _cg_dots_kernel[(T, nb)](p, Ap, r, part, T, P, nb, BLOCK=BLOCK)
    _cg_update_kernel[(T, nb)](x, r, p, Ap, rs, status, iters, part, rr, T, P, nb,
                               NB_POW=nb_pow, BLOCK=BLOCK)
    _cg_finish_kernel[(T,)](rs, thresh, status, iters, part, rr, T, nb, NB_POW=nb_pow)
    return x, r, p, rs, status, iters

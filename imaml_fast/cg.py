"""Batched conjugate gradient: T independent SPD systems A_i x_i = b_i solved together.

Each task keeps its own step sizes and its own status. A task stops changing as soon as it
converges (||r|| <= tol * ||b||) or is flagged, and the loop never asks the host whether to go
on: it always runs `max_iter` iterations of masked updates, so it can be captured in a CUDA
graph and makes no host synchronisation (tests run it on the `meta` device, where any
.item() or bool() of a tensor raises).

Flags: a non-positive curvature p^T A p <= 0 (an indefinite Hessian with a small lam) stops
the task at its last iterate, except on its first iteration, where the steepest-descent step
x0 + r0 is returned (Nocedal & Wright, Algorithm 7.1). A non-finite value stops the task at
its last finite iterate. Nothing NaN ever leaves the solver unless b itself was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Union

import torch

CG_MAX_ITER = 0  # ran out of iterations before reaching the tolerance
CG_CONVERGED = 1
CG_NEGATIVE_CURVATURE = 2
CG_NONFINITE = 3
CG_STATUS_NAMES = {CG_MAX_ITER: "max_iter", CG_CONVERGED: "converged",
                   CG_NEGATIVE_CURVATURE: "negative_curvature", CG_NONFINITE: "nonfinite"}

Tensors = Union[torch.Tensor, Dict[str, torch.Tensor]]


@dataclass
class CGResult:
    x: Tensors                 # [T, P] (or a dict of [T, ...] when b was a dict)
    iters: torch.Tensor        # [T] int64: matrix-vector products each task used
    residual: torch.Tensor     # [T]: ||b - A x|| (recursive residual), accumulation dtype
    status: torch.Tensor       # [T] int8: CG_MAX_ITER / CG_CONVERGED / CG_NEGATIVE_CURVATURE / CG_NONFINITE

    @property
    def converged(self) -> torch.Tensor:
        return self.status == CG_CONVERGED

    @property
    def flagged(self) -> torch.Tensor:
        return self.status >= CG_NEGATIVE_CURVATURE


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions accumulate in fp32 for bf16/fp16 vectors, natively for fp32/fp64."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def batched_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-task dot products [T] of [T, P] tensors, accumulated in acc_dtype."""
    dt = acc_dtype(a.dtype)
    return (a.to(dt) * b.to(dt)).sum(-1)


def cg_update_ref(x, r, p, Ap, rs, status, iters, thresh):
    """One masked CG iteration for all tasks, given Ap = A p. Returns the new
    (x, r, p, rs, status, iters). Tasks whose status is not CG_MAX_ITER ("still running")
    are left exactly as they are."""
    active = status == CG_MAX_ITER
    pAp = batched_dot(p, Ap)
    nonfinite = active & ~torch.isfinite(pAp)
    negative = active & ~nonfinite & (pAp <= 0)
    ok = active & ~nonfinite & ~negative
    alpha = torch.where(ok, rs / torch.where(ok, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
    a = alpha.to(x.dtype).unsqueeze(-1)
    okc = ok.unsqueeze(-1)
    x_new = torch.where(okc, x + a * p, x)
    r_new = torch.where(okc, r - a * Ap, r)
    rs_new = batched_dot(r_new, r_new)
    # An overflow inside the update: keep the last finite iterate.
    blown = ok & ~torch.isfinite(rs_new)
    nonfinite = nonfinite | blown
    ok = ok & ~blown
    okc = ok.unsqueeze(-1)
    x_new = torch.where(okc, x_new, x)
    r_new = torch.where(okc, r_new, r)
    rs_new = torch.where(ok, rs_new, rs)
    # Negative curvature on the first iteration: the steepest-descent step (p = r0 there).
    first = negative & (iters == 0)
    x_new = torch.where(first.unsqueeze(-1), x_new + p, x_new)
    converged = ok & (rs_new <= thresh)
    beta = torch.where(ok, rs_new / torch.where(ok, rs, torch.ones_like(rs)), torch.zeros_like(rs))
    p_new = torch.where((ok & ~converged).unsqueeze(-1), r_new + beta.to(p.dtype).unsqueeze(-1) * p, p)
    status = torch.where(converged, torch.full_like(status, CG_CONVERGED), status)
    status = torch.where(negative, torch.full_like(status, CG_NEGATIVE_CURVATURE), status)
    status = torch.where(nonfinite, torch.full_like(status, CG_NONFINITE), status)
    return x_new, r_new, p_new, rs_new, status, iters + ok.long()


def _check_rhs(b: torch.Tensor, name: str) -> None:
    if b.dim() != 2:
        raise ValueError(f"cg_solve: {name} must be [T, P] (tasks x parameters), got shape {tuple(b.shape)}")
    if not b.is_floating_point():
        raise ValueError(f"cg_solve: {name} must be a floating-point tensor, got {b.dtype}")


def cg_solve(matvec: Callable, b: Tensors, *, x0: Tensors = None, max_iter: int = 10,
             tol: float = 1e-10, update: Callable = cg_update_ref) -> CGResult:
    """Solve A_i x_i = b_i for every task i with at most `max_iter` CG iterations each.

    matvec: v -> A v, for v shaped like b ([T, P], or a dict of [T, ...] tensors); each A_i
        must be symmetric, and positive definite for a clean solve (non-positive curvature is
        flagged, see the module docstring).
    x0: warm start (default zero: the first iteration then needs no extra product).
    tol: per-task relative tolerance, ||b_i - A_i x_i|| <= tol * ||b_i||.
    update: the fused iteration (cg_update_ref or a kernel backend's twin of it).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"cg_solve: max_iter={max_iter!r} must be an int >= 0")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"cg_solve: tol={tol!r} must be a number >= 0")
    if isinstance(b, dict):
        return _cg_solve_dict(matvec, b, x0=x0, max_iter=max_iter, tol=tol, update=update)
    _check_rhs(b, "b")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"cg_solve: x0 has shape {tuple(x0.shape)} but b has {tuple(b.shape)}")
    T = b.shape[0]
    thresh = (tol * tol) * batched_dot(b, b)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x0)
    p = r.clone()
    rs = batched_dot(r, r)
    status = torch.full((T,), CG_MAX_ITER, dtype=torch.int8, device=b.device)
    status = torch.where(rs <= thresh, torch.full_like(status, CG_CONVERGED), status)
    status = torch.where(torch.isfinite(rs), status, torch.full_like(status, CG_NONFINITE))
    iters = torch.zeros(T, dtype=torch.long, device=b.device)
    for _ in range(max_iter):
        Ap = matvec(p)
        x, r, p, rs, status, iters = update(x, r, p, Ap, rs, status, iters, thresh)
    return CGResult(x=x, iters=iters, residual=rs.sqrt(), status=status)


def _cg_solve_dict(matvec, b, *, x0, max_iter, tol, update):
    names = list(b)
    T = b[names[0]].shape[0]
    shapes = {n: b[n].shape for n in names}
    for n in names:
        if b[n].shape[0] != T:
            raise ValueError(f"cg_solve: b['{n}'] has {b[n].shape[0]} tasks but b['{names[0]}'] has {T}")
    sizes = [b[n][0].numel() for n in names]

    def flat(d):
        return torch.cat([d[n].reshape(T, -1) for n in names], dim=1)

    def unflat(v):
        return {n: c.view(shapes[n]) for n, c in zip(names, torch.split(v, sizes, dim=1))}

    res = cg_solve(lambda v: flat(matvec(unflat(v))), flat(b),
                   x0=None if x0 is None else flat(x0), max_iter=max_iter, tol=tol, update=update)
    res.x = unflat(res.x)
    return res

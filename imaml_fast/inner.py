"""Proximal inner solvers, batched over tasks.

Each task i solves  phi_i = argmin_phi L_i(phi) + lam/2 ||phi - theta||^2  from phi = theta,
on flat [T, P] parameters:

- inner_gd: K steps phi <- phi - lr (grad L_i(phi) + lam (phi - theta))  (iMAML-GD)
- inner_gd_armijo: K gradient steps like inner_gd, each accepted only if it decreases the
  task's regularised objective F_i enough (Armijo); a rejected step leaves phi_i where it was
  and halves that task's step size, an accepted one lets it grow back towards lr. One more
  gradient evaluation than inner_gd (the start point's), no host sync.
- inner_agd: K Nesterov-accelerated proximal gradient steps with the same per-task Armijo
  step sizes, momentum reset where it stops helping (adaptive restart), and the objective
  never increasing. One gradient and one loss evaluation per step. On ill-conditioned inner
  problems it gets far closer to the minimiser than inner_gd_armijo in the same steps (see
  its docstring for the measurement).
- inner_hf: K Hessian-free Newton steps: solve (H_i + lam I) d = grad F_i(phi) with a few CG
  iterations on the batched HVP, then backtrack phi - t d, t = 1, 1/2, ... until the Armijo
  condition holds for that task (iMAML-HF).

Nothing of the inner loop is kept for a backward pass: each step's graph is freed before the
next one starts, so memory does not grow with K.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .cg import batched_dot, cg_solve, cg_update_ref
from .functional import FunctionalModel
from .hvp import BatchedHVP

ARMIJO_C = 1e-4
# inner_gd_armijo: an accepted step multiplies the task's step size by this (at most lr)
GD_ARMIJO_GROW = 1.25
# ... and, where F's change is within this many machine epsilons of |F| (lost in rounding,
# so the decrease test cannot decide), keeps a step that shrinks ||grad F|| instead
ARMIJO_FLAT = 64


def prox_update_ref(phi: torch.Tensor, g: torch.Tensor, theta: torch.Tensor, lr: float,
                    lam: float) -> torch.Tensor:
    """One proximal gradient step over [T, P]: phi - lr * (g + lam * (phi - theta)).
    theta is [P] (shared by all tasks) or [T, P]."""
    return phi - lr * (g + lam * (phi - theta))


@dataclass
class InnerResult:
    phi: torch.Tensor          # [T, P] adapted parameters (detached)
    grad_evals: int = 0        # batched support-gradient evaluations
    hvp_evals: int = 0         # batched Hessian-vector products
    loss_evals: int = 0        # batched support-loss evaluations (line search)
    # ||grad F_i(theta)|| = ||grad L_i(theta)|| [T] (the first gradient a solver takes; None
    # when it took none, K = 0) and grad F_i(phi_i) [T, P] where the solver ends knowing it
    # (gd_armijo): the inner residual ||grad F_i(phi_i)|| / ||grad F_i(theta)|| needs both
    grad0_norm: Optional[torch.Tensor] = None
    final_grad: Optional[torch.Tensor] = None
    # [T] long: the iterations each task ran (inner_steps for all but gd_armijo with a tol)
    steps_taken: Optional[torch.Tensor] = None


def regularised_loss(losses: torch.Tensor, phi: torch.Tensor, theta: torch.Tensor, lam: float):
    d = phi - theta
    return losses + 0.5 * lam * batched_dot(d, d).to(losses.dtype)


def inner_gd(fm: FunctionalModel, theta: torch.Tensor, x, y, *, steps: int, lr: float,
             lam: float, strategy="vmap", prox_update=prox_update_ref) -> InnerResult:
    T = x.shape[0]
    phi = theta.expand(T, -1).clone()
    grad0_norm = None
    for k in range(steps):
        g, _ = fm.grad_and_losses(phi, x, y, strategy)
        if k == 0:
            grad0_norm = batched_dot(g, g).sqrt()
        phi = prox_update(phi, g, theta, lr, lam)
    return InnerResult(phi=phi, grad_evals=steps, grad0_norm=grad0_norm)


def inner_gd_armijo(fm: FunctionalModel, theta: torch.Tensor, x, y, *, steps: int, lr: float,
                    lam: float, strategy="vmap", dot=batched_dot, tol: float = 0.0) -> InnerResult:
    """Proximal gradient descent with a per-task step size t_i (starting at lr): iteration k
    proposes c = phi - t_i G_i, G_i = grad F_i(phi), and keeps it only where
    F_i(c) <= F_i(phi) - ARMIJO_C t_i ||G_i||^2, or, where the two values of F_i differ by less
    than their rounding (ARMIJO_FLAT), where ||grad F_i(c)|| < ||G_i||; a non-finite F_i(c)
    fails both. A task that fails keeps phi_i and halves t_i; one that passes multiplies t_i
    by GD_ARMIJO_GROW, at most lr. Each proposal costs one batched gradient evaluation (its
    gradient is the next iteration's G if it is kept), so K steps cost K + 1. dot: the
    per-task dot product [T] (a backend's fused batched_dot).

    tol > 0 (IMAMLConfig.inner_tol): before each iteration, a task whose ||G_i|| is at most
    tol * ||G_i(theta)|| stops where it is and leaves the batch, so the later gradient
    evaluations run on the tasks still going (one host sync per iteration). A task's result
    does not depend on the others': it is what it would be alone. InnerResult.steps_taken
    says how many iterations each task ran.

    Why: with a fixed step, iMAML-GD on the Omniglot network stops converging once
    meta-training sharpens the support loss past lr * (largest Hessian eigenvalue + lam) = 2;
    the inner iterate then wanders, the implicit formula no longer describes it, and 20-way
    training stalls (presets.py has the measurements). F_i never increases by more than its
    rounding. (Without the gradient test the solver would stall about sqrt(machine epsilon)
    from the minimiser, where every step's decrease is below F_i's rounding.)"""
    T = x.shape[0]
    phi = theta.expand(T, -1).clone()
    if steps == 0:
        return InnerResult(phi=phi, steps_taken=_full_steps(phi, 0))
    # at phi = theta the proximal term and its gradient are zero: G = g, F = the support loss
    G, losses = fm.grad_and_losses(phi, x, y, strategy)
    F = losses.to(phi.dtype)
    GG = dot(G, G)
    grad0_norm = GG.sqrt()
    t = torch.full((T,), float(lr), dtype=phi.dtype, device=phi.device)
    flat = ARMIJO_FLAT * torch.finfo(phi.dtype).eps
    evals = 1
    if tol > 0:
        # the tasks still going are rows `rows` of the outputs; phi, G, ... x, y hold only them
        out = _Finished(phi, G, steps)
        rows = torch.arange(T, device=phi.device)
        limit = tol * grad0_norm
    for k in range(steps):
        if tol > 0:
            fin = GG.sqrt() <= limit
            if bool(fin.any()):  # the host sync
                out.put(rows[fin], phi[fin], G[fin], k)
                go = ~fin
                rows, phi, G, GG, F, t, limit = (v[go] for v in (rows, phi, G, GG, F, t, limit))
                x, y = x[go], y[go]
                if rows.numel() == 0:
                    break
        # [T, P] passes are a visible share of a CPU step here: fused and in place where safe
        cand = torch.addcmul(phi, t.unsqueeze(-1), G, value=-1.0)
        gc, lc = fm.grad_and_losses(cand, x, y, strategy)
        evals += 1
        d = cand - theta
        Fc = (lc + 0.5 * lam * dot(d, d).to(lc.dtype)).to(phi.dtype)
        Gc = d.mul_(lam).add_(gc)  # grad F at cand, in d's buffer
        GGc = dot(Gc, Gc)
        ok = torch.isfinite(Fc) & ((Fc <= F - ARMIJO_C * t * GG)
                                   | (((Fc - F).abs() <= flat * F.abs()) & (GGc < GG)))
        keep = ok.unsqueeze(-1)
        phi = torch.where(keep, cand, phi)
        G = torch.where(keep, Gc, G)
        GG = torch.where(ok, GGc, GG)
        F = torch.where(ok, Fc, F)
        t = torch.where(ok, (t * GD_ARMIJO_GROW).clamp(max=float(lr)), 0.5 * t)
    if tol > 0:
        if rows.numel():
            out.put(rows, phi, G, steps)
        phi, G, taken = out.phi, out.G, out.taken
    else:
        taken = _full_steps(phi, steps)
    return InnerResult(phi=phi, grad_evals=evals, grad0_norm=grad0_norm, final_grad=G,
                       steps_taken=taken)


def inner_agd(fm: FunctionalModel, theta: torch.Tensor, x, y, *, steps: int, lr: float,
              lam: float, strategy="vmap", dot=batched_dot) -> InnerResult:
    """Nesterov-accelerated proximal gradient descent with per-task Armijo step sizes and
    adaptive restart (IMAMLConfig(inner_solver="agd")).

    Iteration k, per task, from the accepted iterate phi and the extrapolated point v
    (v = phi = theta at the start), with F = L + lam/2 ||. - theta||^2, G = grad F(v):
        c = v - t G;  accepted where F(c) <= F(v) - ARMIJO_C t ||G||^2 and F(c) <= F(phi),
                      each test also passed where the two values differ by less than their
                      rounding (ARMIJO_FLAT)
        phi' = c where accepted, else phi
        v'   = phi' + beta (phi' - phi),  beta = (1 - sqrt(lam t)) / (1 + sqrt(lam t))
    with beta = 0 (a restart: v' = phi') where the step was not accepted or where
    G . (phi' - phi) > 0 (the momentum points uphill: O'Donoghue and Candes' gradient
    restart). A task whose Armijo test fails halves t; one accepted multiplies it by
    GD_ARMIJO_GROW, at most lr; one that passes Armijo from v but would raise F(phi) keeps t
    and restarts. beta is Nesterov's constant-momentum choice for a lam-strongly convex F with
    curvature at most 1/t. So F(phi) never increases by more than its rounding, and where
    momentum does not help the iteration is inner_gd_armijo's. Each iteration: one gradient
    (at v) and one loss (at c).

    Why: F's curvature along the directions the support loss hardly bends is lam alone, where
    gradient descent contracts by only (1 - t lam) per step (0.94 at t = 0.03, lam = 2), while
    the directions the loss bends sharply cap t. Measured on the 5-way 1-shot run's
    meta-parameters after 4,000 meta-steps at lam 2 (benchmarks/inner_steps_probe.py, 16
    training tasks): after 16 steps gd_armijo's F was 0.20 above the lowest F found, twenty
    times that value, although its inner residual was 1.3%; this solver's was 0.013, and
    6e-4 after 24 steps (gd_armijo: 0.071; results/cpu-epyc-2core/inner_solvers/). Solving
    the inner problem better is not training better, though: at lam 2 it trained far worse
    than gd_armijo's early-stopped loop (imaml_fast/presets.py), at lam 0.5 about as well.
    InnerResult.final_grad stays None: the gradient at phi is not evaluated."""
    T = x.shape[0]
    phi = theta.expand(T, -1).clone()
    if steps == 0:
        return InnerResult(phi=phi, steps_taken=_full_steps(phi, 0))
    v = phi
    t = torch.full((T,), float(lr), dtype=phi.dtype, device=phi.device)
    flat = ARMIJO_FLAT * torch.finfo(phi.dtype).eps
    F_phi = grad0_norm = None
    for k in range(steps):
        g, losses = fm.grad_and_losses(v, x, y, strategy)
        G = v - theta
        Fv = (losses + 0.5 * lam * dot(G, G).to(losses.dtype)).to(phi.dtype)
        G.mul_(lam).add_(g)  # grad F at v
        GG = dot(G, G)
        if k == 0:  # v = phi = theta
            F_phi, grad0_norm = Fv, GG.sqrt()
        cand = torch.addcmul(v, t.unsqueeze(-1), G, value=-1.0)
        dc = cand - theta
        Fc = fm.losses(cand, x, y, strategy) + 0.5 * lam * dot(dc, dc).to(losses.dtype)
        Fc = Fc.to(phi.dtype)
        # where F's change is within its rounding the tests cannot decide: the step is taken
        # (the gradient, still accurate there, chose it), else the solver would stall about
        # sqrt(machine epsilon) from the minimiser
        level = (Fc - Fv).abs() <= flat * Fv.abs()
        armijo = torch.isfinite(Fc) & ((Fc <= Fv - ARMIJO_C * t * GG) | level)
        ok = armijo & ((Fc <= F_phi) | (level & ((Fc - F_phi).abs() <= flat * F_phi.abs())))
        new = torch.where(ok.unsqueeze(-1), cand, phi)
        step = new - phi
        root = (lam * t).sqrt()
        beta = torch.where(~ok | (dot(G, step) > 0), torch.zeros_like(t), (1 - root) / (1 + root))
        v = torch.addcmul(new, beta.unsqueeze(-1), step)
        phi = new
        F_phi = torch.where(ok, Fc, F_phi)
        t = torch.where(ok, (t * GD_ARMIJO_GROW).clamp(max=float(lr)),
                        torch.where(armijo, t, 0.5 * t))
    return InnerResult(phi=phi, grad_evals=steps, loss_evals=steps, grad0_norm=grad0_norm,
                       steps_taken=_full_steps(phi, steps))


class _Finished:
    """The full [T, ...] outputs of a solver whose tasks finish at different iterations."""

    def __init__(self, phi, G, steps):
        self.phi, self.G = torch.empty_like(phi), torch.empty_like(G)
        self.taken = _full_steps(phi, steps)

    def put(self, rows, phi, G, k):
        self.phi[rows], self.G[rows], self.taken[rows] = phi, G, k


def _full_steps(phi: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.full((phi.shape[0],), steps, dtype=torch.long, device=phi.device)


def _capturing(device: torch.device) -> bool:
    """True where the host must not read device values: while a CUDA graph is being captured,
    and on the meta device (shapes only; the tests use it to prove a path sync-free)."""
    if device.type == "meta":
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def inner_hf(fm: FunctionalModel, theta: torch.Tensor, x, y, *, steps: int, lam: float,
             cg_steps: int, cg_tol: float, ls_steps: int, hvp_mode="auto", strategy="vmap",
             cg_update=cg_update_ref) -> InnerResult:
    T = x.shape[0]
    phi = theta.expand(T, -1).clone()
    res = InnerResult(phi=phi)
    for _ in range(steps):
        hvp = BatchedHVP(fm, phi, x, y, hvp_mode, strategy, need_grad=True)
        res.grad_evals += 1
        G = hvp.grad + lam * (phi - theta)
        if res.grad0_norm is None:
            res.grad0_norm = batched_dot(G, G).sqrt()
        F0 = regularised_loss(hvp.losses, phi, theta, lam)
        sol = cg_solve(lambda v: hvp(v).add_(v, alpha=lam), G, max_iter=cg_steps, tol=cg_tol,
                       update=cg_update)
        res.hvp_evals += hvp.calls
        hvp.release()
        d = sol.x
        slope = batched_dot(G, d)
        # Not a descent direction (cannot happen for an SPD solve, can with flags): use -G.
        bad = ~(slope > 0)
        d = torch.where(bad.unsqueeze(-1), G, d)
        slope = torch.where(bad, batched_dot(G, G), slope)
        phi = _backtrack(fm, phi, d, slope, F0, theta, x, y, lam, ls_steps, strategy, res)
    res.phi = phi
    return res


def _backtrack(fm, phi, d, slope, F0, theta, x, y, lam, ls_steps, strategy, res):
    T = phi.shape[0]
    t = torch.ones(T, dtype=slope.dtype, device=phi.device)
    step = torch.zeros_like(t)
    accepted = torch.zeros(T, dtype=torch.bool, device=phi.device)
    sync_ok = not _capturing(phi.device)
    for _ in range(ls_steps):
        cand = phi - t.to(phi.dtype).unsqueeze(-1) * d
        with torch.no_grad():
            Fc = regularised_loss(fm.losses(cand, x, y, strategy), cand, theta, lam)
        res.loss_evals += 1
        ok = ~accepted & torch.isfinite(Fc) & (Fc <= F0 - ARMIJO_C * t * slope)
        step = torch.where(ok, t, step)
        accepted = accepted | ok
        t = torch.where(accepted, t, 0.5 * t)
        # Later trials cannot change an accepted task, so stopping early changes no number;
        # it is skipped while a CUDA graph is captured (no host sync there).
        if sync_ok and bool(accepted.all()):
            break
    # A task that found no decrease keeps its parameters.
    return phi - step.to(phi.dtype).unsqueeze(-1) * d


def solve_inner(fm: FunctionalModel, theta: torch.Tensor, x, y, config, strategy="vmap",
                ops=None) -> InnerResult:
    """Run the inner solver that `config` (an IMAMLConfig) names, with a backend's ops."""
    ops = ops or {"prox_update": prox_update_ref, "cg_update": cg_update_ref}
    with torch.no_grad():
        if config.inner_solver == "gd_armijo":
            return inner_gd_armijo(fm, theta, x, y, steps=config.inner_steps, lr=config.inner_lr,
                                   lam=config.lam, strategy=strategy,
                                   dot=ops.get("batched_dot", batched_dot), tol=config.inner_tol)
        if config.inner_solver == "agd":
            return inner_agd(fm, theta, x, y, steps=config.inner_steps, lr=config.inner_lr,
                             lam=config.lam, strategy=strategy,
                             dot=ops.get("batched_dot", batched_dot))
        if config.inner_solver == "gd":
            res = inner_gd(fm, theta, x, y, steps=config.inner_steps, lr=config.inner_lr,
                           lam=config.lam, strategy=strategy, prox_update=ops["prox_update"])
        else:
            res = inner_hf(fm, theta, x, y, steps=config.inner_steps, lam=config.lam,
                           cg_steps=config.hf_cg_steps, cg_tol=config.cg_tol,
                           ls_steps=config.hf_ls_steps, hvp_mode=config.hvp,
                           strategy=strategy, cg_update=ops["cg_update"])
        res.steps_taken = _full_steps(res.phi, config.inner_steps)
        return res

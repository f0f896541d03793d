"""The "reference" backend: one task at a time, in plain autograd.

This is the structure of the authors' iMAML code (a Python loop over tasks; every
Hessian-vector product rebuilds the support gradient with create_graph=True and
back-propagates through it once more) with the paper's math (proximal inner steps, the
operator I + (H + damping I)/lam, CG started at zero). It shares no solver code with the
batched engine, so tests that compare the two check each against an independent
implementation, and benchmarks measure the batched engine against it.
"""
from __future__ import annotations

import torch

from ..cg import (CG_CONVERGED, CG_MAX_ITER, CG_NEGATIVE_CURVATURE, CG_NONFINITE)
from ..inner import ARMIJO_C, ARMIJO_FLAT, GD_ARMIJO_GROW


def _grad(fm, loss_of, w):
    """Gradient [P] and loss of loss_of at the flat parameters w, taken per parameter tensor
    as in the authors' code (autograd over the model's parameters, never a sliced flat
    leaf: see FunctionalModel.leaves)."""
    with torch.enable_grad():
        leaves = fm.leaves(w)
        loss = loss_of(leaves)
        g = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return fm.join(g), loss.detach()


def hvp_ref(fm, loss_of, w, v, seen=None):
    """H v by double backward, the graph rebuilt for this one product. seen: a dict that, if
    empty, receives the gradient [P] and the loss at w that the product computes on its way
    ("grad", "loss"; detached)."""
    with torch.enable_grad():
        leaves = fm.leaves(w)
        loss = loss_of(leaves)
        g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True,
                                materialize_grads=True)
        if seen is not None and not seen:
            seen["grad"] = fm.join([t.detach() for t in g])
            seen["loss"] = loss.detach()
        if not any(t.requires_grad for t in g):
            return torch.zeros_like(v)
        hv = torch.autograd.grad(g, leaves, fm.split(v), allow_unused=True,
                                 materialize_grads=True)
    return fm.join(hv)


def cg_ref(matvec, b, max_iter, tol):
    """Plain CG for one system, deciding on the host. Returns (x, iters, residual, status)
    with the same conventions as imaml_fast.cg_solve."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = torch.dot(r, r)
    thresh = tol * tol * torch.dot(b, b)
    iters = 0
    if not torch.isfinite(rs):
        return x, iters, rs.sqrt(), CG_NONFINITE
    if rs <= thresh:
        return x, iters, rs.sqrt(), CG_CONVERGED
    status = CG_MAX_ITER
    for _ in range(max_iter):
        Ap = matvec(p)
        pAp = torch.dot(p, Ap)
        if not torch.isfinite(pAp):
            status = CG_NONFINITE
            break
        if pAp <= 0:
            if iters == 0:
                x = x + p
            status = CG_NEGATIVE_CURVATURE
            break
        alpha = rs / pAp
        x_new = x + alpha * p
        r_new = r - alpha * Ap
        rs_new = torch.dot(r_new, r_new)
        if not torch.isfinite(rs_new):
            status = CG_NONFINITE
            break
        x, r, iters = x_new, r_new, iters + 1
        if rs_new <= thresh:
            rs = rs_new
            status = CG_CONVERGED
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, iters, rs.sqrt(), status


# Each inner solver returns phi, ||grad L(theta)||, its first gradient's norm (None for
# K = 0), for the inner residual, and the number of steps it ran.

def _proximal(w, loss, theta, lam):
    """F(w) = loss + lam/2 ||w - theta||^2, the inner solvers' objective."""
    d = w - theta
    return loss + 0.5 * lam * torch.dot(d, d)


def _inner_gd(fm, loss_of, theta, config):
    phi, g0 = theta.clone(), None
    for _ in range(config.inner_steps):
        g, _ = _grad(fm, loss_of, phi)
        g0 = g.norm() if g0 is None else g0
        phi = phi - config.inner_lr * (g + config.lam * (phi - theta))
    return phi, g0, config.inner_steps


def _inner_gd_armijo(fm, loss_of, theta, config):
    lam, lr = config.lam, float(config.inner_lr)

    phi, t = theta.clone(), lr
    flat = ARMIJO_FLAT * torch.finfo(phi.dtype).eps
    if config.inner_steps == 0:
        return phi, None, 0
    G, F = _grad(fm, loss_of, phi)  # at phi = theta the proximal term and its gradient are 0
    GG = torch.dot(G, G)
    g0 = GG.sqrt()
    for k in range(config.inner_steps):
        if config.inner_tol > 0 and GG.sqrt() <= config.inner_tol * g0:
            return phi, g0, k  # solved to the tolerance
        cand = phi - t * G
        gc, lc = _grad(fm, loss_of, cand)
        Fc, Gc = _proximal(cand, lc, theta, lam), gc + lam * (cand - theta)
        GGc = torch.dot(Gc, Gc)
        decrease = Fc <= F - ARMIJO_C * t * GG
        level = abs(Fc - F) <= flat * abs(F) and GGc < GG
        if torch.isfinite(Fc) and (decrease or level):
            phi, G, GG, F = cand, Gc, GGc, Fc
            t = min(t * GD_ARMIJO_GROW, lr)
        else:
            t = 0.5 * t
    return phi, g0, config.inner_steps


def _inner_agd(fm, loss_of, theta, config):
    lam, lr = config.lam, float(config.inner_lr)

    phi, t = theta.clone(), lr
    if config.inner_steps == 0:
        return phi, None, 0
    v, F_phi, g0 = phi, None, None
    flat = ARMIJO_FLAT * torch.finfo(phi.dtype).eps
    for _ in range(config.inner_steps):
        g, loss = _grad(fm, loss_of, v)
        Fv, G = _proximal(v, loss, theta, lam), g + lam * (v - theta)
        if g0 is None:
            F_phi, g0 = Fv, G.norm()
        cand = v - t * G
        with torch.no_grad():
            Fc = _proximal(cand, loss_of(fm.split(cand)), theta, lam)
        level = abs(Fc - Fv) <= flat * abs(Fv)  # a change lost in rounding: taken
        armijo = bool(torch.isfinite(Fc)) and bool(Fc <= Fv - ARMIJO_C * t * torch.dot(G, G)
                                                   or level)
        if armijo and (Fc <= F_phi or (level and abs(Fc - F_phi) <= flat * abs(F_phi))):
            step = cand - phi
            beta = 0.0 if torch.dot(G, step) > 0 else (1 - (lam * t) ** 0.5) / (1 + (lam * t) ** 0.5)
            phi, F_phi = cand, Fc
            v = phi + beta * step
            t = min(t * GD_ARMIJO_GROW, lr)
        else:  # restart from phi; a failed Armijo test also halves the step
            v = phi
            t = t if armijo else 0.5 * t
    return phi, g0, config.inner_steps


def _inner_hf(fm, loss_of, theta, config):
    lam = config.lam
    phi, g0 = theta.clone(), None

    for _ in range(config.inner_steps):
        g, loss = _grad(fm, loss_of, phi)
        G = g + lam * (phi - theta)
        g0 = G.norm() if g0 is None else g0
        F0 = _proximal(phi, loss, theta, lam)
        d, _, _, _ = cg_ref(lambda v: hvp_ref(fm, loss_of, phi, v) + lam * v, G,
                            config.hf_cg_steps, config.cg_tol)
        slope = torch.dot(G, d)
        if not slope > 0:
            d, slope = G, torch.dot(G, G)
        t = 1.0
        for _ in range(config.hf_ls_steps):
            cand = phi - t * d
            with torch.no_grad():
                Fc = _proximal(cand, loss_of(fm.split(cand)), theta, lam)
            if torch.isfinite(Fc) and Fc <= F0 - ARMIJO_C * t * slope:
                phi = cand
                break
            t *= 0.5
    return phi, g0, config.inner_steps


def meta_gradient_reference(fm, theta, xs, ys, xq, yq, config, operator):
    """operator = (shift, scale): the CG operator is shift I + scale H. Runs ATen's own
    layers, as the authors' code does (not imaml_fast.layers' closed-form derivatives)."""
    with fm.layer_derivatives("autograd"):
        return _meta_gradient_reference(fm, theta, xs, ys, xq, yq, config, operator)


def _meta_gradient_reference(fm, theta, xs, ys, xq, yq, config, operator):
    from ..implicit import MetaGradient

    T = xs.shape[0]
    phis, gs, iters, resid, status, inner_loss, query_loss = [], [], [], [], [], [], []
    inner_res, clipped, steps, cosines = [], [], [], []
    shift, scale = operator
    for i in range(T):
        def support(params, i=i):
            return fm.loss_params(params, xs[i], ys[i])

        def query(params, i=i):
            return fm.loss_params(params, xq[i], yq[i])

        solve = {"gd": _inner_gd, "gd_armijo": _inner_gd_armijo, "agd": _inner_agd,
                 "hf": _inner_hf}[config.inner_solver]
        phi, g0, k = solve(fm, support, theta, config)
        steps.append(k)
        gq, ql = _grad(fm, query, phi)
        seen = {}  # the support gradient and loss at phi, from the first product's graph
        if config.cg_steps == 0:
            x, it, res, st = gq, 0, gq.norm(), CG_MAX_ITER
        else:
            x, it, res, st = cg_ref(
                lambda v: shift * v + scale * hvp_ref(fm, support, phi, v, seen), gq,
                config.cg_steps, config.cg_tol)
        # The inner residual and support loss are diagnostics the authors' code does not
        # compute: they reuse the first product's gradient, and cost a pass of their own only
        # where CG ran no product (cg_steps 0, or a zero or non-finite right-hand side).
        gs_phi, il = (seen["grad"], seen["loss"]) if seen else _grad(fm, support, phi)
        rnorm = (gs_phi + config.lam * (phi - theta)).norm()
        inner_res.append(rnorm / g0 if g0 is not None and rnorm > 0 else (rnorm > 0).to(rnorm.dtype))
        clip = False
        if config.cg_clip and config.cg_steps > 0:
            margin = shift - scale * config.lam
            if not margin > 0:
                raise ValueError(f"cg_clip needs an operator shift I + scale H with shift - scale "
                                 f"* lam > 0 (here {margin:g}): use cg_damping > 0")
            bound = gq.norm() / margin
            clip = bool(x.norm() > bound)
            x = x * (bound / x.norm()) if clip else x
        clipped.append(clip)
        # cos(g_i, gq_i), spelled out: 1 where gq_i = 0, 0 where only g_i is
        nx, nq = x.norm(), gq.norm()
        cosines.append(torch.dot(x, gq) / (nx * nq) if nx * nq > 0
                       else (gq.new_tensor(0.0) if nq > 0 else gq.new_tensor(1.0)))
        phis.append(phi)
        gs.append(x)
        iters.append(it)
        resid.append(res)
        status.append(st)
        inner_loss.append(il)
        query_loss.append(ql)
    phi = torch.stack(phis).detach()
    task_flat = torch.stack(gs).detach()
    grads_flat = task_flat.mean(0)
    dev = phi.device
    return MetaGradient(
        grads=fm.unflatten(grads_flat), task_grads=fm.unflatten(task_flat),
        adapted=fm.unflatten(phi), cg_iters=torch.tensor(iters, device=dev),
        cg_residual=torch.stack(resid), cg_status=torch.tensor(status, dtype=torch.int8, device=dev),
        cg_clipped=torch.tensor(clipped, dtype=torch.bool, device=dev),
        inner_loss=torch.stack(inner_loss), inner_residual=torch.stack(inner_res).detach(),
        query_loss=torch.stack(query_loss),
        grads_flat=grads_flat, task_grads_flat=task_flat, adapted_flat=phi,
        backend="reference", hvp="revrev", task_batching="loop", evals={},
        inner_steps=torch.tensor(steps, dtype=torch.long, device=dev),
        first_order_cosine=torch.stack(cosines).detach())

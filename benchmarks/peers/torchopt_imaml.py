"""TorchOpt's implicit-differentiation iMAML, called as the installed package.

The pattern of TorchOpt's own iMAML example (examples/iMAML/imaml_omniglot_functional.py):
the inner solver is decorated with torchopt.diff.implicit.custom_root, whose optimality
condition is the gradient of the proximal objective,

    stationary(params, meta_params, data) = grad L_support(params) + lam (params - meta_params),

the inner loop is torchopt.sgd on that objective (same steps and lr as imaml_fast), the loop
runs over the tasks of the meta-batch one at a time, and the meta-gradient is
autograd.grad(mean query loss, meta_params). The example's linear solver is
solve_normal_cg(maxiter=5, atol=0): CG on the normal equations A^T A u = A^T v with
A = H + lam I; the "cg" variant uses solve_cg, plain CG on A u = v (the same Krylov iterates
as imaml_fast's CG on I + H/lam, so the same numbers up to rounding).
TorchOpt's CG stops at ||r|| <= max(rtol ||b||, atol); rtol is passed as Settings.cg_tol.
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import Result, Settings, flat, flat_tasks

INSTALL = "pip install torchopt==0.7.3   (add --no-deps if pip tries to change torch)"
SOLVERS = ("normal_cg", "cg")


def why_not() -> Optional[str]:
    try:
        import torchopt  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"TorchOpt is not available ({type(e).__name__}: {e}): {INSTALL}"
    return None


def build(model: torch.nn.Module, loss_fn, s: Settings, solver: str = "normal_cg"):
    import torchopt
    from torch.func import functional_call, grad

    names = [n for n, _ in model.named_parameters()]
    meta_params = tuple(p for _, p in model.named_parameters())
    buffers = dict(model.named_buffers())
    lam, lr, steps = s.lam, s.inner_lr, s.inner_steps

    def fnet(params, x):
        return functional_call(model, {**buffers, **dict(zip(names, params))}, (x,))

    def objective(params, meta_params, data):
        x, y = data
        reg = 0
        for p1, p2 in zip(params, meta_params):
            reg = reg + 0.5 * lam * torch.sum(torch.square(p1 - p2))
        return loss_fn(fnet(params, x), y) + reg

    if solver == "normal_cg":
        solve = torchopt.linear_solve.solve_normal_cg(maxiter=s.cg_steps, atol=0, rtol=s.cg_tol)
    elif solver == "cg":
        solve = torchopt.linear_solve.solve_cg(maxiter=s.cg_steps, atol=0, rtol=s.cg_tol)
    else:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")

    @torchopt.diff.implicit.custom_root(grad(objective, argnums=0), argnums=1, solve=solve)
    def inner_solver(params, meta_params, data):
        inner_opt = torchopt.sgd(lr=lr)
        state = inner_opt.init(params)
        with torch.enable_grad():
            for _ in range(steps):
                loss = objective(params, meta_params, data)
                grads = torch.autograd.grad(loss, params)
                updates, state = inner_opt.update(grads, state, inplace=True)
                params = torchopt.apply_updates(params, updates, inplace=True)
        return params

    def run(xs, ys, xq, yq) -> Result:
        T = xs.shape[0]
        query_losses, phis = [], []
        for i in range(T):
            init = tuple(p.detach().clone().requires_grad_(True) for p in meta_params)
            optimal = inner_solver(init, meta_params, (xs[i], ys[i]))
            query_losses.append(loss_fn(fnet(optimal, xq[i]), yq[i]))
            phis.append([p.detach() for p in optimal])
        meta_grads = torch.autograd.grad(torch.stack(query_losses).mean(), meta_params)
        return Result(grad=flat(meta_grads), phi=flat_tasks(phis),
                      info={"solver": f"torchopt.linear_solve.solve_{solver}"})

    return run

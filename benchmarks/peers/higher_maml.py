"""Unrolled second-order MAML through `higher`, called as the installed package: the memory
yardstick. For each task, `inner_steps` differentiable SGD steps (higher.innerloop_ctx with
copy_initial_weights=False) on the same proximal objective as iMAML,
L_support + lam/2 ||params - meta_params||^2, then back-propagation of the query loss through
all of them. The graph of every inner step is kept for that backward pass, so memory grows
linearly with the number of inner steps. (Its meta-gradient is the exact derivative of K
unrolled steps, not the implicit one; the two agree only as the inner problem converges.)
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import Result, Settings, flat

INSTALL = "pip install higher==0.2.1"


def why_not() -> Optional[str]:
    try:
        import higher  # noqa: F401
    except Exception as e:
        return f"higher is not available ({type(e).__name__}: {e}): {INSTALL}"
    return None


def build(model: torch.nn.Module, loss_fn, s: Settings):
    import higher

    meta_params = list(model.parameters())
    inner_opt = torch.optim.SGD(meta_params, lr=s.inner_lr)
    lam, steps = s.lam, s.inner_steps

    def run(xs, ys, xq, yq) -> Result:
        T = xs.shape[0]
        total = [torch.zeros_like(p) for p in meta_params]
        for i in range(T):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    reg = 0
                    for p1, p2 in zip(fmodel.parameters(), meta_params):
                        reg = reg + torch.sum(torch.square(p1 - p2))
                    diffopt.step(loss_fn(fmodel(xs[i]), ys[i]) + 0.5 * lam * reg)
                query = loss_fn(fmodel(xq[i]), yq[i]) / T
                for acc, g in zip(total, torch.autograd.grad(query, meta_params)):
                    acc.add_(g)
        return Result(grad=flat(total), info={"quantity": "unrolled second-order MAML"})

    return run

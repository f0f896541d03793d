"""meta_gradient(): inner solve -> query gradient -> implicit CG solve -> meta-gradient.

For every task i of the meta-batch

    phi_i = argmin_phi L_support_i(phi) + lam/2 ||phi - theta||^2
    g_i   = (I + (H_i + cg_damping I) / lam)^-1 grad L_query_i(phi_i)

and the meta-gradient is mean_i g_i. Nothing from the inner loop is back-propagated through,
so memory does not depend on the number of inner steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .backends import resolve_backend
from .batching import choose_strategy, step_counts
from .cg import CG_MAX_ITER, batched_dot, cg_solve
from .config import IMAMLConfig
from .dense import DENSE_MAX_BYTES, dense_bytes, support_hessians
from .functional import FunctionalModel
from .hvp import BatchedHVP, resolve_hvp_mode
from .inner import solve_inner
from .threads import chunk_ranges, map_chunks
from .validation import validate_episode


@dataclass
class MetaGradient:
    """The result of meta_gradient(). Dicts map parameter names to tensors; the *_flat
    tensors are the same numbers in the flat [T, P] / [P] layout (the dicts are views)."""

    grads: Dict[str, torch.Tensor]        # mean over tasks, shaped like each parameter
    task_grads: Dict[str, torch.Tensor]   # [T, ...] per-task implicit meta-gradients
    adapted: Dict[str, torch.Tensor]      # [T, ...] inner solutions phi_i
    cg_iters: torch.Tensor                # [T] Hessian-vector products used by each task's CG
    cg_residual: torch.Tensor             # [T] ||b - A g_i|| at the end of CG
    cg_status: torch.Tensor               # [T] int8, see imaml_fast.cg (CG_CONVERGED, ...)
    cg_clipped: torch.Tensor              # [T] bool: g_i scaled down by config.cg_clip
    inner_loss: torch.Tensor              # [T] support loss at phi_i (without the proximal term)
    # [T] ||grad F_i(phi_i)|| / ||grad F_i(theta)||, F_i = L_i + lam/2 ||phi - theta||^2: how
    # far the inner loop got towards its minimiser (0 solved, 1 no progress, > 1 it moved
    # away). The implicit gradient assumes a solved inner problem; see inner_residual()
    inner_residual: torch.Tensor
    query_loss: torch.Tensor              # [T] query loss at phi_i
    grads_flat: torch.Tensor              # [P]
    task_grads_flat: torch.Tensor         # [T, P]
    adapted_flat: torch.Tensor            # [T, P]
    backend: str = ""                     # the backend that ran
    hvp: str = ""                         # the HVP mode that ran ("dense": Hessians materialised)
    task_batching: object = None          # the task-batching strategy that ran
    evals: Dict[str, int] = field(default_factory=dict)  # batched gradient/HVP/loss counts
    # [T, M, ...] model outputs on the query set at phi_i, from the query gradient's forward
    # pass (what IMAML.predict(adapted, x_query) returns); None from the reference backend
    query_outputs: Optional[torch.Tensor] = None
    # [T] long: the inner steps each task ran (config.inner_steps unless config.inner_tol
    # stopped it earlier)
    inner_steps: Optional[torch.Tensor] = None
    # [T] cosine between each task's meta-gradient and its first-order one (the query
    # gradient at phi_i): 1 where the implicit term only rescales it; see first_order_cosine()
    first_order_cosine: Optional[torch.Tensor] = None
    # how many groups of tasks ran concurrently on CPU worker threads (IMAMLConfig.task_threads;
    # in each chunk, the last chunk's count)
    task_threads: int = 1
    # how many chunks of tasks ran one after another (IMAMLConfig.task_chunk)
    task_chunks: int = 1


def inner_residual(grad_F: torch.Tensor, grad0_norm: Optional[torch.Tensor],
                   dot=batched_dot) -> torch.Tensor:
    """||grad F_i(phi_i)|| / ||grad F_i(theta)|| per task, from grad F at phi [T, P] and the
    norm of the first inner gradient [T] (None when the inner loop took no step: phi = theta,
    and the ratio is 1). 0/0 (a task whose support loss is flat at theta) is 0.

    iMAML-GD on the Omniglot network shows why it is kept: on 20-way 1-shot with the fixed
    step, it climbed from 0.4 to above 1 within 40 meta-steps, and training stalled
    (results/cpu-epyc-2core/inner_convergence/); with inner_solver="gd_armijo" it stayed
    at 0.08-0.24."""
    num = dot(grad_F, grad_F).sqrt()
    if grad0_norm is None:
        return torch.where(num > 0, torch.ones_like(num), torch.zeros_like(num))
    den = grad0_norm.to(num.dtype)
    return torch.where(num > 0, num / den, torch.zeros_like(num))


def first_order_cosine(g: torch.Tensor, gq: torch.Tensor, dot=batched_dot) -> torch.Tensor:
    """cos(g_i, gq_i) per task for the meta-gradients g [T, P] and the query gradients gq at
    phi_i (the first-order meta-gradients); 1 where gq_i = 0 (then g_i = 0: nothing to turn),
    0 where g_i = 0 alone (CG stopped before its first finite iterate).

    What it is for: the implicit term (I + (H + cg_damping I) / lam)^-1 can turn the
    first-order gradient or only shrink it. At the Omniglot presets' settings it only shrinks
    it, by 1 + cg_damping / lam, to cosine 0.997-1.000 (benchmarks/inner_steps_probe.py
    --first-order on trained checkpoints): H is small against cg_damping I where 16-25 inner
    steps end, and Adam ignores a constant scale, so those runs train as first-order ones do.
    Logged per step by `imaml-fast train` (metrics.jsonl), this says whether the Hessian term
    is doing anything in a given run."""
    gg, qq = dot(g, g), dot(gq, gq)
    den = (gg * qq).sqrt()
    return torch.where(den > 0, dot(g, gq) / den,
                       torch.where(qq > 0, torch.zeros_like(den), torch.ones_like(den)))


def clip_to_minimiser_bound(g: torch.Tensor, b: torch.Tensor, margin: float, dot=batched_dot):
    """(g_i scaled down to ||b_i|| / margin where longer, [T] bool of the tasks clipped).
    margin: the smallest eigenvalue the operator A = shift I + scale H has when H + lam I is
    positive semi-definite (phi a minimiser of the proximal problem), shift - scale lam; then
    ||A^-1 b|| <= ||b|| / margin, and CG's iterates, which grow in norm towards A^-1 b, stay
    within it. A non-finite g_i is left as it is (the finite check reports it)."""
    if not margin > 0:
        raise ValueError(f"cg_clip needs an operator shift I + scale H with shift - scale * lam "
                         f"> 0 (here {margin:g}): use cg_damping > 0")
    bound = dot(b, b).sqrt() / margin
    norm = dot(g, g).sqrt()
    clipped = norm > bound
    factor = torch.where(clipped, bound / norm, torch.ones_like(norm))
    return g * factor.to(g.dtype).unsqueeze(-1), clipped


def _support_grad_and_losses(fm, phi, xs, ys, strategy, grad_known: bool):
    """The support gradient at phi (unless grad F there is known) and the support losses."""
    if grad_known:
        return None, fm.losses(phi, xs, ys, strategy)
    return fm.grad_and_losses(phi, xs, ys, strategy)


def implicit_operator(config: IMAMLConfig) -> Tuple[float, float]:
    """(shift, scale) of the implicit system (shift I + scale H) g = grad L_query:
    the paper's I + (H + cg_damping I) / lam."""
    return 1.0 + config.cg_damping / config.lam, 1.0 / config.lam


def _check_operator(operator):
    ok = (isinstance(operator, (tuple, list)) and len(operator) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in operator))
    if not ok or not operator[0] > 0 or not operator[1] >= 0:
        raise ValueError(f"operator={operator!r} is invalid: expected (shift, scale) with "
                         f"shift > 0 and scale >= 0, solving (shift I + scale H) g = grad")
    return float(operator[0]), float(operator[1])


def _use_dense(config: IMAMLConfig, ops) -> bool:
    # "auto" is matrix-free: materialising measured slower on the CPU and on a GPU, for every
    # model size tried (imaml_fast/dense.py)
    return config.cg_dense == "always" and "dense_cg" in ops


def meta_gradient(model: nn.Module, loss_fn: Callable, x_support, y_support, x_query, y_query,
                  config: Optional[IMAMLConfig] = None,
                  params: Optional[Dict[str, torch.Tensor]] = None,
                  operator: Optional[Tuple[float, float]] = None) -> MetaGradient:
    """iMAML meta-gradient for a meta-batch of T tasks.

    x_support [T, N, ...], y_support [T, N, ...], x_query [T, M, ...], y_query [T, M, ...].
    loss_fn(model_output, labels) -> scalar is applied per task (for example F.cross_entropy).
    params: the meta-parameters theta as {name: tensor}; default model.named_parameters().
    operator: (shift, scale) to solve (shift I + scale H) g = grad L_query instead of the
        paper's operator implicit_operator(config) (compatibility layers use this to
        reproduce other implementations' numerics).
    The model's parameters are only read, never changed.
    """
    config = IMAMLConfig() if config is None else config
    if not isinstance(config, IMAMLConfig):
        raise ValueError(f"config must be an IMAMLConfig, got {type(config).__name__}")
    fm = FunctionalModel(model, loss_fn, params, amp=config.amp)
    return meta_gradient_flat(fm, x_support, y_support, x_query, y_query, config,
                              operator=operator)


def meta_gradient_flat(fm: FunctionalModel, xs, ys, xq, yq, config: IMAMLConfig,
                       theta: Optional[torch.Tensor] = None,
                       operator: Optional[Tuple[float, float]] = None,
                       validate_values: bool = True) -> MetaGradient:
    """meta_gradient() on a FunctionalModel, with theta as a flat [P] vector
    (default fm.theta). validate_values=False skips the checks that synchronise with the host
    (finiteness, the probe call of the loss): for CUDA-graph capture (imaml_fast.graphs)."""
    backend = resolve_backend(config.backend, fm.device, fm.dtype)
    with fm.engine_mode(config, backend):
        return _meta_gradient_flat(fm, xs, ys, xq, yq, config, theta, operator, validate_values,
                                   backend)


def _meta_gradient_flat(fm, xs, ys, xq, yq, config, theta, operator, validate_values, backend):
    theta = fm.theta if theta is None else theta
    shift, scale = implicit_operator(config) if operator is None else _check_operator(operator)
    validate_episode(fm, theta, xs, ys, xq, yq, values=validate_values)
    if config.cg_dense == "always" and "dense_cg" not in backend.ops():
        raise ValueError(f"cg_dense='always' but backend={backend.name!r} has no dense CG; "
                         f"use backend 'torch', 'triton', 'cpp' or 'cuda'")
    if config.cg_dense == "always" and config.cg_steps > 0:
        # the Hessians of one chunk exist at once
        in_flight = max(b - a for a, b in chunk_ranges(xs.shape[0], config.task_chunk))
        need = dense_bytes(in_flight, theta.shape[-1], theta.dtype)
        if need > DENSE_MAX_BYTES:
            raise ValueError(f"cg_dense='always' would materialise {need / 2**30:.1f} GiB of "
                             f"Hessians ({in_flight} tasks x {theta.shape[-1]}^2 parameters), "
                             f"more than the {DENSE_MAX_BYTES / 2**30:.0f} GiB the dense path "
                             f"allows: use cg_dense='auto' (matrix-free) or fewer tasks at "
                             f"once (a smaller task_chunk)")
    if not backend.batched:
        from .backends.reference import meta_gradient_reference

        return meta_gradient_reference(fm, theta, xs, ys, xq, yq, config, (shift, scale))
    def group(fm_g, a, b):
        th = theta if theta.dim() == 1 else theta[a:b]
        return _solve_tasks(fm_g, th, xs[a:b], ys[a:b], xq[a:b], yq[a:b], config, backend,
                            shift, scale)

    # chunks one after another (one chunk's working memory at a time), groups within each
    per_chunk, n = map_chunks(group, fm, theta, xs, ys, config, backend, config.task_chunk)
    done = [parts[0] if len(parts) == 1 else _merge(parts) for parts in per_chunk]
    part = done[0] if len(done) == 1 else _merge(done, sequential=True)
    return MetaGradient(
        grads=fm.unflatten(part.grads_flat), task_grads=fm.unflatten(part.task_flat),
        adapted=fm.unflatten(part.phi), cg_iters=part.cg_iters, cg_residual=part.cg_residual,
        cg_status=part.cg_status, cg_clipped=part.cg_clipped, inner_loss=part.inner_loss,
        inner_residual=part.residual, query_loss=part.query_loss,
        grads_flat=part.grads_flat, task_grads_flat=part.task_flat, adapted_flat=part.phi,
        backend=backend.name, hvp=part.hvp_mode, task_batching=part.strategy,
        evals=part.evals, query_outputs=part.query_outputs, inner_steps=part.inner_steps,
        first_order_cosine=part.cosine, task_threads=n, task_chunks=len(done))



@dataclass
class _Part:
    """One group of tasks' share of a MetaGradient (see _solve_tasks)."""

    task_flat: torch.Tensor
    phi: torch.Tensor
    cg_iters: torch.Tensor
    cg_residual: torch.Tensor
    cg_status: torch.Tensor
    cg_clipped: torch.Tensor
    inner_loss: torch.Tensor
    residual: torch.Tensor
    query_loss: torch.Tensor
    query_outputs: Optional[torch.Tensor]
    inner_steps: Optional[torch.Tensor]
    cosine: torch.Tensor
    grads_flat: torch.Tensor
    hvp_mode: str
    strategy: object
    evals: Dict[str, int]


_PER_TASK = ("task_flat", "phi", "cg_iters", "cg_residual", "cg_status", "cg_clipped",
             "inner_loss", "residual", "query_loss", "query_outputs", "inner_steps", "cosine")


def _merge(parts, sequential: bool = False) -> _Part:
    """The groups' parts as one, tasks in order. The mean over all tasks is taken from the
    joined per-task gradients, as in one call; evals are the most any group made (each
    group's batched calls run beside the others'), or their sum for chunks that ran one
    after another (sequential); the strategy the first group's (all groups' when they
    differ)."""
    joined = {}
    for name in _PER_TASK:
        pieces = [getattr(p, name) for p in parts]
        joined[name] = None if any(t is None for t in pieces) else torch.cat(pieces)
    strategies = [p.strategy for p in parts]
    return _Part(**joined, grads_flat=joined["task_flat"].mean(0), hvp_mode=parts[0].hvp_mode,
                 strategy=strategies[0] if len(set(map(str, strategies))) == 1
                 else tuple(strategies),
                 evals={k: (sum if sequential else max)(p.evals[k] for p in parts)
                        for k in parts[0].evals})


def _solve_tasks(fm, theta, xs, ys, xq, yq, config, backend, shift, scale) -> _Part:
    """Inner solve, query gradient, implicit solve and diagnostics for a group of tasks."""
    ops = backend.ops()
    strategy = choose_strategy(config.task_batching, fm, theta, xs, ys, **step_counts(config))
    hvp_mode = resolve_hvp_mode(config.hvp)
    inner = solve_inner(fm, theta, xs, ys, config, strategy, ops)
    with torch.no_grad():
        phi = inner.phi
        gq, query_loss, query_outputs = fm.grad_and_losses(phi, xq, yq, strategy,
                                                           return_outputs=True)
        T = phi.shape[0]
        hvp_calls = 0
        # grad F(phi) for the inner residual: the inner solver's, reduced to the [T] residual
        # at once (no [T, P] kept through the CG solve), else the support gradient the HVP's
        # graph computes anyway (revrev), else one support gradient more
        dot = ops.get("batched_dot", batched_dot)
        residual = None
        if inner.final_grad is not None:
            residual = inner_residual(inner.final_grad, inner.grad0_norm, dot)
            inner.final_grad = None
        known = residual is not None
        support_grad, extra_grad = None, int(not known)
        if config.cg_steps == 0:
            # First-order approximation: (I + H/lam)^-1 replaced by I.
            task_flat = gq
            support_grad, inner_loss = _support_grad_and_losses(fm, phi, xs, ys, strategy, known)
            cg_iters = torch.zeros(T, dtype=torch.long, device=phi.device)
            cg_residual = batched_dot(gq, gq).sqrt()
            cg_status = torch.full((T,), CG_MAX_ITER, dtype=torch.int8, device=phi.device)
        elif _use_dense(config, ops):
            H = support_hessians(fm, phi, xs, ys, strategy)
            support_grad, inner_loss = _support_grad_and_losses(fm, phi, xs, ys, strategy, known)
            task_flat, cg_iters, cg_residual, cg_status = ops["dense_cg"](
                H, gq, shift, scale, config.cg_steps, config.cg_tol)
            hvp_mode = "dense"
        else:
            hvp = BatchedHVP(fm, phi, xs, ys, hvp_mode, strategy, need_grad=not known)
            inner_loss, support_grad = hvp.losses, hvp.grad
            extra_grad = int(not known and hvp.mode != "revrev")
            # (shift I + scale H) v in place on the product's fresh buffer: one pass over
            # [T, P] instead of three allocations
            sol = cg_solve(lambda v: hvp(v).mul_(scale).add_(v, alpha=shift), gq,
                           max_iter=config.cg_steps, tol=config.cg_tol, update=ops["cg_update"])
            hvp_calls = hvp.calls
            hvp.release()
            task_flat, cg_iters, cg_residual, cg_status = sol.x, sol.iters, sol.residual, sol.status
        if config.cg_clip and config.cg_steps > 0:
            task_flat, cg_clipped = clip_to_minimiser_bound(task_flat, gq,
                                                            shift - scale * config.lam, dot)
        else:
            cg_clipped = torch.zeros(T, dtype=torch.bool, device=phi.device)
        if residual is None:
            grad_F = support_grad.to(phi.dtype) + config.lam * (phi - theta)
            residual = inner_residual(grad_F, inner.grad0_norm, dot)
        cosine = first_order_cosine(task_flat, gq, dot)
        grads_flat = task_flat.mean(0)
    return _Part(task_flat=task_flat, phi=phi, cg_iters=cg_iters, cg_residual=cg_residual,
                 cg_status=cg_status, cg_clipped=cg_clipped, inner_loss=inner_loss,
                 residual=residual, query_loss=query_loss, query_outputs=query_outputs,
                 inner_steps=inner.steps_taken, cosine=cosine, grads_flat=grads_flat,
                 hvp_mode=hvp_mode, strategy=strategy,
                 evals={"grad": inner.grad_evals + 1 + extra_grad,
                        "hvp": inner.hvp_evals + hvp_calls, "loss": inner.loss_evals})

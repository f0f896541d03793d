"""IMAML: the meta-training object users hold.

    learner = IMAML(model, F.cross_entropy, IMAMLConfig(), torch.optim.Adam(model.parameters(), 1e-3))
    stats = learner.meta_step(x_support, y_support, x_query, y_query)

meta_step computes the meta-gradient for the whole meta-batch, checks it, and only then
writes .grad and steps the optimizer: a step that fails (bad input, non-finite meta-gradient)
leaves the parameters and the optimizer state exactly as they were.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .cg import CG_NONFINITE, CG_STATUS_NAMES
from .config import IMAMLConfig
from .functional import FunctionalModel
from .graphs import CaptureFailed, CapturedMetaGradient, config_why_not, graphs_why_not
from .implicit import MetaGradient, meta_gradient_flat


@dataclass
class MetaStepStats:
    """Per-step statistics as device tensors; .to_dict() copies them to the host (one sync)."""

    result: MetaGradient

    def to_dict(self) -> dict:
        r = self.result
        status = r.cg_status.cpu().tolist()
        return {
            "inner_loss": r.inner_loss.mean().item(),
            "inner_residual": r.inner_residual.mean().item(),
            "inner_steps": r.inner_steps.float().mean().item(),
            "first_order_cosine": r.first_order_cosine.float().mean().item(),
            "query_loss": r.query_loss.mean().item(),
            "cg_iters": r.cg_iters.float().mean().item(),
            "cg_residual": r.cg_residual.max().item(),
            "cg_status": {name: status.count(code) for code, name in CG_STATUS_NAMES.items()},
            "cg_clipped": int(r.cg_clipped.sum().item()),
            "grad_norm": r.grads_flat.norm().item(),
            "backend": r.backend, "hvp": r.hvp, "task_batching": r.task_batching,
            "task_threads": r.task_threads, "task_chunks": r.task_chunks,
        }


class IMAML:
    """iMAML meta-learner around a model, a per-task loss and an outer optimizer.

    model: an nn.Module (BatchNorm with track_running_stats=False); its parameters are theta.
        A torch.compile'd model works too: the engine runs the module under it (see
        functional.unwrap_compiled), the user's own calls stay compiled.
    loss_fn(output, labels) -> scalar, applied per task.
    outer_optimizer: any torch.optim optimizer over model.parameters() (None: only
        meta_gradient/accumulate/adapt/predict are used).
    distributed: each rank of the initialised torch.distributed group passes its own share
        of the meta-batch to meta_step/accumulate; the meta-gradient is the mean over all
        ranks' tasks (imaml_fast.distributed). Every rank must call with the same parameters.
    cuda_graphs: capture the whole meta-gradient as a CUDA graph per input signature and
        replay it (imaml_fast.graphs). With check_finite=False a meta-step then makes no host
        synchronisation at all. "auto" (the default): on for a CUDA model (unless
        backend="reference" or inner_tol > 0), for up to AUTO_MAX_GRAPHS input signatures (further ones run
        uncaptured), and if a capture fails this learner warns once and runs uncaptured from
        then on; off elsewhere. True: on, and a CPU model or a failed capture is an error.
        False: off.
    """

    AUTO_MAX_GRAPHS = 8

    def __init__(self, model: nn.Module, loss_fn: Callable, config: Optional[IMAMLConfig] = None,
                 outer_optimizer: Optional[torch.optim.Optimizer] = None,
                 distributed: bool = False, process_group=None, cuda_graphs="auto"):
        self.model = model
        self.loss_fn = loss_fn
        self.config = IMAMLConfig() if config is None else config
        if not isinstance(self.config, IMAMLConfig):
            raise ValueError(f"config must be an IMAMLConfig, got {type(self.config).__name__}")
        self.outer_optimizer = outer_optimizer
        # validates BatchNorm, builds the layout
        self._fm = FunctionalModel(model, loss_fn, amp=self.config.amp)
        self.distributed = distributed
        self.process_group = process_group
        self._graphed = None
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs={cuda_graphs!r} is invalid: use 'auto', True or False")
        self._graphs_auto = cuda_graphs == "auto"
        if cuda_graphs is True:
            self._graphed = CapturedMetaGradient(self._fm, self.config)
        elif (self._graphs_auto and not config_why_not(self.config)
              and not graphs_why_not(self._fm.device)):
            self._graphed = CapturedMetaGradient(self._fm, self.config,
                                                 max_graphs=self.AUTO_MAX_GRAPHS)
        if distributed:
            from . import distributed as dist_mod

            if not dist_mod.enabled(process_group):
                raise ValueError("distributed=True needs an initialised torch.distributed process "
                                 "group: call torch.distributed.init_process_group first (or "
                                 "launch with torchrun / imaml-fast train --nproc N)")

    @property
    def cuda_graphs(self) -> bool:
        """Whether meta-gradients are captured and replayed as CUDA graphs (see __init__)."""
        return self._graphed is not None

    def _theta(self) -> torch.Tensor:
        params = dict(self._fm.model.named_parameters())
        return self._fm.flatten_params(params)

    def meta_gradient(self, x_support, y_support, x_query, y_query) -> MetaGradient:
        """The meta-gradient at the model's current parameters; changes nothing."""
        if self._graphed is not None:
            try:
                return self._graphed(self._theta(), x_support, y_support, x_query, y_query)
            except CaptureFailed as e:
                if not self._graphs_auto:
                    raise
                warnings.warn(f"{e}; this IMAML learner runs its meta-steps uncaptured from "
                              f"now on (pass cuda_graphs=False to skip the attempt)",
                              RuntimeWarning, stacklevel=2)
                self._graphed = None
        return meta_gradient_flat(self._fm, x_support, y_support, x_query, y_query,
                                  self.config, theta=self._theta())

    def _checked(self, x_support, y_support, x_query, y_query) -> MetaGradient:
        result = self.meta_gradient(x_support, y_support, x_query, y_query)
        bad = torch.zeros(result.cg_status.shape[0], dtype=torch.bool, device=result.cg_status.device)
        if self.config.check_finite:
            # A task whose adaptation or solve went non-finite must not be averaged in (CG
            # reports it as CG_NONFINITE with a zero solution).
            bad = (~torch.isfinite(result.task_grads_flat).all(1)
                   | ~torch.isfinite(result.adapted_flat).all(1)
                   | ~torch.isfinite(result.query_loss) | (result.cg_status == CG_NONFINITE))
        if self.distributed:
            from .distributed import reduce_meta_gradient

            mean, n_bad = reduce_meta_gradient(result.task_grads_flat, bad, self.process_group)
            result.grads_flat = mean
            result.grads = self._fm.unflatten(mean)
        else:
            n_bad = int(bad.sum()) if self.config.check_finite else 0  # one host sync
        if n_bad:
            where = bad.nonzero().flatten().tolist()
            raise FloatingPointError(
                f"the meta-gradient is not finite for {n_bad} task(s) (here: {where}): the inner "
                f"loop diverged or the losses overflowed; lower inner_lr or raise lam. "
                f"Parameters and optimizer state are unchanged.")
        return result

    def accumulate(self, x_support, y_support, x_query, y_query) -> MetaStepStats:
        """Add the meta-gradient into each parameter's .grad, as loss.backward() would."""
        result = self._checked(x_support, y_support, x_query, y_query)
        params = dict(self._fm.model.named_parameters())
        for name, g in result.grads.items():
            p = params[name]
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)
        return MetaStepStats(result)

    def meta_step(self, x_support, y_support, x_query, y_query) -> MetaStepStats:
        """Compute the meta-gradient, set it as .grad and step the outer optimizer."""
        if self.outer_optimizer is None:
            raise ValueError("meta_step needs an outer optimizer: IMAML(model, loss_fn, config, "
                             "torch.optim.Adam(model.parameters(), lr=1e-3))")
        result = self._checked(x_support, y_support, x_query, y_query)
        params = dict(self._fm.model.named_parameters())
        for name, g in result.grads.items():
            params[name].grad = g.detach().clone()
        self.outer_optimizer.step()
        return MetaStepStats(result)

    def adapt(self, x_support, y_support) -> Dict[str, torch.Tensor]:
        """Inner solutions phi_i for T tasks, as {name: [T, ...]} (nothing is stepped)."""
        from .backends import resolve_backend
        from .batching import choose_strategy, step_counts
        from .inner import solve_inner
        from .threads import map_chunks
        from .validation import validate_episode

        theta = self._theta()
        c = self.config
        with self._fm.engine_mode(c):  # the input check's probe call too, as in a meta-step
            validate_episode(self._fm, theta, x_support, y_support, x_support, y_support)
        backend = resolve_backend(c.backend, self._fm.device, self._fm.dtype)
        ops = backend.ops() if backend.batched else None
        def group(fm, a, b):  # tasks [a, b), on a worker thread when groups run
            xs, ys = x_support[a:b], y_support[a:b]
            strategy = choose_strategy(c.task_batching, fm, theta, xs, ys,
                                       **step_counts(c, inner_only=True))
            return solve_inner(fm, theta, xs, ys, c, strategy, ops).phi

        chunk = c.task_chunk if backend.batched else None  # the reference: one at a time
        with self._fm.engine_mode(c, backend):
            per_chunk, _ = map_chunks(group, self._fm, theta, x_support, y_support, c, backend,
                                      chunk)
        phis = [phi for parts in per_chunk for phi in parts]
        return self._fm.unflatten(phis[0] if len(phis) == 1 else torch.cat(phis))

    def predict(self, adapted: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs [T, M, ...] of each task's adapted parameters on x [T, M, ...]."""
        flat = self._fm.flatten(adapted)
        if x.shape[0] != flat.shape[0]:
            raise ValueError(f"x has T={x.shape[0]} tasks but adapted has T={flat.shape[0]}")
        with torch.no_grad(), self._fm.engine_mode(self.config):  # as in a meta-step
            return self._fm.outputs(flat, x, "vmap")

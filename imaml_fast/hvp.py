"""Batched Hessian-vector products of the per-task support losses, for [T, P] vectors.

Two ways, same numbers:

- "revrev": the support gradient is computed once with create_graph=True, and every product
  H v is one more backward pass through that graph (retain_graph=True). The forward pass and
  the first backward pass are paid once per solve, however many CG iterations follow.
- "fwdrev": H v = jvp(grad L)(phi; v), forward-mode over reverse-mode. Nothing is kept
  between products, so every product repeats the forward and backward pass with tangents.

On the CPU with the paper's Omniglot network (T = 32, 5-way 1-shot, 16 inner steps, 5 CG
steps) a meta-step takes 1.14-1.17 s with revrev and 1.38-1.42 s with fwdrev (two threads, each in its
own process, benchmarks/bench_meta_step.py), so "auto" resolves to revrev. revrev's graph is
built with imaml_fast.layers (convolution and BatchNorm with written-out second derivatives)
unless the config says layer_derivatives="autograd"; fwdrev always runs ATen's layers.
"""
from __future__ import annotations

import torch
from torch.func import grad as func_grad, jvp

from .functional import FunctionalModel


def resolve_hvp_mode(mode: str) -> str:
    return "revrev" if mode == "auto" else mode


class BatchedHVP:
    """v [T, P] -> H v [T, P], with H_i the Hessian of task i's support loss at phi_i.

    Also holds the per-task support losses at phi (`losses`, [T]) and, where it was asked
    for or comes for free, the support gradients (`grad`, [T, P]).
    """

    def __init__(self, fm: FunctionalModel, phi: torch.Tensor, x, y, mode: str = "auto",
                 strategy="vmap", need_grad: bool = False):
        self.mode = resolve_hvp_mode(mode)
        self.fm, self.x, self.y, self.strategy = fm, x, y, strategy
        self.phi = phi.detach().contiguous()  # forward-mode AD refuses stride-0 (expanded) primals
        self.calls = 0
        if self.mode == "revrev":
            self._g, self._leaves, self.losses = fm.grad_pieces(phi, x, y, strategy,
                                                                create_graph=True)
            self._sizes = [span[0].shape[0] for span in self._leaves]
            self._flat_leaves = [t for span in self._leaves for t in span]
            self.grad = torch.cat([g.detach() for g in self._g])
        elif self.mode == "fwdrev":
            if need_grad:
                self.grad, self.losses = fm.grad_and_losses(phi, x, y, strategy)
            else:
                self.grad = None
                with torch.no_grad():
                    self.losses = fm.losses(self.phi, x, y, strategy)
            # per-parameter primals, as for revrev (see FunctionalModel.leaves)
            self._gradfn = func_grad(
                lambda ps: fm.run_batched("loss_params", ps, (x, y), strategy).sum())
        else:
            raise ValueError(f"hvp={mode!r} is invalid: allowed values are 'auto', 'fwdrev', 'revrev'")

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.mode == "revrev":
            # Every span runs the same function, so either all or none of the gradients
            # depend on the parameters; none means a loss linear in them: H = 0.
            if not self._g[0].requires_grad:
                return torch.zeros_like(v)
            with torch.enable_grad():
                hv = torch.autograd.grad(self._g, self._flat_leaves, torch.split(v, self._sizes),
                                         retain_graph=True, allow_unused=True,
                                         materialize_grads=True)
            hv = self.fm.join_spans(hv, self._leaves)
            return hv[0] if len(hv) == 1 else torch.cat(hv)
        with torch.enable_grad(), self.fm.layer_derivatives("autograd"):
            hv = jvp(self._gradfn, (self.fm.split(self.phi),),
                     (self.fm.split(v.to(self.phi.dtype).contiguous()),))[1]
            return self.fm.join(hv, (v.shape[0],))

    def release(self) -> None:
        """Drop the retained graph (revrev) as soon as the solve is done."""
        self._g = self._leaves = self._flat_leaves = None

"""A model as a pure function of flat parameters: the [T, P] layout every solver works on.

All tasks' parameters live in one flat buffer [T, P] (P = number of model parameters); the
model's named parameters are views into it. Every vector operation of the solvers (inner
updates, CG updates, dot products) is then one op over all tasks, whatever the number of
parameter tensors, and the kernels of later backends see one contiguous buffer.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, vmap


def check_batchnorm(model: nn.Module) -> None:
    """BatchNorm must use batch statistics: running statistics would leak between tasks and
    make the inner problem depend on the order tasks were seen."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
            raise ValueError(
                f"{type(mod).__name__} '{name}' tracks running statistics, which iMAML cannot "
                f"batch over tasks (each task must normalise with its own batch statistics, as "
                f"in the paper's networks). Build it with track_running_stats=False, e.g. "
                f"nn.{type(mod).__name__}({mod.num_features}, track_running_stats=False)."
            )


class FunctionalModel:
    """Wraps `model` and `loss_fn` as functions of a flat parameter vector.

    loss_fn(output, target) -> scalar is called once per task on that task's [N, ...] tensors,
    exactly as it would be in a per-task training loop (for example F.cross_entropy).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, params: Dict[str, torch.Tensor] = None,
                 amp: str = "none"):
        check_batchnorm(model)
        self.model = model
        self.loss_fn = loss_fn
        if params is None:
            params = dict(model.named_parameters())
        if not params:
            raise ValueError("the model has no parameters to meta-learn")
        self.names: List[str] = list(params)
        self.shapes: List[torch.Size] = [params[n].shape for n in self.names]
        self.numels: List[int] = [math.prod(s) for s in self.shapes]
        self.offsets: List[int] = [0]
        for k in self.numels:
            self.offsets.append(self.offsets[-1] + k)
        self.num_params = self.offsets[-1]
        first = params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        for n in self.names:
            p = params[n]
            if p.dtype != self.dtype or p.device != self.device:
                raise ValueError(
                    f"parameter '{n}' is {p.dtype} on {p.device} but '{self.names[0]}' is "
                    f"{self.dtype} on {self.device}: all parameters must share dtype and device"
                )
        self.theta = self.flatten_params(params)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        # Buffers (none for batch-statistics BatchNorm) are passed unchanged to every task.
        self.buffers = dict(model.named_buffers())

    # ---- flat layout -------------------------------------------------------------------
    def flatten_params(self, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Dict of parameter-shaped tensors -> flat [P] (detached copy)."""
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def flatten(self, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Dict of [T, *shape] tensors -> [T, P]."""
        T = tensors[self.names[0]].shape[0]
        return torch.cat([tensors[n].reshape(T, -1) for n in self.names], dim=1)

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """[..., P] -> dict of [..., *shape] views (no copy)."""
        lead = flat.shape[:-1]
        return {
            n: flat[..., o : o + k].view(*lead, *s)
            for n, s, k, o in zip(self.names, self.shapes, self.numels, self.offsets)
        }

    # ---- forward passes ------------------------------------------------------------------
    def forward_one(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model output for one task's parameters [P] on x [N, ...]."""
        params = self.unflatten(flat)
        if self.buffers:
            params = {**self.buffers, **params}
        if self.amp_dtype is None:
            return functional_call(self.model, params, (x,))
        # Mixed precision: the model's matmuls and convolutions in bf16/fp16, the output
        # returned in the parameters' dtype so that the loss (and everything after it:
        # gradients, inner updates, CG) stays in full precision.
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
            out = functional_call(self.model, params, (x,))
        return out.to(self.dtype)

    def loss_one(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.forward_one(flat, x), y)

    @staticmethod
    def spans(T: int, strategy) -> List[Tuple[int, int]]:
        """The task ranges one call handles: all T for "vmap", one task for "loop", chunks
        of k tasks for an int k."""
        if strategy == "vmap":
            return [(0, T)]
        c = 1 if strategy == "loop" else int(strategy)
        return [(i, min(i + c, T)) for i in range(0, T, c)]

    def _apply(self, fn_name: str, flat: torch.Tensor, args: Sequence[torch.Tensor], loop: bool):
        fn = getattr(self, fn_name)
        if loop:  # a plain functional call, no vmap
            return fn(flat[0], *(a[0] for a in args)).unsqueeze(0)
        return vmap(fn)(flat, *args)

    def run_batched(self, fn_name: str, flat: torch.Tensor, args: Sequence[torch.Tensor],
                    strategy) -> torch.Tensor:
        """Apply forward_one / loss_one to every task of flat [T, P] with the given strategy:
        "vmap" (all tasks in one vmap), "loop" (one call per task) or an int chunk size."""
        loop = strategy == "loop"
        out = [self._apply(fn_name, flat[a:b], [t[a:b] for t in args], loop)
               for a, b in self.spans(flat.shape[0], strategy)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def losses(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, strategy="vmap"):
        """Per-task losses [T] for flat [T, P], x [T, N, ...], y [T, N, ...]."""
        return self.run_batched("loss_one", flat, (x, y), strategy)

    def outputs(self, flat: torch.Tensor, x: torch.Tensor, strategy="vmap"):
        """Per-task model outputs [T, N, ...]."""
        return self.run_batched("forward_one", flat, (x,), strategy)

    def grad_pieces(self, flat: torch.Tensor, x, y, strategy="vmap", create_graph=False):
        """Per-task gradients of the per-task losses, one piece per span of tasks.

        Each span gets its own leaf: tasks are independent, so the gradient of the summed
        loss with respect to a span's leaf is exactly the stack of that span's per-task
        gradients. (One [T, P] leaf sliced per span would make every span's backward write a
        full [T, P] gradient: O(T^2 P) work for a loop over tasks.)
        Returns (grads, leaves, losses [T]) with grads and leaves as lists over spans."""
        with torch.enable_grad():
            loop = strategy == "loop"
            leaves, losses = [], []
            for a, b in self.spans(flat.shape[0], strategy):
                leaf = flat[a:b].detach().requires_grad_(True)
                leaves.append(leaf)
                losses.append(self._apply("loss_one", leaf, (x[a:b], y[a:b]), loop))
            losses = torch.cat(losses)
            grads = torch.autograd.grad(losses.sum(), leaves, create_graph=create_graph,
                                        allow_unused=True, materialize_grads=True)
        return list(grads), leaves, losses.detach()

    def grad_and_losses(self, flat: torch.Tensor, x, y, strategy="vmap"):
        """Per-task gradients [T, P] and losses [T] (no graph kept)."""
        grads, _, losses = self.grad_pieces(flat, x, y, strategy)
        return (grads[0] if len(grads) == 1 else torch.cat(grads)), losses

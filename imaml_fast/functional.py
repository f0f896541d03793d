"""A model as a pure function of flat parameters: the [T, P] layout every solver works on.

All tasks' parameters live in one flat buffer [T, P] (P = number of model parameters); the
model's named parameters are views into it. Every vector operation of the solvers (inner
updates, CG updates, dot products) is then one op over all tasks, whatever the number of
parameter tensors, and the kernels of later backends see one contiguous buffer.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, vmap

from .layers import closed_form_layers
from . import stacked as _stacked
from .precision import tf32_mode


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


COMPILED_PREFIX = "_orig_mod."


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module under torch.compile(model), or model itself.

    torch.compile returns an OptimizedModule that holds the original module (same parameter
    tensors, names prefixed with "_orig_mod."). The engine runs the original module: its
    Hessian-vector products differentiate the gradient again, and torch.compile's graphs do
    not support double backward. The user's own calls of the compiled module stay compiled,
    and both see the same parameters, so a meta-step through either is the same step."""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        return unwrap_compiled(orig)
    return model


def strip_compiled_names(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """{"_orig_mod.x": t} (named_parameters of a compiled module) -> {"x": t}."""
    out = {}
    for n, t in params.items():
        while n.startswith(COMPILED_PREFIX):
            n = n[len(COMPILED_PREFIX):]
        out[n] = t
    return out


class FunctionalModel:
    """Wraps `model` and `loss_fn` as functions of a flat parameter vector.

    loss_fn(output, target) -> scalar is called once per task on that task's [N, ...] tensors,
    exactly as it would be in a per-task training loop (for example F.cross_entropy).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, params: Dict[str, torch.Tensor] = None,
                 amp: str = "none"):
        model = unwrap_compiled(model)
        check_batchnorm(model)
        self.model = model
        self.loss_fn = loss_fn
        if params is None:
            params = dict(model.named_parameters())
        params = strip_compiled_names(params)
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
        # Layers with closed-form second derivatives (imaml_fast.layers) unless a caller
        # asks for ATen's own (layer_derivatives("autograd")).
        self.closed_form = True
        self.bn_kernel = None  # a backend's fused BatchNorm double backward, see layer_derivatives
        self.conv_kernel = None  # a backend's convolution input gradient, see layer_derivatives
        self.plain_convs = False  # "plain" layer derivatives: only the convolutions routed
        self.bn_relu_ops = None  # a backend's (bn_relu_forward, bn_relu_backward), see below
        # A plain stack of known layers runs hand-batched over tasks instead of under vmap
        # (imaml_fast.stacked); None where the model is not one. layer_batching: "auto" uses
        # it where there is one, "vmap" never (IMAMLConfig.layer_batching, set by engine_mode).
        self.stacked = _stacked.plan(model, self.names, self.buffers)
        self.layer_batching = "auto"

    @contextmanager
    def layer_derivatives(self, mode: str, backend=None):
        """Within this block, graphs that will be differentiated twice are built with
        imaml_fast.layers ("closed_form") or ATen's own layers ("autograd": the sequential
        reference path, and forward-mode products, which imaml_fast.layers does not define).
        "plain" (the engine's own choice for gradients taken once): ATen's layers, except
        that convolutions run imaml_fast.layers' conv when the backend has a
        conv_input_grad kernel, for their input gradients.
        backend: the engine's backend (imaml_fast.backends.Backend); its batched ops'
        "bn_double_backward", if any, runs BatchNorm's second derivative in products, and
        "conv_input_grad", if any, the convolutions' input gradients; "bn_relu_forward" and
        "bn_relu_backward", if any, run a BatchNorm followed by a ReLU as one layer in "plain"
        gradients of the hand-batched layers (imaml_fast.stacked)."""
        if mode not in ("closed_form", "autograd", "plain"):
            raise ValueError(f"layer derivatives {mode!r} is invalid: allowed values are "
                             f"'closed_form', 'autograd' (and 'plain', the engine's own choice "
                             f"for gradients taken once)")
        before = (self.closed_form, self.plain_convs, self.bn_kernel, self.conv_kernel,
                  self.bn_relu_ops)
        self.closed_form = mode == "closed_form"
        self.plain_convs = mode == "plain"
        if backend is not None:
            ops = backend.ops() if backend.batched else {}
            self.bn_kernel = ops.get("bn_double_backward")
            self.conv_kernel = ops.get("conv_input_grad")
            pair = (ops.get("bn_relu_forward"), ops.get("bn_relu_backward"))
            self.bn_relu_ops = pair if None not in pair else None
        try:
            yield
        finally:
            (self.closed_form, self.plain_convs, self.bn_kernel, self.conv_kernel,
             self.bn_relu_ops) = before

    def layer_mode(self):
        """The TorchFunctionMode (or a null context) a forward pass runs under, per
        layer_derivatives. Under amp, plain gradients keep ATen's layers: the kernel takes
        float32/float64 only, and closed_form_layers would cast the convolutions to the amp
        dtype inside vmap, where autocast itself does not reach (see imaml_fast.stacked)."""
        if self.closed_form:
            return closed_form_layers(self.bn_kernel, self.conv_kernel)
        if self.plain_convs and self.conv_kernel is not None and self.amp_dtype is None:
            return closed_form_layers(conv_kernel=self.conv_kernel, batch_norm=False)
        return nullcontext()

    def fused_bn_relu(self):
        """The (bn_relu_forward, bn_relu_backward) ops the hand-batched layers run a BatchNorm
        followed by a ReLU with, or None: only for "plain" gradients (taken once: the fused
        layer has no second derivative), not under amp, and only where the backend has them."""
        if self.plain_convs and self.amp_dtype is None:
            return self.bn_relu_ops
        return None

    @contextmanager
    def engine_mode(self, config, backend=None):
        """Within this block the model runs as the engine runs it for `config` (an
        IMAMLConfig): its layer derivatives (see layer_derivatives) and TF32 per config.tf32
        (imaml_fast.precision). Every entry point that adapts or differentiates uses it."""
        before = self.layer_batching
        self.layer_batching = config.layer_batching
        try:
            with self.layer_derivatives(config.layer_derivatives, backend), tf32_mode(config.tf32):
                yield
        finally:
            self.layer_batching = before

    def hand_batched(self, x: torch.Tensor) -> bool:
        """Whether a batched call on inputs x [t, N, ...] runs the hand-batched layers
        (imaml_fast.stacked) rather than vmap. Not under amp: see imaml_fast.stacked."""
        return (self.stacked is not None and self.layer_batching == "auto"
                and self.amp_dtype is None and self.stacked.accepts(x))

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
        return dict(zip(self.names, self.split(flat)))

    # ---- forward passes ------------------------------------------------------------------
    def split(self, flat: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """[..., P] -> tuple of [..., *shape] views, in parameter order (no copy). One
        split_with_sizes call, not one slice per parameter: every pass makes a split."""
        return self._parts(flat, torch.split)

    def _parts(self, flat: torch.Tensor, split_fn) -> Tuple[torch.Tensor, ...]:
        """flat [..., P] cut by split_fn(flat, numels, dim=-1) (torch.split: views;
        torch.split_with_sizes_copy: contiguous copies), each part viewed as [..., *shape]."""
        if flat.shape[-1] != self.num_params:
            raise ValueError(f"expected [..., {self.num_params}] (the model's parameter count), "
                             f"got {tuple(flat.shape)}")
        lead = flat.shape[:-1]
        return tuple(t.view(*lead, *s)
                     for t, s in zip(split_fn(flat, self.numels, dim=-1), self.shapes))

    def join(self, pieces: Sequence[torch.Tensor], lead: Tuple[int, ...] = ()) -> torch.Tensor:
        """Per-parameter tensors [*lead, *shape] -> flat [*lead, P]: the inverse of split,
        one copy. lead: the leading dimensions, () for one task's [P]."""
        return torch.cat([t.reshape(*lead, -1) for t in pieces], dim=-1)

    def leaves(self, flat: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """One autograd leaf per parameter tensor: a contiguous copy of its part of flat.

        Gradients are taken with respect to these, never with respect to a flat leaf sliced
        into views: the backward of each slice writes a zero-filled tensor the size of the
        whole flat buffer and adds it up, which for the paper's Omniglot network (18
        parameter tensors, T = 32) made a quarter of a meta-step zero-filling memory.
        Copies, not views of flat: a [t, P] buffer's per-parameter views are strided, and
        every layer would copy its weights out of them anyway (a convolution's weight, a
        BatchNorm's reshape(-1)), one operation each per pass; one split_with_sizes_copy
        makes all of them at once."""
        return tuple(t.requires_grad_(True)
                     for t in self._parts(flat.detach(), torch.split_with_sizes_copy))

    def forward_params(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Model output for one task's parameters (a tuple in parameter order) on x [N, ...]."""
        params = dict(zip(self.names, params))
        if self.buffers:
            params = {**self.buffers, **params}
        with self.layer_mode():
            if self.amp_dtype is None:
                return functional_call(self.model, params, (x,))
            # Mixed precision: the model's matmuls and convolutions in bf16/fp16, the output
            # returned in the parameters' dtype so that the loss (and everything after it:
            # gradients, inner updates, CG) stays in full precision.
            with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
                out = functional_call(self.model, params, (x,))
            return out.to(self.dtype)

    def loss_params(self, params: Sequence[torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.forward_params(params, x), y)

    def loss_and_output_params(self, params: Sequence[torch.Tensor], x: torch.Tensor,
                               y: torch.Tensor):
        """(loss, detached model output) for one task's parameters."""
        out = self.forward_params(params, x)
        return self.loss_fn(out, y), out.detach()

    def loss_one(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_params(self.split(flat), x, y)

    @staticmethod
    def spans(T: int, strategy) -> List[Tuple[int, int]]:
        """The task ranges one call handles: all T for "vmap", one task for "loop", chunks
        of k tasks for an int k."""
        if strategy == "vmap":
            return [(0, T)]
        c = 1 if strategy == "loop" else int(strategy)
        return [(i, min(i + c, T)) for i in range(0, T, c)]

    def _apply(self, fn_name: str, params: Tuple[torch.Tensor, ...], args: Sequence[torch.Tensor],
               loop: bool):
        """fn(params, *args) for a span of tasks: params are per-parameter [t, *shape]."""
        fn = getattr(self, fn_name)
        if loop:  # a plain functional call, no vmap
            out = fn(tuple(p[0] for p in params), *(a[0] for a in args))
            return (tuple(o.unsqueeze(0) for o in out) if isinstance(out, tuple)
                    else out.unsqueeze(0))
        if self.hand_batched(args[0]):
            return _stacked.run(self, fn_name, params, args)
        return vmap(fn)(params, *args)

    def run_batched(self, fn_name: str, params: Tuple[torch.Tensor, ...],
                    args: Sequence[torch.Tensor], strategy) -> torch.Tensor:
        """Apply forward_params / loss_params to every task, params per-parameter [T, *shape],
        with the given strategy: "vmap" (all tasks in one vmap), "loop" (one call per task) or
        an int chunk size."""
        loop = strategy == "loop"
        out = [self._apply(fn_name, tuple(p[a:b] for p in params), [t[a:b] for t in args], loop)
               for a, b in self.spans(params[0].shape[0], strategy)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def losses(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, strategy="vmap"):
        """Per-task losses [T] for flat [T, P], x [T, N, ...], y [T, N, ...]."""
        return self.run_batched("loss_params", self.split(flat), (x, y), strategy)

    def outputs(self, flat: torch.Tensor, x: torch.Tensor, strategy="vmap"):
        """Per-task model outputs [T, N, ...]."""
        return self.run_batched("forward_params", self.split(flat), (x,), strategy)

    def grad_pieces(self, flat: torch.Tensor, x, y, strategy="vmap", create_graph=False,
                    return_outputs=False):
        """Per-task gradients of the per-task losses, one piece per span of tasks.

        Each span gets its own leaves (one per parameter tensor, see `leaves`): tasks are
        independent, so the gradient of the summed loss with respect to a span's leaves is
        exactly the stack of that span's per-task gradients. (One [T, P] leaf sliced per span
        would make every span's backward write a full [T, P] gradient: O(T^2 P) work for a
        loop over tasks.)
        Returns (grads, leaves, losses [T]): grads a list over spans of flat [t, P] (joined
        inside the graph when create_graph), leaves a list over spans of per-parameter
        tuples; with return_outputs, also the model outputs [T, ...] (detached) of the same
        forward pass."""
        # imaml_fast.layers only pays when the gradient is differentiated again (its
        # Functions' first backward costs a little more Python than ATen's), or where the
        # backend has a faster convolution input gradient ("plain").
        plain = (nullcontext() if create_graph
                 else self.layer_derivatives("plain" if self.closed_form else "autograd"))
        with torch.enable_grad(), plain:
            loop = strategy == "loop"
            leaves, losses, outputs = [], [], []
            fn = "loss_and_output_params" if return_outputs else "loss_params"
            for a, b in self.spans(flat.shape[0], strategy):
                span = self.leaves(flat[a:b])
                leaves.append(span)
                res = self._apply(fn, span, (x[a:b], y[a:b]), loop)
                if return_outputs:
                    res, out = res
                    outputs.append(out)
                losses.append(res)
            losses = torch.cat(losses)
            pieces = torch.autograd.grad(losses.sum(), [t for s in leaves for t in s],
                                         create_graph=create_graph, allow_unused=True,
                                         materialize_grads=True)
            grads = self.join_spans(pieces, leaves)  # inside the graph when create_graph
        if return_outputs:
            return grads, leaves, losses.detach(), torch.cat(outputs)
        return grads, leaves, losses.detach()

    def join_spans(self, pieces: Sequence[torch.Tensor], leaves) -> List[torch.Tensor]:
        """Per-(span, parameter) tensors, in the order of the flattened `leaves`, -> a list
        over spans of flat [t, P]."""
        n = len(self.names)
        return [self.join(pieces[i * n:(i + 1) * n], (span[0].shape[0],))
                for i, span in enumerate(leaves)]

    def grad_and_losses(self, flat: torch.Tensor, x, y, strategy="vmap", return_outputs=False):
        """Per-task gradients [T, P] and losses [T] (no graph kept); with return_outputs
        also the model outputs [T, ...] of that forward pass."""
        grads, _, losses, *outputs = self.grad_pieces(flat, x, y, strategy,
                                                      return_outputs=return_outputs)
        grads = grads[0] if len(grads) == 1 else torch.cat(grads)
        return (grads, losses, *outputs)

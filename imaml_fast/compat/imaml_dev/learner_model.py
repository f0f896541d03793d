"""`implicit_maml.learner_model` of the iMAML authors, re-implemented on imaml_fast.

Learner keeps the authors' constructor, methods and attribute names (model, use_gpu,
inner_opt, outer_opt, loss_function, inner_alg), so scripts run unchanged and agents they
pickled load into it (after imaml_fast.compat.install_aliases()). Numerics follow the
authors' code, including where it departs from the paper:

- The CG operator of matrix_evaluator is A v = (1 + regu_coef) v + H v / (lam + lam_damping),
  H the Hessian of the training loss. The paper's is A v = v + H v / lam. (The authors' script
  passes its cg_damping as the third positional argument, which lands in regu_coef.)
- The inner loop is plain gradient descent on the training loss, with the proximal term
  lam/2 ||w - w_0||^2 only when add_regularization=True; the authors' script instead takes
  unregularised steps followed by one "pull-back" step, whereas the paper's inner problem
  always carries the proximal term.
- The outer Adam uses eps=1e-3, as the authors' does.

Faster than the authors' structure: matrix_evaluator builds the training-gradient graph once,
on its first product, and reuses it for every later product (the authors' evaluator rebuilds
it for every CG iteration); learn_on_data syncs with the host once, not once per step; and
meta_gradient_batch replaces the whole per-task loop with one batched imaml_fast call.

On a GPU the per-task methods run the model as the authors' code does, under torch's global
TF32 flags; meta_gradient_batch goes through imaml_fast's engine, whose convolutions run in
full float32 unless IMAMLConfig.tf32 (imaml_fast.precision).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ...config import IMAMLConfig
from ...implicit import meta_gradient
from ...models import conv4_maxpool, omniglot_conv
from . import utils

__all__ = ["Learner", "MatrixEvaluator", "make_fc_network", "make_conv_network"]


def _lam_value(lam, like: torch.Tensor):
    """A scalar lam as a Python float; a per-parameter lam as a tensor like `like`."""
    if isinstance(lam, (torch.Tensor, np.ndarray)) and np.ndim(lam) > 0:
        return utils.to_tensor(lam).to(device=like.device, dtype=like.dtype).reshape(-1)
    return float(lam)


class Learner:
    """A model with an inner (SGD, inner_lr) and an outer (Adam with eps=1e-3, or SGD;
    outer_lr) optimizer. inner_alg: 'gradient' only; 'sqp' raises NotImplementedError (the
    authors' published code does not implement it either)."""

    def __init__(self, model: nn.Module, loss_function, inner_lr=1e-3, outer_lr=1e-2, GPU=False,
                 inner_alg="gradient", outer_alg="adam"):
        if inner_alg == "sqp":
            raise NotImplementedError("inner_alg='sqp' is not implemented (nor is it in the "
                                      "authors' published implicit_maml); use 'gradient', or "
                                      "imaml_fast.IMAMLConfig(inner_solver='hf') for iMAML-HF")
        if inner_alg != "gradient":
            raise ValueError(f"inner_alg={inner_alg!r} is invalid: use 'gradient'")
        if outer_alg not in ("adam", "sgd"):
            raise ValueError(f"outer_alg={outer_alg!r} is invalid: use 'adam' or 'sgd'")
        self.model = model.cuda() if GPU else model
        self.use_gpu = GPU
        self.inner_opt = torch.optim.SGD(self.model.parameters(), lr=inner_lr)
        if outer_alg == "adam":
            self.outer_opt = torch.optim.Adam(self.model.parameters(), lr=outer_lr, eps=1e-3)
        else:
            self.outer_opt = torch.optim.SGD(self.model.parameters(), lr=outer_lr)
        self.loss_function = loss_function
        self.inner_alg = inner_alg

    # ---- parameters ---------------------------------------------------------------------------
    def _params(self) -> List[nn.Parameter]:
        return list(self.model.parameters())

    def get_params(self) -> torch.Tensor:
        """All parameters as one flat vector (a detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self._params()]).clone()

    def _split(self, flat, what: str) -> List[torch.Tensor]:
        params = self._params()
        flat = utils.to_tensor(flat).reshape(-1)
        total = sum(p.numel() for p in params)
        if flat.numel() != total:
            raise ValueError(f"{what} has {flat.numel()} entries but the model has {total} "
                             f"parameters")
        p0 = params[0]
        flat = flat.to(device=p0.device, dtype=p0.dtype)
        return [c.view_as(p) for c, p in zip(torch.split(flat, [p.numel() for p in params]),
                                             params)]

    def set_params(self, param_vals) -> None:
        with torch.no_grad():  # bumps the parameters' version counters (see MatrixEvaluator)
            for p, v in zip(self._params(), self._split(param_vals, "param_vals")):
                p.copy_(v)

    def set_outer_lr(self, lr) -> None:
        for group in self.outer_opt.param_groups:
            group["lr"] = lr

    def set_inner_lr(self, lr) -> None:
        for group in self.inner_opt.param_groups:
            group["lr"] = lr

    def regularization_loss(self, w_0, lam=0.0) -> torch.Tensor:
        """0.5 * lam * ||w - w_0||^2 as a tensor (w_0 flat). A per-parameter lam (array or
        tensor of the parameters' size) gives 0.5 * sum(lam * (w - w_0)^2), the diagonal
        proximal term. (The authors' vector branch is unreachable and would square lam.)"""
        if w_0 is None:
            raise ValueError("regularization_loss needs w_0, the flat point to regularise around")
        w = torch.cat([p.reshape(-1) for p in self._params()])
        w_0 = utils.to_tensor(w_0).to(device=w.device, dtype=w.dtype).reshape(-1)
        lam = _lam_value(lam, w)
        d = w - w_0
        return 0.5 * (lam * d * d).sum() if isinstance(lam, torch.Tensor) else 0.5 * lam * (d * d).sum()

    # ---- losses and predictions ---------------------------------------------------------------
    def _input(self, x) -> torch.Tensor:
        """A tensor moved to the parameters' device; numpy input converted too (integer
        arrays to torch.long labels, anything else to the parameters' dtype)."""
        p0 = self._params()[0]
        if isinstance(x, torch.Tensor):
            return x if x.device == p0.device else x.to(p0.device)
        arr = np.asarray(x)
        dtype = torch.long if np.issubdtype(arr.dtype, np.integer) else p0.dtype
        return utils.to_tensor(arr, dtype=dtype).to(p0.device)

    def get_loss(self, x, y, return_numpy=False):
        loss = self.loss_function(self.model(self._input(x)), self._input(y))
        return loss.item() if return_numpy else loss

    def predict(self, x, return_numpy=False):
        yhat = self.model(self._input(x))
        return utils.to_numpy(yhat) if return_numpy else yhat

    # ---- inner loop ---------------------------------------------------------------------------
    def _plain_sgd_lr(self) -> Optional[float]:
        """inner_opt's lr when it is plain SGD (no momentum, decay, nesterov, maximize)."""
        opt = self.inner_opt
        if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
            return None
        g = opt.param_groups[0]
        if g.get("momentum", 0) or g.get("weight_decay", 0) or g.get("nesterov") or g.get("maximize"):
            return None
        return float(g["lr"])

    def learn_on_data(self, x, y, num_steps=10, add_regularization=False, w_0=None, lam=0.0):
        """num_steps in-place gradient steps of inner_opt on the loss at (x, y), plus
        lam/2 ||w - w_0||^2 when add_regularization: each step is
        w <- w - inner_lr * (grad L(w) + lam * (w - w_0)). Returns the training losses
        (before each step, without the regulariser) as floats."""
        if self.inner_alg != "gradient":
            raise NotImplementedError(f"inner_alg={self.inner_alg!r}: only 'gradient' is implemented")
        params = self._params()
        x, y = self._input(x), self._input(y)
        if add_regularization:
            if w_0 is None:
                raise ValueError("learn_on_data: add_regularization=True needs w_0")
            w0 = self._split(w_0, "w_0")
            lam_v = _lam_value(lam, params[0])
            lams = (self._split(lam_v, "lam") if isinstance(lam_v, torch.Tensor)
                    else [lam_v] * len(params))
        lr = self._plain_sgd_lr()
        losses = []
        for _ in range(num_steps):
            loss = self.loss_function(self.model(x), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
            losses.append(loss.detach())
            with torch.no_grad():
                if add_regularization:  # the gradient of the regulariser, in closed form
                    grads = [g + lm * (p - w) for g, p, w, lm in zip(grads, params, w0, lams)]
                if lr is not None:
                    torch._foreach_add_(params, list(grads), alpha=-lr)
                else:  # a user-supplied inner optimizer: let it step
                    for p, g in zip(params, grads):
                        p.grad = g
                    self.inner_opt.step()
        return torch.stack(losses).cpu().tolist() if losses else []

    def learn_task(self, task, num_steps=10, add_regularization=False, w_0=None, lam=0.0):
        return self.learn_on_data(task["x_train"], task["y_train"], num_steps,
                                  add_regularization, w_0, lam)

    def move_toward_target(self, target, lam=2.0) -> None:
        """One step of the OUTER optimizer on lam/2 ||w - target||^2, i.e. with the gradient
        lam * (w - target): for outer_alg='sgd', w <- w - outer_lr * lam * (w - target);
        for Adam, an Adam step (its moments are updated) on that gradient. This is the
        authors' definition (meant for Reptile-style updates)."""
        self.outer_opt.zero_grad()
        self.regularization_loss(target, lam=lam).backward()
        self.outer_opt.step()

    def outer_step_with_grad(self, grad, flat_grad=False) -> None:
        """Set every parameter's .grad from `grad` (a flat vector if flat_grad, else a list of
        parameter-shaped tensors) and step the outer optimizer."""
        params = self._params()
        if flat_grad:
            pieces = self._split(grad, "grad")
        else:
            pieces = list(grad)
            if len(pieces) != len(params):
                raise ValueError(f"grad has {len(pieces)} tensors but the model has "
                                 f"{len(params)} parameters (pass flat_grad=True for a flat vector)")
        for p, g in zip(params, pieces):
            p.grad = utils.to_tensor(g).detach().to(device=p.device, dtype=p.dtype).reshape(
                p.shape).clone()
        self.outer_opt.step()

    # ---- Hessians -----------------------------------------------------------------------------
    def _data(self, task, x, y):
        if x is not None and y is not None:
            return self._input(x), self._input(y)
        return self._input(task["x_train"]), self._input(task["y_train"])

    def matrix_evaluator(self, task, lam, regu_coef=1.0, lam_damping=10.0, x=None, y=None):
        """v -> (1 + regu_coef) v + H v / (lam + lam_damping), H the Hessian of the loss on
        (x, y) (default: the task's train split) at the parameters the model has when the
        evaluator is first called. The paper's operator is v + H v / lam. A per-parameter lam
        (vector) divides elementwise."""
        x, y = self._data(task, x, y)
        return MatrixEvaluator(self, x, y, lam, regu_coef, lam_damping)

    def hessian_vector_product(self, task, vector, params=None, x=None, y=None) -> torch.Tensor:
        """Flat H v, H the Hessian of the loss on (x, y) (default: the task's train split) at
        `params` (flat) or at the current parameters. Unlike the authors' version, passing
        params does not overwrite the model's parameters."""
        x, y = self._data(task, x, y)
        return _HVPGraph(self, x, y, params)(vector)

    # ---- batched meta-gradient ----------------------------------------------------------------
    def meta_gradient_batch(self, tasks: Sequence[dict], lam, cg_steps: int, num_steps: int,
                            regu_coef=1.0, lam_damping=10.0, add_regularization=True,
                            cg_tol=0.0, return_result=False, **config_overrides):
        """The mean implicit meta-gradient (flat, at the current parameters) over `tasks`,
        computed by ONE imaml_fast.meta_gradient call instead of the per-task loop

            set_params(w); learn_task(task, num_steps, True, w, lam);
            g = cg_solve(matrix_evaluator(task, lam, regu_coef, lam_damping),
                         grad of the loss on (x_val, y_val), cg_steps)

        The inner loop is imaml_fast's proximal gradient descent with inner_opt's lr, whose
        step w - lr (grad L + lam (w - w_0)) is the regularised step above; the solve uses
        the authors' operator through operator=(1 + regu_coef, 1 / (lam + lam_damping)).
        cg_steps=0 is the first-order gradient. cg_tol=0 runs all cg_steps CG iterations, as
        the authors' loop does unless its absolute test r.r < 1e-10 fires first.

        add_regularization=False (plain SGD steps, lam = 0 in the inner loop) cannot run on
        the engine, whose inner problem always carries lam/2 ||w - w_0||^2 with lam > 0: it
        raises ValueError; use the per-task loop for it. config_overrides go to IMAMLConfig
        (backend, task_batching, hvp, ...). return_result=True returns the engine's
        MetaGradient (per-task gradients, adapted parameters, CG statistics) instead."""
        if not add_regularization:
            raise ValueError("meta_gradient_batch reproduces the regularised inner loop "
                             "(learn_task(..., add_regularization=True, w_0=w, lam=lam)) only: "
                             "imaml_fast's inner problem always includes lam/2 ||w - w_0||^2. "
                             "Use the per-task loop for unregularised inner steps.")
        if isinstance(lam, (torch.Tensor, np.ndarray)) and np.ndim(lam) > 0:
            raise ValueError("meta_gradient_batch needs a scalar lam (a per-parameter lam "
                             "works with the per-task loop only)")
        lam = float(lam)
        if not lam > 0:
            raise ValueError(f"meta_gradient_batch: lam={lam} must be > 0 (the inner "
                             f"problem's proximal strength)")
        lr = self._plain_sgd_lr()
        if lr is None:
            raise ValueError("meta_gradient_batch needs inner_opt to be plain torch.optim.SGD")
        tasks = list(tasks)
        if not tasks:
            raise ValueError("meta_gradient_batch: tasks is empty")
        stacked = []
        for key in ("x_train", "y_train", "x_val", "y_val"):
            items = [self._input(t[key]) for t in tasks]
            shapes = {tuple(i.shape) for i in items}
            if len(shapes) != 1:
                raise ValueError(f"meta_gradient_batch: tasks have different {key} shapes "
                                 f"{sorted(shapes)}; batched tasks need equal shapes")
            stacked.append(torch.stack(items))
        config = IMAMLConfig(inner_solver="gd", inner_steps=num_steps, inner_lr=lr, lam=lam,
                             cg_steps=cg_steps, cg_tol=cg_tol, **config_overrides)
        result = meta_gradient(self.model, self.loss_function, *stacked, config,
                               operator=(1.0 + float(regu_coef), 1.0 / (lam + float(lam_damping))))
        return result if return_result else result.grads_flat


class _HVPGraph:
    """The training-loss gradient with its graph, built once at fixed parameters (detached
    copies, so later changes to the model cannot corrupt it); each call is one more backward
    pass: H v."""

    def __init__(self, learner: Learner, x, y, flat=None):
        named = list(learner.model.named_parameters())
        if flat is None:
            values = [p.detach() for _, p in named]
        else:
            values = learner._split(flat, "params")
        self.leaves = [v.clone().requires_grad_(True) for v in values]
        self.sizes = [v.numel() for v in values]
        with torch.enable_grad():
            out = functional_call(learner.model, {n: l for (n, _), l in zip(named, self.leaves)}, (x,))
            loss = learner.loss_function(out, y)
            grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True,
                                        materialize_grads=True)
        # Gradients that do not depend on the parameters contribute nothing to H v.
        self.live = [i for i, g in enumerate(grads) if g.requires_grad]
        self.grads = [grads[i] for i in self.live]
        self.dtype, self.device = values[0].dtype, values[0].device

    def __call__(self, vector) -> torch.Tensor:
        v = utils.to_tensor(vector).to(device=self.device, dtype=self.dtype).reshape(-1)
        if v.numel() != sum(self.sizes):
            raise ValueError(f"vector has {v.numel()} entries but the model has "
                             f"{sum(self.sizes)} parameters")
        if not self.grads:
            return torch.zeros_like(v)
        vs = torch.split(v, self.sizes)
        hv = torch.autograd.grad(self.grads, self.leaves,
                                 grad_outputs=[vs[i].view_as(self.grads[k])
                                               for k, i in enumerate(self.live)],
                                 retain_graph=True, allow_unused=True, materialize_grads=True)
        return torch.cat([h.reshape(-1) for h in hv])


class MatrixEvaluator:
    """The callable matrix_evaluator returns. It builds the gradient graph on its first call
    and reuses it; if the model's parameters were changed in place since (set_params, an
    optimizer step: anything that bumps their version counters), the next call rebuilds it
    at the new parameters, as the authors' evaluator (which rebuilds every call) would see
    them. Writes through .data bypass version counters: call release() after those.
    `calls` counts products, `builds` gradient graphs."""

    def __init__(self, learner: Learner, x, y, lam, regu_coef, lam_damping):
        self.learner, self.x, self.y = learner, x, y
        p0 = learner._params()[0]
        self.scale = 1.0 / (_lam_value(lam, p0) + lam_damping)
        self.shift = 1.0 + regu_coef
        self.calls = self.builds = 0
        self._graph, self._versions = None, None

    def _current(self) -> _HVPGraph:
        versions = [p._version for p in self.learner._params()]
        if self._graph is None or versions != self._versions:
            self._graph = None  # free the old graph before building the new one
            self._graph = _HVPGraph(self.learner, self.x, self.y)
            self._versions = versions
            self.builds += 1
        return self._graph

    def __call__(self, v) -> torch.Tensor:
        hv = self._current()(v)
        self.calls += 1
        v = utils.to_tensor(v).to(hv).reshape(-1)
        return self.shift * v + hv * self.scale

    def release(self) -> None:
        """Free the cached graph (the next call rebuilds it)."""
        self._graph = self._versions = None


# ---- networks -------------------------------------------------------------------------------------
def make_fc_network(in_dim=1, out_dim=1, hidden_sizes=(40, 40), float16=False) -> nn.Sequential:
    """ReLU MLP with modules fc_0, nl_0, fc_1, nl_1, ..., fc_k (the authors' names; their
    version takes exactly two hidden layers, this one any number)."""
    layers, d = OrderedDict(), in_dim
    for i, h in enumerate(hidden_sizes):
        layers[f"fc_{i}"] = nn.Linear(d, h)
        layers[f"nl_{i}"] = nn.ReLU()
        d = h
    layers[f"fc_{len(hidden_sizes)}"] = nn.Linear(d, out_dim)
    model = nn.Sequential(layers)
    return model.half() if float16 else model


_OMNIGLOT_NAMES = ["conv1", "BN1", "relu1", "conv2", "BN2", "relu2", "pad2", "conv3", "BN3",
                   "relu3", "conv4", "BN4", "relu4", "flatten", "fc1"]


def make_conv_network(in_channels, out_dim, task="Omniglot", filter_size=None) -> nn.Sequential:
    """task='Omniglot': imaml_fast.models.omniglot_conv (4 x [3x3 conv, stride 2, padding 1,
    BatchNorm2d(track_running_stats=False), ReLU], ZeroPad2d((0,1,0,1)) after block 2, a
    Linear head on filter_size*2*2 features; 28x28 inputs) with the authors' module names and
    initialisation (xavier_uniform_ with gain 1.73, biases uniform in [0, 0.05]).
    filter_size=None gives the authors' width, 64 (their code ignores its filter_size=32
    argument and always builds 64 filters; here an explicit int sets the width).
    task='MiniImageNet': imaml_fast.models.conv4_maxpool (MAML's conv4, 84x84 inputs,
    default 32 filters), same initialisation; the authors' version raises NotImplementedError."""
    if task == "Omniglot":
        net = omniglot_conv(out_dim, in_channels=in_channels, filters=filter_size or 64)
        model = nn.Sequential(OrderedDict(zip(_OMNIGLOT_NAMES, net)))
    elif task == "MiniImageNet":
        model = conv4_maxpool(out_dim, in_channels=in_channels, filters=filter_size or 32)
    else:
        raise ValueError(f"task={task!r} is invalid: use 'Omniglot' or 'MiniImageNet'")
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight, gain=1.73)
            if layer.bias is not None:
                nn.init.uniform_(layer.bias, a=0.0, b=0.05)
    return model

"""Hand-batched layers: a plain stack of layers run over T tasks' parameters in one call, no vmap.

The batched backends run a model for every task at once. With torch.func.vmap over
functional_call, each layer call is rewritten by a batching rule: a convolution with per-task
weights becomes one grouped convolution over [N, T*C, H, W], BatchNorm with batch statistics
one call over T*C channels. Between layers vmap moves the task dimension back to the front
([T, N, C, H, W]): views and permutes in every layer of every pass, a copy wherever the next
rule needs the channels-of-all-tasks layout again, and BatchNorm's backward under vmap runs
as broadcast elementwise ops on the permuted layout. For a model that is a plain stack of
known layers (an nn.Sequential such as the paper's networks) the batched form can be written
down once instead:
- the activations stay in the layout [N, T*C, *spatial] from the input to the flatten, so
  every convolution is one grouped convolution (groups T * groups), every BatchNorm one
  F.batch_norm over T*C channels, and activations, padding and pooling act per channel
  exactly as they are (a zero padding that a convolution follows is folded into the
  convolution's own padding where that gives the same result: folded_padding);
- after the flatten they are [T, N, F], and every linear layer is one batched matrix product;
- the loss is computed for every task in one call for F.cross_entropy and F.mse_loss
  (batched_loss), and is the user's loss_fn under vmap otherwise, on the output [T, N, ...].
The convolutions and BatchNorms are the same F.conv*/F.batch_norm calls a per-task model
makes, so imaml_fast.layers' closed-form second derivatives and a backend's fused BatchNorm
kernel apply unchanged.

Not under IMAMLConfig(amp=...): there the model keeps running under vmap. torch.autocast does
not reach operations inside torch.func.vmap (a vmapped F.conv2d or F.linear under a bf16
autocast returns float32), so under vmap amp="bf16" runs the first-order passes and the
linear layers in float32 and only imaml_fast.layers' convolutions, which cast for autocast
themselves, in bf16. Hand-batched, every convolution and linear layer would run in bf16: in
tests/test_amp.py's setting that ended outside the documented 20% from float32 (a first
check, a few seeds), and not always closer to float64 than a pure bf16 model. Until amp's
tolerance is measured and documented for a model that really runs in bf16, amp keeps the
vmap path and its numbers.

Same function, values equal up to rounding (tests/test_stacked.py: outputs, losses,
gradients and Hessian-vector products against vmap and against a loop over tasks in float64,
for every supported layer). It dispatches fewer operations per pass (benchmarks/op_count.py),
which is what paces an uncaptured GPU step, and moves less memory on the CPU.

`plan(model, names, buffers)` accepts an nn.Sequential (nested ones too) whose meta-learned
parameters are exactly the model's, with no buffers and no hooks, made of:
Conv1d/2d/3d (zeros padding mode), BatchNorm1d/2d/3d with batch statistics, Linear,
Flatten (the default start_dim=1, end_dim=-1), ZeroPad/ConstantPad 1d/2d/3d,
MaxPool/AvgPool 1d/2d/3d, Dropout with p = 0, Identity and the element-wise activations
(ReLU, ReLU6, LeakyReLU, ELU, SELU, CELU, GELU, SiLU, Mish, Tanh, Sigmoid, Softplus,
Hardtanh, Hardswish, Hardsigmoid). Anything else (another module type, a subclass, a linear
layer before any flatten of a spatial input, ...) makes it return None, and the model runs
under vmap as before. IMAMLConfig(layer_batching="vmap") turns the hand-batched path off.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from .layers import batch_norm_relu, functorch_wrapped


_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules without parameters that act on each sample and channel alone: run as they are on
# [N, T*C, *spatial] (and, for the element-wise ones, on [T, N, F]).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish,
                nn.Hardsigmoid, nn.Identity)
_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
         nn.ConstantPad3d)  # (a zero one that a convolution follows may fold into it)
_PER_CHANNEL = _PADS + (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                        nn.AvgPool3d)
_SPATIAL_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.BatchNorm1d: None,
                 nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _leaves(module: nn.Module, prefix: str = "") -> Optional[List[Tuple[str, nn.Module]]]:
    """(name prefix, layer) in call order through nested nn.Sequentials; None for a container
    that is not exactly nn.Sequential. Every call counts: named_children() would list a layer
    used twice only once (its parameters then belong to the first name, and plan refuses)."""
    out = []
    for name, child in module._modules.items():
        if child is None:
            continue
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            if _hooked(child):
                return None
            sub = _leaves(child, full + ".")
            if sub is None:
                return None
            out += sub
        else:
            out.append((full, child))
    return out


def folded_padding(pad: nn.Module, conv: nn.Module, spatial: Sequence[int]):
    """The symmetric zero padding with which `conv` on an input of spatial size `spatial`
    computes exactly what it computes on `pad`'s output, or None where none does. A zero
    ConstantPad/ZeroPad followed by a convolution folds when, in every spatial dimension, the
    pad's leading zeros added to the convolution's own padding give the same output size:
    then every position the folded convolution reads outside the input is a zero in both
    (the Omniglot network's ZeroPad2d((0, 1, 0, 1)) before a stride-2, padding-1 convolution
    of a 7x7 input: its trailing zeros are read where the convolution pads anyway). Saves
    the padded copy in every forward pass and its slice in every backward pass."""
    D = len(spatial)
    pads, cpad = pad.padding, conv.padding
    if (pad.value != 0 or isinstance(cpad, str) or len(pads) != 2 * D
            or type(conv) not in _CONV or len(cpad) != D or min(pads) < 0):
        return None
    out = []
    for d, L in enumerate(spatial):
        before, after = pads[2 * (D - 1 - d)], pads[2 * (D - 1 - d) + 1]  # F.pad: last dim first
        p, s, dl, k = cpad[d], conv.stride[d], conv.dilation[d], conv.kernel_size[d]
        q = p + before
        reach = dl * (k - 1) + 1  # the input positions one output reads
        padded, folded = L + before + after + 2 * p, L + 2 * q
        if min(padded, folded) < reach or (padded - reach) // s != (folded - reach) // s:
            return None  # another output size (or none: the convolution's own error stands)
        out.append(q)
    return tuple(out)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m
    return any(bool(getattr(m, h, None)) for h in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))


def _hooked(module: nn.Module) -> bool:
    return any(bool(getattr(module, h, None)) for h in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


class Step:
    """One layer of a plan: kind ("conv", "bn", "linear", "flatten", "pad": a padding a
    convolution follows, "apply"), the module,
    and the positions of its weight and bias in FunctionalModel.names (None: absent)."""
    __slots__ = ("kind", "module", "weight", "bias")

    def __init__(self, kind, module, weight=None, bias=None):
        self.kind, self.module, self.weight, self.bias = kind, module, weight, bias


class StackedPlan:
    """A supported nn.Sequential as hand-batched steps (see the module docstring).

    input_layout: "spatial" (the per-task input [N, C, *spatial] becomes [N, T*C, *spatial])
    or "features" (a per-task input [N, F] stays [T, N, F])."""

    def __init__(self, steps: List[Step], input_layout: str, input_dim: Optional[int]):
        self.steps, self.input_layout, self.input_dim = steps, input_layout, input_dim

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether x [T, N, ...] has the per-task shape the plan was made for ([N, F] for a
        features input; [N, C, *spatial] with the first layer's spatial dims otherwise), and
        no global module hooks (nn.modules.module.register_module_forward_hook and the like,
        which a per-task call would run) are set."""
        if _global_hooks():
            return False
        if self.input_layout == "features":
            return x.dim() == 3
        return x.dim() == self.input_dim if self.input_dim else x.dim() >= 4

    def forward(self, params: Sequence[torch.Tensor], x: torch.Tensor,
                bn_relu=None) -> torch.Tensor:
        """Outputs [T, N, ...] of every task's model: params per-parameter [T, *shape] in
        FunctionalModel.names order, x [T, N, ...]. bn_relu: a backend's (bn_relu_forward,
        bn_relu_backward) ops; a BatchNorm followed by a ReLU then runs as one layer
        (imaml_fast.layers.batch_norm_relu, first derivatives only: FunctionalModel passes
        them for gradients taken once)."""
        T, N = x.shape[0], x.shape[1]
        if self.input_layout == "spatial":
            h = x.transpose(0, 1).reshape(N, T * x.shape[2], *x.shape[3:])
        else:
            h = x
        spatial = self.input_layout == "spatial"
        skip_next = False
        conv_padding = None  # a zero pad folded into the next convolution (folded_padding)
        for k, s in enumerate(self.steps):
            if skip_next:  # the ReLU that batch_norm_relu already applied
                skip_next = False
                continue
            m = s.module
            w = None if s.weight is None else params[s.weight]
            b = None if s.bias is None else params[s.bias]
            if s.kind == "conv":
                h = _CONV[type(m)](h, w.reshape(-1, *w.shape[2:]),
                                   None if b is None else b.reshape(-1), m.stride,
                                   m.padding if conv_padding is None else conv_padding,
                                   m.dilation, m.groups * T)
                conv_padding = None
            elif s.kind == "pad":  # a zero pad a convolution follows: folded where exact
                conv_padding = folded_padding(m, self.steps[k + 1].module, h.shape[2:])
                if conv_padding is None:
                    h = m(h)
            elif s.kind == "bn":
                w = None if w is None else w.reshape(-1)
                b = None if b is None else b.reshape(-1)
                if (spatial and bn_relu is not None and self._relu_follows(k)
                        and not functorch_wrapped(h)):  # it has no vmap/forward-mode rule
                    h = batch_norm_relu(h, w, b, m.eps, bn_relu)
                    skip_next = True
                elif spatial:
                    h = F.batch_norm(h, None, None, w, b, True, 0.0, m.eps)
                else:  # [T, N, F]: per (task, feature) statistics over the N samples
                    Fd = h.shape[2]
                    h = F.batch_norm(h.transpose(0, 1).reshape(N, T * Fd), None, None, w, b,
                                     True, 0.0, m.eps)
                    h = h.view(N, T, Fd).transpose(0, 1)
            elif s.kind == "flatten":
                if spatial:
                    h = h.reshape(N, T, -1).transpose(0, 1)
                    spatial = False
            elif s.kind == "linear":
                wt = w.transpose(1, 2)
                h = torch.bmm(h, wt) if b is None else torch.baddbmm(b.unsqueeze(1), h, wt)
            else:
                h = m(h)
        if spatial:  # a model that ends before any flatten: [N, T*C, ...] -> [T, N, C, ...]
            h = h.reshape(N, T, -1, *h.shape[2:]).transpose(0, 1)
        return h

    def _relu_follows(self, k: int) -> bool:
        """Whether step k + 1 is a plain nn.ReLU (what batch_norm_relu fuses)."""
        return (k + 1 < len(self.steps) and self.steps[k + 1].kind == "apply"
                and type(self.steps[k + 1].module) is nn.ReLU)


def plan(model: nn.Module, names: Sequence[str], buffers) -> Optional[StackedPlan]:
    """The hand-batched form of `model`, or None where it does not apply (see the module
    docstring). names: the meta-learned parameters in FunctionalModel order; buffers: the
    model's buffers."""
    if type(model) is not nn.Sequential or buffers or _hooked(model):
        return None
    layers = _leaves(model)
    if not layers:
        return None
    index = {n: i for i, n in enumerate(names)}
    used = set()
    steps: List[Step] = []
    layout = None  # the current layout, fixed by the first layer that needs one

    def params(prefix, module):
        """Positions of the layer's weight and bias in names (None where it has none)."""
        out = []
        for pname in ("weight", "bias"):
            key = f"{prefix}.{pname}"
            if getattr(module, pname, None) is None:
                out.append(None)
            elif key in index:
                used.add(key)
                out.append(index[key])
            else:
                raise LookupError(key)
        return out

    input_layout, input_dim = None, None
    try:
        for prefix, m in layers:
            if _hooked(m) or list(m.buffers(recurse=False)) or list(m.children()):
                return None
            t = type(m)
            if t in _CONV:
                if m.padding_mode != "zeros" or layout == "features":
                    return None
                layout = layout or "spatial"
                steps.append(Step("conv", m, *params(prefix, m)))
            elif t in _BN:
                if m.track_running_stats:
                    return None
                if t is nn.BatchNorm1d:
                    layout = layout or "features"
                elif layout == "features":
                    return None
                layout = layout or "spatial"
                steps.append(Step("bn", m, *params(prefix, m)))
            elif t is nn.Linear:
                if layout == "spatial":
                    return None
                layout = layout or "features"
                steps.append(Step("linear", m, *params(prefix, m)))
            elif t is nn.Flatten:
                if m.start_dim != 1 or m.end_dim != -1:
                    return None
                # a flatten before any layout-fixing layer: the input is spatial
                layout = layout or "spatial"
                steps.append(Step("flatten", m))
            elif t in _ELEMENTWISE or (t is nn.Dropout and m.p == 0):
                steps.append(Step("apply", m))
            elif t in _PER_CHANNEL:
                if layout == "features" or getattr(m, "return_indices", False):
                    return None
                layout = layout or "spatial"
                steps.append(Step("apply", m))
            else:
                return None
            if input_layout is None and layout is not None:
                input_layout = layout
                k = _SPATIAL_DIMS.get(t)
                input_dim = None if k is None else 3 + k
            if t is nn.Flatten:
                layout = "features"
    except LookupError:  # a parameter that is not meta-learned
        return None
    if used != set(names) or input_layout is None:
        return None
    for k in range(len(steps) - 1):  # zero pads a convolution follows may fold into it
        if isinstance(steps[k].module, _PADS) and steps[k + 1].kind == "conv":
            steps[k].kind = "pad"
    return StackedPlan(steps, input_layout, input_dim)


def _loss_kind(loss_fn):
    """("ce", ignore_index) or ("mse", None) for F.cross_entropy / F.mse_loss and for
    nn.CrossEntropyLoss() / nn.MSELoss() with their default settings; None otherwise."""
    if loss_fn is F.cross_entropy:
        return "ce", -100
    if loss_fn is F.mse_loss:
        return "mse", None
    t = type(loss_fn)
    if t is nn.CrossEntropyLoss and loss_fn.reduction == "mean" and loss_fn.weight is None \
            and loss_fn.label_smoothing == 0.0 and not _hooked(loss_fn):
        return "ce", loss_fn.ignore_index
    if t is nn.MSELoss and loss_fn.reduction == "mean" and not _hooked(loss_fn):
        return "mse", None
    return None


def batched_loss(loss_fn, out: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-task losses [T] of F.cross_entropy or F.mse_loss (their default arguments, as a
    per-task training loop calls them; or nn.CrossEntropyLoss() / nn.MSELoss() with default
    settings, ignore_index aside) on out [T, N, ...] and y [T, N, ...], in one call without
    vmap; None for any other loss function or shape, which then runs under vmap.
    Under vmap both losses go through torch's Python decompositions: on the Omniglot network
    this measured 15% of a host-bound meta-step. Each task's value is its own mean, as the
    function's reduction="mean" computes it: over the samples whose class index is not
    ignore_index for class targets, over every element otherwise."""
    kind = _loss_kind(loss_fn)
    if kind is None:
        return None
    T = out.shape[0]
    if kind[0] == "ce" and out.dim() >= 3:
        ignore = kind[1]
        per = F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1), reduction="none",
                              ignore_index=ignore)
        per = per.reshape(T, -1)
        if y.is_floating_point():  # class probabilities: the mean over every position
            return per.mean(1)
        return per.sum(1) / (y != ignore).reshape(T, -1).sum(1)  # as "mean": counted ones
    if kind[0] == "mse" and out.shape == y.shape and out.dtype == y.dtype:
        return F.mse_loss(out, y, reduction="none").reshape(T, -1).mean(1)
    return None


def run(fm, fn_name: str, params: Tuple[torch.Tensor, ...], args: Sequence[torch.Tensor]):
    """FunctionalModel's forward_params / loss_params / loss_and_output_params for a span of
    tasks at once (params per-parameter [t, *shape], args [t, N, ...]), through fm.stacked."""
    with fm.layer_mode():
        out = fm.stacked.forward(params, args[0], bn_relu=fm.fused_bn_relu())
    if fn_name == "forward_params":
        return out
    losses = batched_loss(fm.loss_fn, out, args[1])
    if losses is None:
        losses = vmap(fm.loss_fn)(out, args[1])
    if fn_name == "loss_params":
        return losses
    return losses, out.detach()

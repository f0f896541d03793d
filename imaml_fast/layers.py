"""Convolution and BatchNorm with closed-form second derivatives: cheaper Hessian-vector
products.

A Hessian-vector product through a kept graph (hvp "revrev") differentiates the backward pass
of every layer. For the paper's Omniglot network under vmap (tasks become the groups of one
grouped convolution and the channels of one BatchNorm) PyTorch's own double backward spends
most of a product in two places (benchmarks/profile_hvp.py):
- a grouped convolution's double backward runs one convolution per group for its weight
  term: one per task and layer (96 small convolutions per product for T = 32);
- BatchNorm's backward, recorded with create_graph=True, becomes a dozen differentiable
  elementwise ops and reductions, each differentiated again.

Here both layers are pairs of autograd Functions whose forward passes and first backward
passes are ATen's fused kernels, and whose second derivatives are written out:
- `ConvFn` / `ConvBackwardFn`: every output of a convolution's backward is bilinear in two of
  its inputs, so its vector-Jacobian product is two convolutions and one
  convolution_backward call, grouped natively (no per-group loop).
- `BatchNormFn` / `BatchNormBackwardFn` (batch statistics): the second derivative is
  `batch_norm_double_backward`, five per-channel means and two elementwise outputs (derived
  in its docstring).
Their vmap rules fold the task dimension into the groups or channels ([N, T*C, H, W], per-task
weights [T*O, ...]), so one call serves every task. Values equal ATen's up to rounding
(tests/test_layers.py, float64, against autograd and a loop over tasks). The second
derivatives are differentiable ops themselves, so third derivatives are right too (ATen's own
third derivative of BatchNorm is not: the test shows it disagreeing with finite differences).

Measured on the 2-core CPU (Omniglot 5-way 1-shot, T = 32): one product 85-90 ms -> 55-57 ms,
a meta-step (16 inner steps, 5 CG steps) about 1.15x faster. A plain gradient gains nothing
(its backward is ATen's either way, and the Functions add Python overhead), so
FunctionalModel uses them only for gradients taken with create_graph=True.

A backend may also supply `conv_input_grad` (the cpp backend's C++ kernel for strided grouped
2-D convolutions, the engine's per-task convolutions on the CPU; reference:
`conv_input_grad_ref`, ATen's convolution_backward): ConvFn's first backward and the
products' input term then use it, and the engine's plain gradients route convolutions through
ConvFn for it (FunctionalModel.layer_derivatives "plain").

`batch_norm_relu` (BatchNormReluFn) is BatchNorm followed by ReLU as one layer with first
derivatives only, for gradients taken once: the hand-batched layers (imaml_fast.stacked) run
it in the engine's plain gradients with a backend's bn_relu_forward/bn_relu_backward kernels
(the cpp backend's, csrc/src/cpu/bn_relu.cpp; references: bn_relu_forward_ref,
bn_relu_backward_ref).

`closed_form_layers()` is the TorchFunctionMode that routes F.conv1d/2d/3d (numeric padding)
and F.batch_norm with batch statistics to these Functions; anything else (running
statistics, padding="same", mixed dtypes other than a bf16/fp16 activation with fp32
BatchNorm weights) passes through to ATen unchanged; a convolution under autocast is cast as
autocast casts it. In bf16 the written-out BatchNorm derivative is also the more accurate:
measured against float64, 2-4e-3 relative error in a product where ATen's has 3-11e-3.
The sequential reference backend and hvp="fwdrev" (these Functions define no forward-mode
derivatives) keep ATen's layers; IMAMLConfig(layer_derivatives="autograd") turns them off.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_BN_SIGNATURE = inspect.signature(F.batch_norm)
_CONVS = (F.conv1d, F.conv2d, F.conv3d)
_CONV_SIGNATURE = inspect.signature(lambda input, weight, bias=None, stride=1, padding=0,
                                    dilation=1, groups=1: None)


def _per_channel(x: torch.Tensor):
    """The reduction dims and the broadcast shape of a per-channel [C] tensor for x [N, C, ...]."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return dims, shape


def batch_norm_double_backward(a, b, c, gy, x, mean, invstd, weight, eps=None):
    """The vector-Jacobian product of BatchNorm's backward pass.

    The backward pass (batch statistics over M = N*H*W elements per channel, x^ = (x - mean)
    * invstd, r = invstd, g = weight) is
        gx = g r (gy - <gy> - x^ <gy x^>),   gweight = M <gy x^>,   gbias = M <gy>
    with <.> the per-channel mean. Given cotangents a, b, c of (gx, gweight, gbias), and with
    abar = <a>, gbar = <gy>, P = <gy x^>, Q = <a x^>, A = <a gy> (using dx^_k/dx_m =
    r (d_km - 1/M - x^_k x^_m / M) and dr/dx_m = -r^2 x^_m / M):
        d/dgy     = g r (a - abar - x^ Q) + b x^ + c
        d/dx      = g r^2 (-x^ (A - abar gbar - 3 P Q) - Q (gy - gbar) - P (a - abar))
                    + b r (gy - gbar - x^ P)
        d/dweight = r M (A - abar gbar - P Q)
    a, b, c may be None (zero). weight may be None (affine=False: g = 1, no d/dweight).
    With `eps` given, grad mode on and x requiring grad (a backward pass with
    create_graph=True), mean and invstd are recomputed from x, so that the result is itself
    differentiable: third derivatives come out right instead of silently missing the
    statistics' dependence on x.
    Returns (d/dgy, d/dx, d/dweight or None)."""
    dims, shape = _per_channel(x)
    M = x.numel() // x.shape[1] if x.numel() else 1
    if eps is not None and torch.is_grad_enabled() and x.requires_grad:
        var, mean = torch.var_mean(x, dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    r = invstd.view(shape)
    xh = (x - mean.view(shape)) * r
    g = weight.view(shape) if weight is not None else None
    gbar = gy.mean(dims, keepdim=True)
    P = (gy * xh).mean(dims, keepdim=True)
    dgy = torch.zeros_like(gy)
    dx = torch.zeros_like(x)
    dw = None
    if a is not None:
        abar = a.mean(dims, keepdim=True)
        Q = (a * xh).mean(dims, keepdim=True)
        A = (a * gy).mean(dims, keepdim=True)
        gr = r if g is None else g * r
        dgy = dgy + gr * (a - abar - xh * Q)
        dx = dx + (gr * r) * (-xh * (A - abar * gbar - 3 * P * Q) - Q * (gy - gbar) - P * (a - abar))
        if weight is not None:
            dw = (r * M * (A - abar * gbar - P * Q)).view(-1)
    if b is not None:
        bv = b.view(shape)
        dgy = dgy + bv * xh
        dx = dx + bv * r * (gy - gbar - xh * P)
    if c is not None:
        dgy = dgy + c.view(shape)
    if weight is not None and dw is None:
        dw = torch.zeros_like(weight)
    return dgy, dx, dw


_functorch = getattr(torch._C, "_functorch", None)


def functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether t is a torch.func wrapper (vmap's BatchedTensor, a grad-tracking tensor) rather
    than a plain tensor."""
    return _functorch is not None and _functorch.is_functorch_wrapped_tensor(t)


def kernel_can_take(tensors, dtypes) -> bool:
    """Whether a backend's bn_double_backward kernel can take these tensors (x first): all of
    one dtype among `dtypes`, at least one element, none needing autograd (grad mode off or
    nothing requires grad), and plain storage, not a torch.func wrapper (vmap's BatchedTensor,
    a grad-tracking tensor) or autograd's batched cotangent
    (torch.autograd.grad(is_grads_batched=True)), whose data pointer a kernel cannot take.
    Where it cannot, the wrappers run batch_norm_double_backward."""
    x = tensors[0]
    if (x.dtype not in dtypes or any(t.dtype != x.dtype for t in tensors) or x.numel() == 0
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return False
    return _functorch is None or not any(functorch_wrapped(t)
                                         or _functorch.is_legacy_batchedtensor(t)
                                         for t in tensors)


def _fold(t: Optional[torch.Tensor], bdim: Optional[int], B: int, dim: int):
    """Move t's vmap dimension (bdim, or none: broadcast) to `dim` and merge it with the
    dimension after it: x [.., B, C, ..] -> [.., B*C, ..] (tasks become channels)."""
    if t is None:
        return None
    if bdim is None:
        t = t.unsqueeze(dim).expand(*t.shape[:dim], B, *t.shape[dim:])
    else:
        t = t.movedim(bdim, dim)
    return t.reshape(*t.shape[:dim], -1, *t.shape[dim + 2:])


def _batch_size(in_dims, args):
    for d, t in zip(in_dims, args):
        if d is not None and isinstance(t, torch.Tensor):
            return t.shape[d]
    raise AssertionError("vmap rule called with no batched input")


def _statistics(ctx, output):
    """The (mean, invstd) of a BatchNorm Function's (y, mean, invstd) output, marked not
    differentiable, and no zero [C] gradients materialised for them: backward then gets None
    for them (and for an undefined gradient of y). For BatchNormFn and BatchNormReluFn."""
    _, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    ctx.set_materialize_grads(False)
    return mean, invstd


class BatchNormFn(torch.autograd.Function):
    """(x [N, C, ...], weight [C] or None, bias [C] or None, eps, kernel) -> (y, mean, invstd).
    kernel: the backend's fused batch_norm_double_backward for products (None: the formula)."""

    @staticmethod
    def forward(x, weight, bias, eps, kernel=None):
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, kernel = inputs
        mean, invstd = _statistics(ctx, output)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.has_bias, ctx.kernel = eps, bias is not None, kernel

    @staticmethod
    def backward(ctx, gy, _gmean, _ginvstd):
        if gy is None:  # an undefined gradient for y (gradcheck passes one)
            return None, None, None, None, None
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = BatchNormBackwardFn.apply(gy, x, weight, mean, invstd, ctx.eps,
                                               ctx.has_bias, ctx.kernel)
        return gx, gw, gb, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps, kernel=None):
        B = _batch_size(in_dims, (x, weight, bias))
        xf = _fold(x, in_dims[0], B, 1)  # [N, B*C, ...]
        N = xf.shape[0]
        wf = _fold(weight, in_dims[1], B, 0)
        bf = _fold(bias, in_dims[2], B, 0)
        y, mean, invstd = BatchNormFn.apply(xf, wf, bf, eps, kernel)
        y = y.view(N, B, -1, *y.shape[2:])
        return (y, mean.view(B, -1), invstd.view(B, -1)), (1, 0, 0)


class BatchNormBackwardFn(torch.autograd.Function):
    """(gy, x, weight, mean, invstd, eps, has_bias, kernel) -> (gx, gweight, gbias): ATen's
    fused BatchNorm backward. Its own backward is `kernel` (a backend's fused
    batch_norm_double_backward) when no graph is being built, as in every product, and
    batch_norm_double_backward's differentiable formula otherwise."""

    @staticmethod
    def forward(gy, x, weight, mean, invstd, eps, has_bias, kernel=None):
        affine = weight is not None
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, [True, affine, affine and has_bias])
        return gx, gw, gb

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, weight, mean, invstd, eps, _, kernel = inputs
        ctx.save_for_backward(gy, x, weight, mean, invstd)
        ctx.eps, ctx.kernel = eps, kernel

    @staticmethod
    def backward(ctx, a, b, c):
        gy, x, weight, mean, invstd = ctx.saved_tensors
        if ctx.kernel is not None and not torch.is_grad_enabled():
            dgy, dx, dw = ctx.kernel(a, b, c, gy, x, mean, invstd, weight)
        else:
            dgy, dx, dw = batch_norm_double_backward(a, b, c, gy, x, mean, invstd, weight, ctx.eps)
        return dgy, dx, dw, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, gy, x, weight, mean, invstd, eps, has_bias, kernel=None):
        B = _batch_size(in_dims, (gy, x, weight, mean, invstd))
        xf = _fold(x, in_dims[1], B, 1)
        N = xf.shape[0]
        gx, gw, gb = BatchNormBackwardFn.apply(
            _fold(gy, in_dims[0], B, 1), xf,
            _fold(weight, in_dims[2], B, 0), _fold(mean, in_dims[3], B, 0),
            _fold(invstd, in_dims[4], B, 0), eps, has_bias, kernel)
        gx = gx.view(N, B, -1, *gx.shape[2:])
        return ((gx, None if gw is None else gw.view(B, -1), None if gb is None else gb.view(B, -1)),
                (1, None if gw is None else 0, None if gb is None else 0))


# ---- BatchNorm followed by ReLU, first derivatives only (the engine's plain gradients) -------

def bn_relu_forward_ref(x, weight, bias, eps):
    """relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)) with its batch
    statistics: (y, mean [C], invstd [C]), invstd = 1/sqrt(biased var + eps). The reference of
    the backends' bn_relu_forward kernels (same signature)."""
    var, mean = torch.var_mean(x, _per_channel(x)[0], correction=0)
    invstd = torch.rsqrt(var + eps)
    return _bn_relu_pre(x, mean, invstd, weight, bias).clamp_min(0), mean, invstd


def _bn_relu_pre(x, mean, invstd, weight, bias):
    """The pre-activation (x - mean) invstd w + b, per channel (dim 1)."""
    shape = _per_channel(x)[1]
    z = (x - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        z = z * weight.view(shape)
    return z if bias is None else z + bias.view(shape)


def bn_relu_backward_ref(gy, x, mean, invstd, weight, bias, output_mask):
    """The gradients (gx, gweight, gbias) of bn_relu_forward_ref's y for the output gradient
    gy, each None where output_mask (three bools) says so or the parameter is None. The ReLU
    mask is recomputed from x (pre-activation > 0, as ATen's ReLU backward tests its output
    > 0). The reference of the backends' bn_relu_backward kernels (same signature)."""
    dims, shape = _per_channel(x)
    g = torch.where(_bn_relu_pre(x, mean, invstd, weight, bias) > 0, gy, 0)
    xh = (x - mean.view(shape)) * invstd.view(shape)
    sg, sgx = g.sum(dims), (g * xh).sum(dims)
    gx = gw = gb = None
    if output_mask[0]:
        M = x.numel() // x.shape[1]
        wr = invstd if weight is None else weight * invstd
        gx = wr.view(shape) * (g - (sg / M).view(shape) - xh * (sgx / M).view(shape))
    if output_mask[1] and weight is not None:
        gw = sgx
    if output_mask[2] and bias is not None:
        gb = sg
    return gx, gw, gb


class BatchNormReluFn(torch.autograd.Function):
    """(x [N, C, ...], weight [C] or None, bias [C] or None, eps, ops) -> y =
    relu(batch_norm(x)) with batch statistics, in one forward and one backward call: ops is a
    backend's (bn_relu_forward, bn_relu_backward) pair (None: the references above). For
    gradients taken once: its backward is not differentiable again (products keep
    BatchNormFn and ATen's ReLU, whose second derivatives are written out)."""

    @staticmethod
    def forward(x, weight, bias, eps, ops=None):
        fwd = ops[0] if ops is not None else bn_relu_forward_ref
        y, mean, invstd = fwd(x, weight, bias, eps)
        return y, mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, ops = inputs
        mean, invstd = _statistics(ctx, output)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.ops = ops

    @staticmethod
    def backward(ctx, gy, _gmean, _ginvstd):
        if gy is None:  # an undefined gradient for y (gradcheck passes one)
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is coming
            raise RuntimeError(
                "batch_norm_relu (BatchNormReluFn) has first derivatives only, and this "
                "backward pass builds a graph (create_graph=True) for higher ones: use "
                "F.relu(F.batch_norm(...)) (or imaml_fast.layers.batch_norm) there")
        x, weight, bias, mean, invstd = ctx.saved_tensors
        bwd = ctx.ops[1] if ctx.ops is not None else bn_relu_backward_ref
        gx, gw, gb = bwd(gy.contiguous(), x, mean, invstd, weight, bias,
                         tuple(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None, None


def batch_norm_relu(x, weight=None, bias=None, eps: float = 1e-5, ops=None) -> torch.Tensor:
    """F.relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)) as one layer
    (BatchNormReluFn), first derivatives only; ops: a backend's (bn_relu_forward,
    bn_relu_backward) kernels. Refuses what F.batch_norm refuses in training (one value per
    channel), with its error."""
    F._verify_batch_size(x.size())
    return BatchNormReluFn.apply(x, weight, bias, eps, ops)[0]


def _conv_args(dims: int, stride, padding, dilation):
    def as_list(v):
        return list(v) if isinstance(v, (tuple, list)) else [int(v)] * dims
    return as_list(stride), as_list(padding), as_list(dilation)


class ConvFn(torch.autograd.Function):
    """(x [N, C, *spatial], weight [O, C/groups, *kernel], bias [O] or None, stride, padding,
    dilation, groups, kernel) -> y: ATen's convolution; its backward is ConvBackwardFn.
    kernel: a backend's conv_input_grad for the input gradients (None: ATen's)."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups, kernel=None):
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False,
                                          [0] * len(stride), groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups, kernel = inputs
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.kernel = kernel

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.needs_input_grad[2] and ctx.has_bias)
        gx, gw, gb = ConvBackwardFn.apply(gy, x, weight, ctx.conv, mask, ctx.kernel)
        return gx, gw, gb, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, stride, padding, dilation, groups, kernel=None):
        B = _batch_size(in_dims, (x, weight, bias))
        if in_dims[1] is None and in_dims[2] is None:
            # shared weights: the tasks are more samples, [B*N, C, ...]
            xb = x.movedim(in_dims[0], 0)
            y = ConvFn.apply(xb.reshape(-1, *xb.shape[2:]), weight, bias, stride, padding,
                             dilation, groups, kernel)
            return y.view(B, -1, *y.shape[1:]), 0
        # per-task weights: the tasks are more groups, [N, B*C, ...] with weights [B*O, ...]
        xf = _fold(x, in_dims[0], B, 1)
        y = ConvFn.apply(xf, _fold(weight, in_dims[1], B, 0), _fold(bias, in_dims[2], B, 0),
                         stride, padding, dilation, groups * B, kernel)
        return y.view(y.shape[0], B, -1, *y.shape[2:]), 1


def _kernel_applies(kernel, x, weight, stride, groups) -> bool:
    """Whether a backend's conv_input_grad would run its kernel for this convolution (its
    `applies` predicate; a kernel without one is taken to apply everywhere)."""
    if kernel is None:
        return False
    applies = getattr(kernel, "applies", None)
    return applies is None or applies(x, weight, stride, groups)


class ConvBackwardFn(torch.autograd.Function):
    """(gy, x, weight, conv, mask, kernel) -> (gx, gweight, gbias), each None where mask says
    so: ATen's convolution_backward, with the input gradient by `kernel` (a backend's
    conv_input_grad) when there is one. Its backward, for cotangents (A, B, c) of the three:
        d/dgy = conv(A, weight) + conv(x, B) + c,   d/dweight = wgrad(input A, gy),
        d/dx = igrad(gy, weight B)
    (each output is bilinear in two inputs), the last two in one convolution_backward call.
    ATen's own double backward of a grouped convolution runs one convolution per group for
    the weight term: per task, once the tasks are groups."""

    @staticmethod
    def forward(gy, x, weight, conv, mask, kernel=None):
        stride, padding, dilation, groups = conv
        # the input gradient by the kernel where it runs, everything else in one ATen call
        by_kernel = mask[0] and _kernel_applies(kernel, x, weight, stride, groups)
        aten_mask = [mask[0] and not by_kernel, mask[1], mask[2]]
        if by_kernel and not any(aten_mask):
            return kernel(gy, x, weight, stride, padding, dilation, groups), None, None
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, weight, [weight.shape[0]] if mask[2] else None, stride, padding, dilation,
            False, [0] * len(stride), groups, aten_mask)
        if by_kernel:
            gx = kernel(gy, x, weight, stride, padding, dilation, groups)
        return gx, gw, gb

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, weight, conv, mask, kernel = inputs
        ctx.save_for_backward(gy, x, weight)
        ctx.conv = conv
        ctx.kernel = kernel

    @staticmethod
    def backward(ctx, A, B, c):  # ATen ops (or the kernel, outside grad mode): differentiable
        gy, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        dgy = dx = dw = None
        if need_gy:
            terms = []
            if A is not None:
                terms.append(torch.ops.aten.convolution(A, weight, c, stride, padding, dilation,
                                                        False, [0] * len(stride), groups))
                c = None
            if B is not None:
                terms.append(torch.ops.aten.convolution(x, B, c, stride, padding, dilation, False,
                                                        [0] * len(stride), groups))
                c = None
            if c is not None:
                terms.append(c.view(1, -1, *([1] * (gy.dim() - 2))).expand_as(gy))
            dgy = sum(terms[1:], terms[0]) if terms else torch.zeros_like(gy)
        want_x, want_w = need_x and B is not None, need_w and A is not None
        if (want_x and not torch.is_grad_enabled()
                and _kernel_applies(ctx.kernel, x, weight, stride, groups)):
            # no graph being built: the kernel's d/dx, then d/dweight alone
            dx = ctx.kernel(gy, x, B, stride, padding, dilation, groups)
            want_x = False
        if want_x or want_w:
            # igrad with weight B (d/dx), wgrad with input A (d/dweight): one call
            gx, dw, _ = torch.ops.aten.convolution_backward(
                gy, A if A is not None else x, B if B is not None else weight, None, stride,
                padding, dilation, False, [0] * len(stride), groups, [want_x, want_w, False])
            dx = gx if want_x else dx
        if need_x and dx is None:
            dx = torch.zeros_like(x)
        if need_w and dw is None:
            dw = torch.zeros_like(weight)
        return dgy, dx, dw, None, None, None

    @staticmethod
    def vmap(info, in_dims, gy, x, weight, conv, mask, kernel=None):
        # always the per-task-groups form: every task has its own weight gradient
        B = _batch_size(in_dims, (gy, x, weight))
        stride, padding, dilation, groups = conv
        gx, gw, gb = ConvBackwardFn.apply(
            _fold(gy, in_dims[0], B, 1), _fold(x, in_dims[1], B, 1), _fold(weight, in_dims[2], B, 0),
            (stride, padding, dilation, groups * B), mask, kernel)
        out = (None if gx is None else gx.view(gx.shape[0], B, -1, *gx.shape[2:]),
               None if gw is None else gw.view(B, -1, *gw.shape[1:]),
               None if gb is None else gb.view(B, -1))
        return out, (None if gx is None else 1, None if gw is None else 0,
                     None if gb is None else 0)


# torch.autograd.Function.apply binds its arguments to forward's signature on every call,
# and inspect.signature is recomputed each time (about 0.1 ms; an Omniglot meta-step makes some
# 60 such calls). inspect.signature returns a function's __signature__ when it is set: one
# computed now is the same signature, so the binding stays what torch does, only cheaper
# (about 5% of a host-bound 5-way meta-step, where the arithmetic is negligible).
for _fn in (BatchNormFn, BatchNormBackwardFn, BatchNormReluFn, ConvFn, ConvBackwardFn):
    _fn.forward.__signature__ = inspect.signature(_fn.forward)
del _fn


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, kernel=None):
    """F.conv1d/2d/3d (numeric padding) with the closed-form second derivative; kernel: a
    backend's conv_input_grad for the input gradients (None: ATen's)."""
    dims = weight.dim() - 2
    stride, padding, dilation = _conv_args(dims, stride, padding, dilation)
    return ConvFn.apply(x, weight, bias, stride, padding, dilation, groups, kernel)


def conv_input_grad_ref(gy, x, weight, stride, padding, dilation, groups):
    """The input gradient of F.conv1d/2d/3d(x, weight, None, stride, padding, dilation,
    groups) for the output gradient gy: ATen's convolution_backward with output_mask
    [True, False, False] (x's values are not used, only its shape and layout). The reference
    of the backends' conv_input_grad kernels (same signature; stride, padding, dilation as
    lists)."""
    return torch.ops.aten.convolution_backward(
        gy, x, weight, None, list(stride), list(padding), list(dilation), False,
        [0] * len(stride), groups, [True, False, False])[0]


def batch_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, kernel=None) -> torch.Tensor:
    """F.batch_norm with batch statistics (training=True, no running statistics), with the
    closed-form second derivative."""
    return BatchNormFn.apply(x, weight, bias, eps, kernel)[0]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta"): off
        return False


def _mixed_ok(x, t) -> bool:
    """A bf16/fp16 activation with fp32 weights (what autocast hands BatchNorm): ATen's fused
    kernels take it, and the formula computes in fp32 (autograd casts the gradients back)."""
    return x.dtype in (torch.bfloat16, torch.float16) and t.dtype == torch.float32


class closed_form_layers(TorchFunctionMode):
    """Within this mode F.conv1d/2d/3d run `conv` and F.batch_norm with batch statistics runs
    `batch_norm`; every other call is left alone. Under autocast a convolution's inputs are
    cast to the autocast dtype first, as autocast itself does, and BatchNorm takes a
    bf16/fp16 activation with fp32 weights. Inputs these do not cover (running statistics,
    string padding, other mixed dtypes) pass through unchanged.
    bn_kernel: a backend's fused batch_norm_double_backward (same signature) to run in
    products; None runs the formula in PyTorch ops.
    conv_kernel: a backend's conv_input_grad (same signature as conv_input_grad_ref) for the
    convolutions' input gradients, first and second derivatives alike; None: ATen's.
    batch_norm=False leaves F.batch_norm to ATen (the engine's plain gradients: only the
    convolutions' input gradients gain there)."""

    def __init__(self, bn_kernel=None, conv_kernel=None, batch_norm=True):
        super().__init__()
        self.bn_kernel = bn_kernel
        self.conv_kernel = conv_kernel
        self.batch_norm = batch_norm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS:
            a = _CONV_SIGNATURE.bind(*args, **kwargs).arguments
            x, w, b = a["input"], a["weight"], a.get("bias")
            if (not isinstance(a.get("padding", 0), str) and x.dim() == w.dim()
                    and (self.batch_norm or self._kernel_may_run(x, w, a))):
                args = (a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1),
                        a.get("groups", 1))
                dev = x.device.type
                if _autocast_on(dev) and x.is_floating_point():
                    # what autocast does for a convolution: every floating input in the
                    # autocast dtype; the casts are differentiable, so gradients reach the
                    # full-precision weights as they would through ATen's convolution
                    dt = torch.get_autocast_dtype(dev)
                    x, w, b = (None if t is None else t.to(dt) for t in (x, w, b))
                    with torch.autocast(dev, enabled=False):
                        return conv(x, w, b, *args, kernel=self.conv_kernel)
                if all(t is None or t.dtype == x.dtype for t in (w, b)):
                    return conv(x, w, b, *args, kernel=self.conv_kernel)
        if func is F.batch_norm and self.batch_norm:
            a = _BN_SIGNATURE.bind(*args, **kwargs).arguments
            x, w, b = a["input"], a.get("weight"), a.get("bias")
            if (a.get("training", False) and a.get("running_mean") is None
                    and a.get("running_var") is None and x.dim() >= 2
                    and all(t is None or t.dtype == x.dtype or _mixed_ok(x, t) for t in (w, b))):
                return batch_norm(x, w, b, a.get("eps", 1e-5), self.bn_kernel)
        return func(*args, **kwargs)

    def _kernel_may_run(self, x, w, a) -> bool:
        """Routing only for the convolution kernel (batch_norm=False): whether it may run
        for this call. Under a torch.func transform (vmap's per-task call, whose rule folds
        the tasks into groups) it may; a plain call is asked about as it is."""
        if self.conv_kernel is None:
            return False
        if functorch_wrapped(x):
            return True
        stride = _conv_args(w.dim() - 2, a.get("stride", 1), 0, 1)[0]
        return _kernel_applies(self.conv_kernel, x, w, stride, a.get("groups", 1))

"""imaml_fast.layers: BatchNorm with batch statistics and a closed-form second derivative,
against autograd's own derivatives of F.batch_norm (float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import CUDA_BACKENDS, require_cuda_backend
from imaml_fast import IMAMLConfig, meta_gradient
from imaml_fast.layers import (BatchNormFn, batch_norm, batch_norm_double_backward,
                               closed_form_layers)

D = torch.float64
EPS = 1e-5


def _autograd_double_backward(x, w, b, gy, a, bw, cb):
    """(d/dgy, d/dx, d/dweight) of <a, gx> + <bw, gweight> + <cb, gbias>, by autograd."""
    x = x.clone().requires_grad_(True)
    gy = gy.clone().requires_grad_(True)
    ins = [x] + [t.clone().requires_grad_(True) for t in (w, b) if t is not None]
    wl = ins[1] if w is not None else None
    bl = ins[2] if b is not None else None
    y = F.batch_norm(x, None, None, wl, bl, True, 0.0, EPS)
    firsts = torch.autograd.grad(y, ins, gy, create_graph=True)
    cots = [a, bw, cb][:len(firsts)]
    pairs = [(f, c) for f, c in zip(firsts, cots) if c is not None]
    wrt = [gy, x] + ([wl] if wl is not None else [])
    return torch.autograd.grad([f for f, _ in pairs], wrt, [c for _, c in pairs],
                               allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("shape", [(5, 3, 4, 6), (7, 4), (3, 5, 9), (1, 2, 3, 3)])
@pytest.mark.parametrize("affine,missing", [(True, "none"), (True, "a"), (True, "b"),
                                            (True, "c"), (False, "none")])
def test_double_backward_formula_matches_autograd(shape, affine, missing):
    g = torch.Generator().manual_seed(sum(shape))
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=D) * 2 + 0.5
    w = torch.randn(C, generator=g, dtype=D) if affine else None
    b = torch.randn(C, generator=g, dtype=D) if affine else None
    gy = torch.randn(shape, generator=g, dtype=D)
    a = torch.randn(shape, generator=g, dtype=D)
    bw = torch.randn(C, generator=g, dtype=D) if affine else None
    cb = torch.randn(C, generator=g, dtype=D) if affine else None
    if missing == "a":
        a = None
    elif missing == "b":
        bw = None
    elif missing == "c":
        cb = None
    want = _autograd_double_backward(x, w, b, gy, a, bw, cb)
    _, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, EPS)
    got = batch_norm_double_backward(a, bw, cb, gy, x, mean, invstd, w)
    assert torch.allclose(got[0], want[0], rtol=1e-10, atol=1e-11)
    assert torch.allclose(got[1], want[1], rtol=1e-10, atol=1e-11)
    if affine:
        assert torch.allclose(got[2], want[2], rtol=1e-10, atol=1e-11)
    else:
        assert got[2] is None


def _hvp_through(fn, params, v):
    """Hessian-vector product of fn(params) (scalar) through a kept graph."""
    params = [p.clone().requires_grad_(True) for p in params]
    g = torch.autograd.grad(fn(*params), params, create_graph=True)
    return torch.autograd.grad(g, params, v)


def test_function_values_gradients_and_hvp_match_f_batch_norm():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=D)
    w, b = torch.randn(3, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
    t = torch.randn(4, 3, 5, 5, generator=g, dtype=D)

    def loss(bn):  # a nonlinear scalar of BatchNorm's output, so the Hessian is not trivial
        return lambda x, w, b: (torch.tanh(bn(x, w, b)) * t).sum()

    ours = loss(lambda x, w, b: batch_norm(x, w, b, EPS))
    ref = loss(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, EPS))
    assert torch.allclose(ours(x, w, b), ref(x, w, b), rtol=1e-13)
    v = [torch.randn(x.shape, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D),
         torch.randn(3, generator=g, dtype=D)]
    for got, want in zip(_hvp_through(ours, [x, w, b], v), _hvp_through(ref, [x, w, b], v)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (1, 0, 0), (0, None, None), (None, 0, 0)])
def test_vmap_rule_is_per_task_batch_norm(in_dims):
    """vmap folds tasks into channels: the same numbers as a loop of per-task F.batch_norm,
    for values, gradients and Hessian-vector products, whichever dims are batched."""
    T, N, C = 3, 4, 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, N, C, 3, 3, generator=g, dtype=D)
    w, b = torch.randn(T, C, generator=g, dtype=D), torch.randn(T, C, generator=g, dtype=D)
    if in_dims[1] is None:
        w, b = w[0], b[0]
    xin = {0: x, 1: x.movedim(0, 1).contiguous(), None: x[0]}[in_dims[0]]
    t = torch.randn(T, N, C, 3, 3, generator=g, dtype=D)

    def ours(xin, w, b):
        y = torch.vmap(lambda xx, ww, bb: batch_norm(xx, ww, bb, EPS), in_dims=in_dims)(xin, w, b)
        return (torch.tanh(y) * t).sum()

    def loop(xin, w, b):
        xs = {0: xin, 1: xin.movedim(1, 0) if xin.dim() == 5 else xin,
              None: xin.expand(T, *xin.shape)}[in_dims[0]]
        ys = [F.batch_norm(xs[i], None, None, w[i] if w.dim() == 2 else w,
                           b[i] if b.dim() == 2 else b, True, 0.0, EPS) for i in range(T)]
        return (torch.tanh(torch.stack(ys)) * t).sum()

    assert torch.allclose(ours(xin, w, b), loop(xin, w, b), rtol=1e-13)
    v = [torch.randn(p.shape, generator=g, dtype=D) for p in (xin, w, b)]
    for got, want in zip(_hvp_through(ours, [xin, w, b], v), _hvp_through(loop, [xin, w, b], v)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def _plain_batch_norm(x, w):
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + EPS) * w.view(1, -1, 1, 1)


@pytest.mark.parametrize("layer", ["batch_norm", "conv"])
def test_third_derivatives_match_autograd(layer):
    """A product differentiated once more (create_graph=True) is right, not silently
    missing the batch statistics' dependence on x. The BatchNorm reference is written in
    plain differentiable ops: ATen's own third derivative of F.batch_norm is wrong (in torch
    2.13 it disagrees with finite differences of its second derivative; ours agrees)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 2, 5, 5, generator=g, dtype=D)
    if layer == "batch_norm":
        w = torch.randn(2, generator=g, dtype=D)
        ours = lambda x, w: batch_norm(x, w, None, EPS)  # noqa: E731
        ref = _plain_batch_norm
    else:
        w = torch.randn(3, 2, 3, 3, generator=g, dtype=D)
        ours = lambda x, w: conv(x, w, None, 2, 1)  # noqa: E731
        ref = lambda x, w: F.conv2d(x, w, None, 2, 1)  # noqa: E731
    t = torch.randn(ours(x, w).shape, generator=g, dtype=D)
    v = [torch.randn(x.shape, generator=g, dtype=D), torch.randn(w.shape, generator=g, dtype=D)]

    def third(f):
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        first = torch.autograd.grad((torch.tanh(f(xl, wl)) * t).sum(), (xl, wl), create_graph=True)
        hv = torch.autograd.grad(first, (xl, wl), v, create_graph=True)
        return torch.autograd.grad(sum((h * h).sum() for h in hv), (xl, wl))

    for a_, b_ in zip(third(ours), third(ref)):
        assert torch.allclose(a_, b_, rtol=1e-9, atol=1e-11)


def test_mode_routes_only_batch_statistics():
    x = torch.randn(6, 3, 4, 4, dtype=D)
    bn = nn.BatchNorm2d(3, track_running_stats=False).double()
    with closed_form_layers():
        y = bn(x)
    assert "BatchNormFn" in str(y.grad_fn)
    assert torch.allclose(y, F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    # running statistics: passed through to ATen, which updates them
    tracked = nn.BatchNorm2d(3).double()
    with closed_form_layers():
        tracked(x)
    assert torch.allclose(tracked.running_mean, 0.1 * x.mean((0, 2, 3)))
    # eval mode with running statistics: ATen's, unchanged semantics
    tracked.eval()
    with closed_form_layers():
        y = tracked(x)
    assert torch.allclose(y, F.batch_norm(x, tracked.running_mean, tracked.running_var,
                                          tracked.weight, tracked.bias, False, 0.0, tracked.eps))


def _omniglot_like():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3), nn.BatchNorm1d(3, track_running_stats=False)).double()
    g = torch.Generator().manual_seed(3)
    T = 4
    xs = torch.randn(T, 6, 1, 8, 8, generator=g, dtype=D)
    xq = torch.randn(T, 5, 1, 8, 8, generator=g, dtype=D)
    ys = torch.randint(0, 3, (T, 6), generator=g)
    yq = torch.randint(0, 3, (T, 5), generator=g)
    return model, (xs, ys, xq, yq)


def _assert_same_meta_gradient(first, *others, rtol=1e-9, atol=1e-12):
    """Every meta-gradient tensor of `first` close to the same one of each of `others`."""
    for other in others:
        for n in first.grads:
            assert torch.allclose(first.grads[n], other.grads[n], rtol=rtol, atol=atol), n


@pytest.mark.parametrize("hvp", ["revrev", "fwdrev"])
@pytest.mark.parametrize("task_batching", ["vmap", "loop", 3])
def test_meta_gradient_same_with_either_layer_derivatives(hvp, task_batching):
    """The engine with closed-form BatchNorm derivatives (default) gives the meta-gradient of
    ATen's layers and of the sequential reference, including BatchNorm1d after a Linear."""
    model, ep = _omniglot_like()
    cfg = IMAMLConfig(inner_steps=3, cg_steps=4, lam=1.0, inner_lr=0.1, hvp=hvp,
                      backend="torch", task_batching=task_batching)
    ours = meta_gradient(model, F.cross_entropy, *ep, cfg)
    aten = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(layer_derivatives="autograd"))
    ref = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(backend="reference"))
    _assert_same_meta_gradient(ours, aten, ref)


def test_hf_inner_solver_with_closed_form_layers():
    model, ep = _omniglot_like()
    cfg = IMAMLConfig(inner_solver="hf", inner_steps=2, cg_steps=3, lam=1.0, backend="torch")
    ours = meta_gradient(model, F.cross_entropy, *ep, cfg)
    ref = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(backend="reference"))
    _assert_same_meta_gradient(ours, ref, rtol=1e-8, atol=1e-11)


def test_config_rejects_unknown_layer_derivatives():
    with pytest.raises(ValueError, match="layer_derivatives.*closed_form"):
        IMAMLConfig(layer_derivatives="fused")


def test_batchnormfn_returns_batch_statistics():
    x = torch.randn(5, 3, 2, 2, dtype=D)
    y, mean, invstd = BatchNormFn.apply(x, None, None, EPS)
    assert torch.allclose(mean, x.mean((0, 2, 3)))
    assert torch.allclose(invstd, 1 / torch.sqrt(x.var((0, 2, 3), unbiased=False) + EPS))


# ---- convolution -------------------------------------------------------------------------
from imaml_fast.layers import conv  # noqa: E402

CONV_CASES = [  # (x shape, weight shape, stride, padding, dilation, groups)
    ((3, 4, 9, 9), (6, 4, 3, 3), 2, 1, 1, 1),
    ((2, 4, 8, 7), (6, 2, 3, 2), 1, (1, 0), 1, 2),
    ((2, 3, 10, 10), (3, 1, 3, 3), 1, 2, 2, 3),
    ((2, 3, 11), (5, 3, 4), 3, 1, 1, 1),              # conv1d
    ((1, 2, 5, 5, 4), (4, 2, 3, 3, 2), 1, 1, 1, 1),   # conv3d
]


def _f_conv(x, w, b, stride, padding, dilation, groups):
    f = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    return f(x, w, b, stride, padding, dilation, groups)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_values_gradients_and_hvp_match_aten(case, bias):
    xs, ws, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(len(xs) + ws[0])
    x = torch.randn(xs, generator=g, dtype=D)
    w = torch.randn(ws, generator=g, dtype=D)
    b = torch.randn(ws[0], generator=g, dtype=D) if bias else None
    y0 = _f_conv(x, w, b, stride, padding, dilation, groups)
    t = torch.randn(y0.shape, generator=g, dtype=D)

    def loss(c):  # tanh makes the Hessian in x and w non-trivial (a conv alone is bilinear)
        return lambda x, w, *b: (torch.tanh(c(x, w, b[0] if b else None, stride, padding,
                                                dilation, groups)) * t).sum()

    params = [x, w] + ([b] if bias else [])
    assert torch.allclose(conv(x, w, b, stride, padding, dilation, groups), y0, rtol=1e-13)
    v = [torch.randn(p.shape, generator=g, dtype=D) for p in params]
    got = _hvp_through(loss(conv), params, v)
    want = _hvp_through(loss(_f_conv), params, v)
    for a_, b_ in zip(got, want):
        assert torch.allclose(a_, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["A", "B", "c"])
def test_conv_double_backward_with_one_cotangent(which):
    """Each cotangent of (gx, gweight, gbias) alone, as when only some first derivatives
    feed the loss."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    gy = torch.randn(2, 4, 3, 3, generator=g, dtype=D, requires_grad=True)
    cot = {"A": torch.randn(x.shape, generator=g, dtype=D),
           "B": torch.randn(w.shape, generator=g, dtype=D),
           "c": torch.randn(4, generator=g, dtype=D)}[which]
    idx = "ABc".index(which)
    outs = []
    for f in (conv, _f_conv):
        y = f(x, w, b, 2, 1, 1, 2)
        first = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)[idx]
        outs.append(torch.autograd.grad(first, (gy, x, w), cot, allow_unused=True,
                                        materialize_grads=True))
    for a_, b_ in zip(*outs):
        assert torch.allclose(a_, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared,x_dim", [(False, 0), (False, 1), (True, 0), (True, 1),
                                           (False, None)])
def test_conv_vmap_rule_matches_a_loop(shared, x_dim):
    """vmap over tasks: per-task weights become groups, shared weights more samples; values
    and Hessian-vector products equal a loop of per-task F.conv2d."""
    T, N = 3, 2
    g = torch.Generator().manual_seed(8)
    x = torch.randn(T, N, 2, 7, 7, generator=g, dtype=D)
    w = torch.randn(T, 4, 2, 3, 3, generator=g, dtype=D)
    b = torch.randn(T, 4, generator=g, dtype=D)
    if shared:
        w, b = w[0], b[0]
    if x_dim is None:  # the same images for every task
        x = x[:1].expand(T, -1, -1, -1, -1)
    xin = x.movedim(0, 1).contiguous() if x_dim == 1 else (x[0] if x_dim is None else x)
    t = torch.randn(T, N, 4, 4, 4, generator=g, dtype=D)
    wd = None if shared else 0

    def ours(xin, w, b):
        y = torch.vmap(lambda xx, ww, bb: conv(xx, ww, bb, 2, 1), in_dims=(x_dim, wd, wd))(xin, w, b)
        return (torch.tanh(y) * t).sum()

    def loop(xin, w, b):
        xs = xin.movedim(1, 0) if x_dim == 1 else (xin.expand(T, -1, -1, -1, -1)
                                                    if x_dim is None else xin)
        ys = [F.conv2d(xs[i], w if shared else w[i], b if shared else b[i], 2, 1) for i in range(T)]
        return (torch.tanh(torch.stack(ys)) * t).sum()

    assert torch.allclose(ours(xin, w, b), loop(xin, w, b), rtol=1e-13)
    v = [torch.randn(p.shape, generator=g, dtype=D) for p in (xin, w, b)]
    for got, want in zip(_hvp_through(ours, [xin, w, b], v), _hvp_through(loop, [xin, w, b], v)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_conv_backward_under_vmap_of_grad():
    """Per-task gradients by torch.func (vmap over grad) run ConvBackwardFn's vmap rule."""
    T = 3
    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, 2, 2, 6, 6, generator=g, dtype=D)
    w = torch.randn(T, 3, 2, 3, 3, generator=g, dtype=D)

    def f(c):
        return lambda w, x: torch.tanh(c(x, w, None, 1, 1)).pow(2).sum()

    ours = torch.vmap(torch.func.grad(f(conv)))(w, x)
    want = torch.vmap(torch.func.grad(f(lambda x, w, b, s, p: F.conv2d(x, w, b, s, p))))(w, x)
    assert torch.allclose(ours, want, rtol=1e-12)


def test_mode_routes_numeric_padding_convolutions_only():
    x = torch.randn(2, 3, 6, 6, dtype=D, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=D, requires_grad=True)
    with closed_form_layers():
        y = F.conv2d(x, w, None, 1, 1)
        same = F.conv2d(x, w, None, 1, "same")
    assert "ConvFn" in str(y.grad_fn)
    assert "ConvFn" not in str(same.grad_fn)
    assert torch.allclose(y, same)


def test_backend_kernel_runs_products_and_formula_runs_graphs():
    """A backend's fused BatchNorm double backward is called for products (no graph being
    built) and never where the result must be differentiable again."""
    calls = []

    def kernel(*args):
        calls.append(torch.is_grad_enabled())
        return batch_norm_double_backward(*args)

    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 3, 3, generator=g, dtype=D, requires_grad=True)
    bn = nn.BatchNorm2d(3, track_running_stats=False).double()
    t = torch.randn(4, 3, 3, 3, generator=g, dtype=D)
    with closed_form_layers(bn_kernel=kernel):
        y = bn(x)
    (gx,) = torch.autograd.grad((torch.tanh(y) * t).sum(), x, create_graph=True)
    u = torch.randn(x.shape, generator=g, dtype=D)
    (hx,) = torch.autograd.grad(gx, x, u, retain_graph=True)
    assert calls == [False]
    y2 = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    (gx2,) = torch.autograd.grad((torch.tanh(y2) * t).sum(), x, create_graph=True)
    assert torch.allclose(hx, torch.autograd.grad(gx2, x, u)[0], rtol=1e-10)
    torch.autograd.grad(gx, x, u, create_graph=True)  # a graph: the formula, not the kernel
    assert calls == [False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_meta_gradient_on_gpu_same_with_either_layer_derivatives(backend):
    """On CUDA (cuDNN's grouped convolutions, the GPU BatchNorm kernels in products)."""
    require_cuda_backend(backend, D)
    model, ep = _omniglot_like()
    model = model.cuda()
    ep = tuple(t.cuda() for t in ep)
    cfg = IMAMLConfig(inner_steps=3, cg_steps=4, lam=1.0, inner_lr=0.1, backend=backend)
    ours = meta_gradient(model, F.cross_entropy, *ep, cfg)
    aten = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(layer_derivatives="autograd"))
    _assert_same_meta_gradient(ours, aten)


def test_dense_hessians_through_closed_form_layers():
    """cg_dense="always" materialises each task's Hessian with batched products
    (autograd.grad(is_grads_batched=True), a vmap over the second backward): the closed-form
    layers' second derivatives under vmap give the matrix-free path's meta-gradient."""
    model, ep = _omniglot_like()
    cfg = IMAMLConfig(inner_steps=2, cg_steps=6, lam=1.0, inner_lr=0.1, backend="torch",
                      cg_dense="always")
    dense = meta_gradient(model, F.cross_entropy, *ep, cfg)
    free = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(cg_dense="never"))
    aten = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(layer_derivatives="autograd"))
    _assert_same_meta_gradient(dense, free, aten)


def test_conv_under_autocast_is_cast_as_autocast_casts_it():
    """bf16 autocast: the convolution runs on bf16 casts of its inputs (bit-identical to
    ATen's autocast convolution), gradients reach the fp32 tensors, and a Hessian-vector
    product agrees with ATen's at bf16 precision."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 3, 9, 9, generator=g)
    w = torch.randn(6, 3, 3, 3, generator=g) * 0.3
    t = torch.randn(4, 6, 5, 5, generator=g)

    def loss(mode):
        def f(x, w):
            with torch.autocast("cpu", dtype=torch.bfloat16), mode():
                y = F.conv2d(x, w, None, 2, 1)
            assert y.dtype == torch.bfloat16
            return (torch.tanh(y.float()) * t).sum()
        return f

    from contextlib import nullcontext
    wl = w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), closed_form_layers():
        y = F.conv2d(x, wl, None, 2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_aten = F.conv2d(x, wl, None, 2, 1)
    assert "ConvFn" in str(y.grad_fn) and torch.equal(y, y_aten)
    v = [torch.randn(x.shape, generator=g), torch.randn(w.shape, generator=g)]
    ours = _hvp_through(loss(closed_form_layers), [x, w], v)
    aten = _hvp_through(loss(nullcontext), [x, w], v)
    for a_, b_ in zip(ours, aten):
        assert a_.dtype == torch.float32
        assert (a_ - b_).norm() <= 2e-2 * b_.norm()


def test_batch_norm_bf16_activation_with_fp32_weights():
    """What autocast hands BatchNorm: values and gradients bit-identical to ATen's, a product
    within bf16 precision of the float64 answer."""
    from contextlib import nullcontext

    g = torch.Generator().manual_seed(13)
    x = torch.randn(8, 16, 7, 7, generator=g).to(torch.bfloat16)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    t = torch.randn(8, 16, 7, 7, generator=g)

    def run(mode, dtype=None):
        ps = [(p.to(dtype) if dtype else p.clone()).requires_grad_(True) for p in (x, w, b)]
        with mode():
            y = F.batch_norm(ps[0], None, None, ps[1], ps[2], True, 0.0, EPS)
        loss = (torch.tanh(y.to(dtype or torch.float32)) * t.to(dtype or torch.float32)).sum()
        gs = torch.autograd.grad(loss, ps, create_graph=True)
        return y, gs, torch.autograd.grad(gs, ps, [torch.ones_like(q) for q in gs])

    y, gs, hv = run(closed_form_layers)
    assert "BatchNormFn" in str(y.grad_fn) and y.dtype == torch.bfloat16
    y_a, gs_a, _ = run(nullcontext)
    assert torch.equal(y, y_a)
    for p, q in zip(gs, gs_a):
        assert torch.equal(p, q)
    _, _, hv64 = run(nullcontext, torch.float64)
    for p, q in zip(hv, hv64):
        assert p.dtype == (torch.bfloat16 if p.shape == x.shape else torch.float32)
        assert (p.double() - q).norm() / q.norm() < 1e-2


def test_functions_keep_their_signature_for_apply():
    """Function.apply binds arguments with inspect.signature(forward): the cached
    __signature__ must be forward's own, defaults included."""
    import inspect as _inspect
    from imaml_fast import layers as L

    functions = [v for v in vars(L).values() if isinstance(v, type)
                 and issubclass(v, torch.autograd.Function) and v.__module__ == L.__name__]
    assert len(functions) == 5  # every Function of the module has it: none forgotten
    for fn in functions:
        cached = fn.forward.__dict__["__signature__"]
        del fn.forward.__signature__
        try:
            assert _inspect.signature(fn.forward) == cached
        finally:
            fn.forward.__signature__ = cached
    x = torch.randn(4, 3, dtype=torch.float64)
    # kernel left to its default (None) still binds
    y = L.BatchNormFn.apply(x, None, None, 1e-5)[0]
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))


def test_conv_kernel_runs_input_gradients_and_aten_runs_graphs():
    """A backend's conv_input_grad computes the input gradients of ConvFn's backward and of
    its double backward's d/dx where no graph is being built, never where the result must be
    differentiable again; values, gradients and Hessian-vector products equal ATen's."""
    from imaml_fast.backends import cpp
    from imaml_fast.layers import conv_input_grad_ref
    calls = []

    def kernel(*args):
        calls.append(torch.is_grad_enabled())
        return cpp.load_ops()["conv_input_grad"](*args)

    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 6, 9, 9, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, generator=g, dtype=D, requires_grad=True)
    t = torch.randn(3, 8, 5, 5, generator=g, dtype=D)
    u = [torch.randn(p.shape, generator=g, dtype=D) for p in (x, w)]
    outs = []
    for f in (lambda *a: conv(*a, kernel=kernel), _f_conv):
        y = f(x, w, None, 2, 1, 1, 2)
        first = torch.autograd.grad((torch.tanh(y) * t).sum(), (x, w), create_graph=True)
        outs.append(list(first) + list(torch.autograd.grad(first, (x, w), u, retain_graph=True)))
    for a_, b_ in zip(*outs):
        assert torch.allclose(a_, b_, rtol=1e-10, atol=1e-12)
    # the first backward (ConvBackwardFn's forward, whose derivative is its own backward);
    # in the product, ConvBackwardFn's backward (d/dx, no graph being built) and ConvFn's
    # backward again (the cotangent of gy flows on through tanh into y = conv(x, w))
    assert calls == [False] * 3
    y = conv(x, w, None, 2, 1, 1, 2, kernel=kernel)
    (gx,) = torch.autograd.grad((torch.tanh(y) * t).sum(), x, create_graph=True)
    assert calls == [False] * 4
    # a product that builds a graph: ConvBackwardFn's d/dx is ATen's; only ConvFn's backward
    # (inside ConvBackwardFn's forward, differentiated by its own backward) runs the kernel
    (hx,) = torch.autograd.grad(gx, x, u[0], create_graph=True)
    assert calls == [False] * 5 and hx.requires_grad
    (hx2,) = torch.autograd.grad(_f_conv(x, w, None, 2, 1, 1, 2).tanh().mul(t).sum(), x,
                                 create_graph=True)
    assert torch.allclose(hx, torch.autograd.grad(hx2, x, u[0])[0], rtol=1e-10, atol=1e-12)
    gy = torch.randn(3, 8, 5, 5, generator=g, dtype=D)
    assert torch.allclose(kernel(gy, x.detach(), w.detach(), [2, 2], [1, 1], [1, 1], 2),
                          conv_input_grad_ref(gy, x.detach(), w.detach(), [2, 2], [1, 1], [1, 1], 2),
                          rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("task_batching", ["vmap", "loop", 3])
@pytest.mark.parametrize("layer_batching", ["auto", "vmap"])
def test_meta_gradient_with_the_cpp_convolution_input_gradient(monkeypatch, task_batching,
                                                                layer_batching):
    """The cpp backend runs its convolution input-gradient kernel in the inner loop's plain
    gradients and in the products (hand-batched or under vmap: the tasks of a batched call
    are the groups), never for one group (a loop over tasks, a span of one task), and the
    meta-gradient equals the torch backend's (ATen's convolutions) and the reference's."""
    from imaml_fast.backends import cpp
    calls = []
    kernel = cpp.conv2d_input_grad
    monkeypatch.setattr(cpp, "conv2d_input_grad", lambda *a: calls.append(a[6]) or kernel(*a))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3)).double()
    T, K, cg = 4, 3, 4
    g = torch.Generator().manual_seed(5)
    xs, xq = torch.randn(2, T, 3, 1, 14, 14, generator=g, dtype=D)
    y = torch.arange(3).repeat(T, 1)
    # one group of tasks (task_threads=1): the batched calls' sizes are what is checked
    cfg = IMAMLConfig(inner_steps=K, cg_steps=cg, cg_tol=0.0, lam=1.0, inner_lr=0.1,
                      backend="cpp", task_batching=task_batching, layer_batching=layer_batching,
                      task_threads=1)
    ours = meta_gradient(model, F.cross_entropy, xs, y, xq, y, cfg)
    # groups: all T tasks, or the span of 3 (the span of 1 task left goes to ATen); at least
    # one call per inner step and per product (the first convolution's input is data)
    if task_batching == "loop":
        assert calls == []
    else:
        assert set(calls) == {T if task_batching == "vmap" else 3} and len(calls) >= K + cg
    torch_ = meta_gradient(model, F.cross_entropy, xs, y, xq, y, cfg.replace(backend="torch"))
    ref = meta_gradient(model, F.cross_entropy, xs, y, xq, y, cfg.replace(backend="reference"))
    _assert_same_meta_gradient(ours, torch_, ref)


def _graph_names(t, depth=4):
    """The names of the autograd nodes within `depth` steps of t's grad_fn."""
    names, frontier = set(), [t.grad_fn]
    for _ in range(depth):
        frontier = [f for f in frontier if f is not None]
        names.update(type(f).__name__ for f in frontier)
        frontier = [n for f in frontier for n, _ in f.next_functions]
    return names


def test_plain_gradients_route_only_convolutions_the_kernel_takes():
    """closed_form_layers(conv_kernel=..., batch_norm=False), the engine's plain gradients:
    a convolution goes to ConvFn only where the backend's kernel would run (strided, 2+
    groups, or under vmap, whose rule folds the tasks into groups); others, and BatchNorm,
    stay ATen's (one convolution_backward call, no Function overhead)."""
    from imaml_fast.backends import cpp
    kernel = cpp.load_ops()["conv_input_grad"]
    x = torch.randn(2, 4, 8, 8, dtype=D, requires_grad=True)
    w2 = torch.randn(6, 2, 3, 3, dtype=D, requires_grad=True)
    w1 = torch.randn(6, 4, 3, 3, dtype=D, requires_grad=True)
    with closed_form_layers(conv_kernel=kernel, batch_norm=False):
        routed = F.conv2d(x, w2, None, 2, 1, 1, 2)
        one_group = F.conv2d(x, w1, None, 2, 1)
        unstrided = F.conv2d(x, w2, None, 1, 1, 1, 2)
        bn = F.batch_norm(x, None, None, training=True)
        under_vmap = torch.func.vmap(lambda xi, wi: F.conv2d(xi, wi, None, 2, 1))(
            x.unsqueeze(1).expand(2, 3, 4, 8, 8), w1.unsqueeze(0).expand(2, 6, 4, 3, 3))
    assert type(routed.grad_fn).__name__ == "ConvFnBackward"
    assert type(one_group.grad_fn).__name__ == "ConvolutionBackward0"
    assert type(unstrided.grad_fn).__name__ == "ConvolutionBackward0"
    assert type(bn.grad_fn).__name__ == "NativeBatchNormBackward0"
    assert "ConvFnBackward" in _graph_names(under_vmap)
    with closed_form_layers(conv_kernel=None, batch_norm=False):
        assert type(F.conv2d(x, w2, None, 2, 1, 1, 2).grad_fn).__name__ == "ConvolutionBackward0"


@pytest.mark.parametrize("kernels", [False, True], ids=["references", "cpp kernels"])
def test_batch_norm_relu_gradients_and_its_limits(kernels):
    """batch_norm_relu: values and first derivatives equal ATen's BatchNorm + ReLU (gradcheck
    against finite differences too), with the references and with the cpp backend's kernels;
    a backward that builds a graph for a second derivative is refused by name, and one value
    per channel is refused as F.batch_norm refuses it."""
    from imaml_fast.layers import batch_norm_relu

    ops = None
    if kernels:
        from imaml_fast.backends import resolve_backend
        try:
            o = resolve_backend("cpp", torch.device("cpu"), torch.float64).ops()
        except ValueError as e:
            pytest.skip(f"cpp backend unavailable: {e}")
        ops = (o["bn_relu_forward"], o["bn_relu_backward"])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    y = batch_norm_relu(x, w, b, 1e-5, ops)
    want = F.relu(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-14)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    for got, ref in zip(torch.autograd.grad(y, (x, w, b), gy),
                        torch.autograd.grad(want, (x, w, b), gy)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: batch_norm_relu(*t, 1e-5, ops), (x, w, b))
    gx = None
    with pytest.raises(RuntimeError, match=r"batch_norm_relu \(BatchNormReluFn\) has first "
                                           r"derivatives only.*F.relu\(F.batch_norm"):
        gx = torch.autograd.grad(batch_norm_relu(x, w, b, 1e-5, ops), x, gy,
                                 create_graph=True)
    assert gx is None
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        batch_norm_relu(x[:1, :, :1, :1], w, b, 1e-5, ops)

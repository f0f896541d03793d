"""Hand-batched layers (imaml_fast.stacked): which models they take, and the same values as
an independent per-task computation for every supported layer."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import CUDA_BACKENDS, DT, require_cuda_backend, task_loss_fn
from imaml_fast import FunctionalModel, IMAMLConfig, meta_gradient
from imaml_fast import stacked
from imaml_fast.stacked import folded_padding
from imaml_fast.hvp import BatchedHVP
from imaml_fast.models import conv4_maxpool, omniglot_conv, sinusoid_mlp


def _bn(cls, c, **kw):
    return cls(c, track_running_stats=False, **kw)


# (name, model, per-task input shape, loss, target maker)
def _ce(n):
    return lambda T, N: torch.randint(0, n, (T, N))


def _models():
    return [
        ("omniglot_conv", omniglot_conv(4, filters=4), (1, 28, 28), F.cross_entropy, _ce(4)),
        ("conv4_maxpool", conv4_maxpool(3, in_channels=2, filters=3, image_size=16), (2, 16, 16),
         F.cross_entropy, _ce(3)),
        ("grouped_dilated_same", nn.Sequential(
            nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2, bias=False),
            _bn(nn.BatchNorm2d, 6, affine=False), nn.LeakyReLU(0.1),
            nn.ConstantPad2d((1, 0, 2, 1), 0.5), nn.AvgPool2d(2), nn.Conv2d(6, 2, 1),
            nn.GELU()), (4, 7, 6), F.mse_loss, None),
        ("conv1d_bn1d", nn.Sequential(
            nn.Conv1d(3, 4, 3, stride=2), _bn(nn.BatchNorm1d, 4), nn.ELU(), nn.MaxPool1d(2),
            nn.ZeroPad1d(1), nn.Flatten(), nn.Linear(4 * 5, 3)), (3, 13), F.cross_entropy, _ce(3)),
        ("conv3d", nn.Sequential(
            nn.Conv3d(2, 3, 2), _bn(nn.BatchNorm3d, 3), nn.SiLU(), nn.Flatten(),
            nn.Linear(3 * 8, 2, bias=False), nn.Dropout(0.0)), (2, 3, 3, 3), F.cross_entropy,
         _ce(2)),
        ("mlp_bn1d", nn.Sequential(
            nn.Linear(5, 6), _bn(nn.BatchNorm1d, 6), nn.Tanh(), nn.Sequential(
                nn.Linear(6, 4), nn.Softplus(), nn.Identity()), nn.Linear(4, 2)), (5,),
         F.mse_loss, None),
        ("sinusoid_mlp", sinusoid_mlp(8), (1,), F.mse_loss, None),
        ("flatten_first", nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Sigmoid()),
         (3, 2, 2), F.mse_loss, None),
        ("inplace", nn.Sequential(
            nn.Conv2d(1, 3, 3), _bn(nn.BatchNorm2d, 3), nn.ReLU(inplace=True), nn.Flatten(),
            nn.Linear(3 * 4 * 4, 2), nn.LeakyReLU(0.2, inplace=True)), (1, 6, 6), F.mse_loss, None),
    ]


def _episode(model, shape, loss, target, T=3, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, *shape, dtype=DT, generator=g)
    if target is None:
        with torch.no_grad():
            out_shape = model(x[0]).shape
        y = torch.randn(T, *out_shape, dtype=DT, generator=g)
    else:
        y = target(T, N)
    return x, y


@pytest.mark.parametrize("case", _models(), ids=lambda c: c[0])
def test_plan_takes_every_supported_model(case):
    _, model, *_ = case
    fm = FunctionalModel(model.to(DT), F.mse_loss)
    assert fm.stacked is not None


@pytest.mark.parametrize("case", _models(), ids=lambda c: c[0])
def test_outputs_losses_gradients_and_products_equal_per_task_ones(case):
    """Against a loop over tasks of the plain per-task model (task_loss_fn: written without
    the package's batching), float64."""
    _, model, shape, loss, target = case
    model = model.to(DT)
    torch.manual_seed(1)
    fm = FunctionalModel(model, loss)
    x, y = _episode(model, shape, loss, target)
    T = x.shape[0]
    assert fm.hand_batched(x)
    phi = fm.theta + 0.1 * torch.randn(T, fm.num_params, dtype=DT)
    out = fm.outputs(phi, x)
    losses = fm.losses(phi, x, y)
    g, losses2 = fm.grad_and_losses(phi, x, y)
    v = torch.randn(T, fm.num_params, dtype=DT)
    hv = BatchedHVP(fm, phi, x, y, "revrev")(v)
    with fm.layer_derivatives("autograd"):
        hv_aten = BatchedHVP(fm, phi, x, y, "revrev")(v)
    hv_fwd = BatchedHVP(fm, phi, x, y, "fwdrev")(v)
    for i in range(T):
        f = task_loss_fn(model, loss, x[i], y[i])
        w = phi[i].clone().requires_grad_(True)
        li = f(w)
        gi, = torch.autograd.grad(li, w, create_graph=True)
        hvi, = torch.autograd.grad(gi, w, v[i])
        params = {n: t for n, t in fm.unflatten(phi[i]).items()}
        oi = torch.func.functional_call(model, params, (x[i],))
        torch.testing.assert_close(out[i], oi, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(losses[i], li.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(losses2[i], li.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g[i], gi.detach(), rtol=1e-10, atol=1e-12)
        for h in (hv, hv_aten, hv_fwd):
            torch.testing.assert_close(h[i], hvi, rtol=1e-9, atol=1e-11)


def test_the_hand_batched_path_runs_and_vmap_gives_the_same(monkeypatch):
    model = omniglot_conv(3, filters=4).to(DT)
    fm = FunctionalModel(model, F.cross_entropy)
    x, y = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=4)
    phi = fm.theta + 0.05 * torch.randn(4, fm.num_params, dtype=DT)
    calls = []
    forward = stacked.StackedPlan.forward
    monkeypatch.setattr(stacked.StackedPlan, "forward",
                        lambda self, p, xx, **kw: calls.append(xx.shape) or forward(self, p, xx,
                                                                                    **kw))
    g_auto, l_auto = fm.grad_and_losses(phi, x, y, "vmap")
    g_chunk, _ = fm.grad_and_losses(phi, x, y, 3)  # chunks of 3 and 1 task
    assert calls == [x.shape, (3, *x.shape[1:]), (1, *x.shape[1:])]
    with fm.engine_mode(IMAMLConfig(layer_batching="vmap")):
        g_vmap, l_vmap = fm.grad_and_losses(phi, x, y, "vmap")
    assert len(calls) == 3  # vmap did not call it
    torch.testing.assert_close(g_auto, g_vmap, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(g_chunk, g_vmap, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(l_auto, l_vmap, rtol=1e-12, atol=0)


def test_meta_gradient_is_the_same_with_either_layer_batching():
    model = omniglot_conv(3, filters=4).to(DT)
    x, y = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=3, N=3)
    xq, yq = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=3, N=3, seed=1)
    base = IMAMLConfig(inner_solver="gd_armijo", inner_steps=3, cg_steps=3, cg_damping=1.0,
                       task_batching="vmap")
    a = meta_gradient(model, F.cross_entropy, x, y, xq, yq, base)
    b = meta_gradient(model, F.cross_entropy, x, y, xq, yq, base.replace(layer_batching="vmap"))
    torch.testing.assert_close(a.grads_flat, b.grads_flat, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.adapted_flat, b.adapted_flat, rtol=1e-10, atol=1e-12)


def test_engine_mode_restores_layer_batching_after_an_error():
    fm = FunctionalModel(sinusoid_mlp(4), F.mse_loss)
    with pytest.raises(RuntimeError, match="boom"):
        with fm.engine_mode(IMAMLConfig(layer_batching="vmap")):
            assert fm.layer_batching == "vmap"
            raise RuntimeError("boom")
    assert fm.layer_batching == "auto"


def test_config_rejects_an_unknown_layer_batching():
    with pytest.raises(ValueError, match=r"layer_batching='hand'.*\('auto', 'vmap'\)"):
        IMAMLConfig(layer_batching="hand")


def test_amp_keeps_vmap():
    fm = FunctionalModel(omniglot_conv(3, filters=4), F.cross_entropy, amp="bf16")
    assert fm.stacked is not None
    assert not fm.hand_batched(torch.zeros(2, 3, 1, 28, 28))


def test_an_input_of_another_shape_falls_back_to_vmap():
    """An MLP applied to [N, S, F] per task (a linear layer over the last dim) is not the
    [N, F] the plan was made for: vmap runs it, with the right values."""
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    fm = FunctionalModel(model, F.mse_loss)
    x = torch.randn(2, 4, 5, 3, dtype=DT)
    assert not fm.hand_batched(x)
    phi = fm.theta + torch.randn(2, fm.num_params, dtype=DT)
    out = fm.outputs(phi, x)
    for i in range(2):
        p = fm.unflatten(phi[i])
        torch.testing.assert_close(out[i], F.linear(x[i], p["0.weight"], p["0.bias"]))


class _MySeq(nn.Sequential):
    pass


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize("make", [
    lambda: _MySeq(nn.Linear(3, 2)),                                   # a subclass
    lambda: nn.Sequential(nn.Linear(3, 2), _Double()),                 # an unknown module
    lambda: nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=1)),          # not per element
    lambda: nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)),            # random
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")),
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2)),         # linear on a spatial map
    lambda: nn.Sequential(nn.Linear(3, 2), nn.MaxPool1d(2)),            # pooling over features
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(start_dim=2)),
    lambda: nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)),          # running statistics
    lambda: nn.Sequential(nn.ReLU()),                                   # no layout at all
    lambda: (lambda lin: nn.Sequential(lin, nn.Tanh(), lin))(nn.Linear(3, 3)),  # one layer twice
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, return_indices=True)),  # a tuple
], ids=["subclass", "unknown", "softmax", "dropout", "reflect", "linear_on_map", "pool_features",
        "flatten_dims", "running_stats", "activation_only", "shared_layer", "pool_indices"])
def test_plan_refuses_what_it_cannot_batch_by_hand(make):
    model = make()
    names = [n for n, _ in model.named_parameters()]
    assert stacked.plan(model, names, dict(model.named_buffers())) is None


def test_plan_refuses_hooks_and_parameters_that_are_not_meta_learned():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    names = [n for n, _ in model.named_parameters()]
    assert stacked.plan(model, names, {}) is not None
    assert stacked.plan(model, names[:-1], {}) is None  # 2.bias shared, not per task
    handle = model[1].register_forward_hook(lambda m, i, o: o)
    assert stacked.plan(model, names, {}) is None
    handle.remove()
    model.register_buffer("scale", torch.ones(1))
    assert stacked.plan(model, names, dict(model.named_buffers())) is None


def test_imaml_adapt_and_predict_follow_the_config(monkeypatch):
    from imaml_fast import IMAML

    model = omniglot_conv(3, filters=4).to(DT)
    x, y = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=2, N=3)
    calls = []
    forward = stacked.StackedPlan.forward
    monkeypatch.setattr(stacked.StackedPlan, "forward",
                        lambda self, p, xx, **kw: calls.append(1) or forward(self, p, xx, **kw))
    out = {}
    for lb in ("vmap", "auto"):
        learner = IMAML(model, F.cross_entropy, IMAMLConfig(inner_steps=2, task_batching="vmap",
                                                            layer_batching=lb))
        adapted = learner.adapt(x, y)
        n = len(calls)
        out[lb] = learner.predict(adapted, x)
        assert (n, len(calls)) == ((0, 0) if lb == "vmap" else (n, n + 1)) and (lb == "vmap" or n)
    torch.testing.assert_close(out["auto"], out["vmap"], rtol=1e-10, atol=1e-12)


def test_hooks_on_an_inner_sequential_or_global_hooks_keep_vmap():
    inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    model = nn.Sequential(inner, nn.Linear(4, 2)).to(DT)
    names = [n for n, _ in model.named_parameters()]
    assert stacked.plan(model, names, {}) is not None
    handle = inner.register_forward_hook(lambda m, i, o: o)
    assert stacked.plan(model, names, {}) is None
    handle.remove()
    fm = FunctionalModel(model, F.mse_loss)
    x = torch.randn(2, 5, 3, dtype=DT)
    assert fm.hand_batched(x)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__))
    try:
        assert not fm.hand_batched(x)
        fm.outputs(fm.theta.expand(2, -1), x)
        assert "Linear" in seen  # the per-task modules ran, hooks and all
    finally:
        handle.remove()
    assert fm.hand_batched(x)


def _loop_loss(fn, out, y):
    return torch.stack([fn(out[i], y[i]) for i in range(out.shape[0])])


def test_batched_losses_equal_each_tasks_own_call():
    g = torch.Generator().manual_seed(3)
    T, N, C = 4, 6, 5
    out = torch.randn(T, N, C, dtype=DT, generator=g)
    y = torch.randint(0, C, (T, N), generator=g)
    y[1, :4] = -100  # ignored samples: task 1's mean is over its 2 others
    y[2, 0] = -100
    soft = torch.softmax(torch.randn(T, N, C, dtype=DT, generator=g), -1)
    seg_out = torch.randn(T, N, C, 3, 2, dtype=DT, generator=g)
    seg_y = torch.randint(0, C, (T, N, 3, 2), generator=g)
    reg = torch.randn(T, 3, N, dtype=DT, generator=g).transpose(1, 2)  # not contiguous
    reg_y = torch.randn(T, N, 3, dtype=DT, generator=g)
    for fn, o, t in ((F.cross_entropy, out, y), (F.cross_entropy, out, soft),
                     (F.cross_entropy, seg_out, seg_y), (F.mse_loss, reg, reg_y)):
        got = stacked.batched_loss(fn, o, t)
        torch.testing.assert_close(got, _loop_loss(fn, o, t), rtol=1e-14, atol=1e-15)
    y3 = y.masked_fill(y == -100, 3)  # class 3 ignored instead
    for fn, o, t in ((nn.CrossEntropyLoss(), out, y),
                     (nn.CrossEntropyLoss(ignore_index=3), out, y3), (nn.MSELoss(), reg, reg_y)):
        got = stacked.batched_loss(fn, o, t)
        torch.testing.assert_close(got, _loop_loss(fn, o, t), rtol=1e-14, atol=1e-15)
    for fn in (nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss(reduction="sum"),
               nn.CrossEntropyLoss(weight=torch.ones(C, dtype=DT)), nn.MSELoss(reduction="sum")):
        assert stacked.batched_loss(fn, out if isinstance(fn, nn.CrossEntropyLoss) else reg,
                                    y if isinstance(fn, nn.CrossEntropyLoss) else reg_y) is None
    # anything else is left to vmap
    assert stacked.batched_loss(lambda o, t: F.cross_entropy(o, t), out, y) is None
    assert stacked.batched_loss(F.nll_loss, out, y) is None
    assert stacked.batched_loss(F.mse_loss, reg, reg_y[..., :1]) is None  # broadcasting
    assert stacked.batched_loss(F.cross_entropy, out[:, 0], y[:, 0]) is None  # [T, C]: no N


def test_plain_gradients_fuse_batchnorm_and_relu_with_the_cpp_kernels(monkeypatch):
    """With the cpp backend, the engine's plain gradients (layer_derivatives "plain", taken
    once) run every BatchNorm followed by a ReLU of a hand-batched model as one layer, through
    the backend's bn_relu kernels, and give the same gradients and losses as the model under
    vmap (float64); gradients that build a graph for products keep the unfused layers; a
    BatchNorm followed by another activation is left alone."""
    from imaml_fast.backends import resolve_backend

    cpp = resolve_backend("cpp", torch.device("cpu"), DT)
    calls = {"fwd": 0, "bwd": 0}
    ops = cpp.ops()
    fwd, bwd = ops["bn_relu_forward"], ops["bn_relu_backward"]
    monkeypatch.setitem(ops, "bn_relu_forward",
                        lambda *a: calls.__setitem__("fwd", calls["fwd"] + 1) or fwd(*a))
    monkeypatch.setitem(ops, "bn_relu_backward",
                        lambda *a: calls.__setitem__("bwd", calls["bwd"] + 1) or bwd(*a))
    model = nn.Sequential(*omniglot_conv(3, filters=4)[:-2], nn.Conv2d(4, 4, 1),
                          _bn(nn.BatchNorm2d, 4), nn.ELU(), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 3)).to(DT)
    fm = FunctionalModel(model, F.cross_entropy)
    x, y = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=4)
    phi = fm.theta + 0.05 * torch.randn(4, fm.num_params, dtype=DT)
    with fm.layer_derivatives("closed_form", cpp):
        g_fused, l_fused = fm.grad_and_losses(phi, x, y, "vmap")  # plain inside
        assert calls == {"fwd": 4, "bwd": 4}  # the four conv blocks; not the ELU one
        grads, _, _ = fm.grad_pieces(phi, x, y, "vmap", create_graph=True)
        assert calls == {"fwd": 4, "bwd": 4}  # a graph for products: unfused
    with fm.engine_mode(IMAMLConfig(layer_batching="vmap")):
        g_vmap, l_vmap = fm.grad_and_losses(phi, x, y, "vmap")
    torch.testing.assert_close(g_fused, g_vmap, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(grads[0].detach(), g_vmap, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(l_fused, l_vmap, rtol=1e-12, atol=0)


@pytest.mark.parametrize("batching", ["vmap", 2])
def test_meta_gradient_is_the_same_with_and_without_the_fused_layer(batching):
    """The cpp backend's meta-gradient (inner loop through the fused BatchNorm + ReLU) equals
    the torch backend's (ATen's layers throughout), float64, all tasks in one call and in
    chunks of 2."""
    model = omniglot_conv(3, filters=4).to(DT)
    x, y = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=3, N=3)
    xq, yq = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=3, N=3, seed=1)
    base = IMAMLConfig(inner_steps=4, cg_steps=3, task_batching=batching)
    a = meta_gradient(model, F.cross_entropy, x, y, xq, yq, base.replace(backend="cpp"))
    b = meta_gradient(model, F.cross_entropy, x, y, xq, yq, base.replace(backend="torch"))
    assert a.backend == "cpp" and b.backend == "torch"
    torch.testing.assert_close(a.grads_flat, b.grads_flat, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.adapted_flat, b.adapted_flat, rtol=1e-10, atol=1e-12)


def _passes(fm, phi, x, y, v):
    """Outputs, losses, gradients and revrev products of one batched call, as the engine
    runs it."""
    g, losses = fm.grad_and_losses(phi, x, y)
    return fm.outputs(phi, x), losses, g, BatchedHVP(fm, phi, x, y, "revrev")(v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", _models(), ids=lambda c: c[0])
def test_on_a_gpu_hand_batched_passes_equal_the_cpus_and_vmaps(case):
    """On CUDA the hand-batched layers run cuDNN's grouped convolutions and the GPU pooling
    and BatchNorm kernels: their outputs, losses, gradients and products equal the CPU's and
    those of the model under vmap on the GPU (float64)."""
    _, model, shape, loss, target = case
    model = model.to(DT)
    torch.manual_seed(2)
    x, y = _episode(model, shape, loss, target)
    fm = FunctionalModel(model, loss)
    phi = fm.theta + 0.1 * torch.randn(x.shape[0], fm.num_params, dtype=DT)
    v = torch.randn(phi.shape, dtype=DT)
    want = _passes(fm, phi, x, y, v)
    gm = FunctionalModel(model.cuda(), loss)
    xc, yc, phic, vc = (t.cuda() for t in (x, y, phi, v))
    assert gm.hand_batched(xc)
    got = _passes(gm, phic, xc, yc, vc)
    with gm.engine_mode(IMAMLConfig(layer_batching="vmap")):
        assert not gm.hand_batched(xc)
        under_vmap = _passes(gm, phic, xc, yc, vc)
    for a, b, c in zip(got, want, under_vmap):
        assert a.is_cuda and c.is_cuda
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_on_a_gpu_meta_gradient_is_the_same_with_either_layer_batching(backend):
    require_cuda_backend(backend, DT)
    model = omniglot_conv(3, filters=4).to(DT)
    x, y = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=3, N=3)
    xq, yq = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=3, N=3, seed=1)
    ep = [t.cuda() for t in (x, y, xq, yq)]
    model = model.cuda()
    base = IMAMLConfig(inner_solver="gd_armijo", inner_steps=3, cg_steps=3, cg_damping=1.0,
                       task_batching="vmap", backend=backend)
    a = meta_gradient(model, F.cross_entropy, *ep, base)
    b = meta_gradient(model, F.cross_entropy, *ep, base.replace(layer_batching="vmap"))
    assert a.backend == backend and a.grads_flat.is_cuda
    torch.testing.assert_close(a.grads_flat, b.grads_flat, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.adapted_flat, b.adapted_flat, rtol=1e-10, atol=1e-12)


def test_zero_padding_folds_into_the_next_convolution_exactly_where_it_may():
    """folded_padding against the padded convolution itself, over a grid of sizes, pads and
    convolution settings (float64): wherever it folds, the folded convolution equals the
    padded one; it refuses a non-zero value, cropping and string padding."""
    g = torch.Generator().manual_seed(3)
    folds = asymmetric = refused = 0
    for L in (4, 5, 7, 8):
        for before, after in ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 1)):
            for p, s, dl, k in ((1, 2, 1, 3), (0, 1, 1, 3), (1, 1, 2, 3), (2, 2, 1, 5),
                                (0, 2, 1, 2)):
                pad = nn.ZeroPad2d((before, after, before, after))
                conv = nn.Conv2d(2, 3, k, stride=s, padding=p, dilation=dl, bias=False).to(DT)
                x = torch.randn(2, 2, L, L, generator=g, dtype=DT)
                try:
                    want = conv(pad(x))
                except RuntimeError:  # the padded input is too small for the kernel
                    assert folded_padding(pad, conv, (L, L)) is None
                    continue
                q = folded_padding(pad, conv, (L, L))
                if q is None:
                    refused += 1
                    continue
                folds += 1
                asymmetric += before != after
                assert q == (p + before, p + before)
                got = F.conv2d(x, conv.weight, None, s, q, dl)
                torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert folds > 40 and asymmetric > 10 and refused > 40
    # another pad per dimension: F.pad's order is the last dimension first
    pad, conv = nn.ZeroPad2d((0, 1, 1, 1)), nn.Conv2d(2, 3, 3, stride=2, padding=1).to(DT)
    x = torch.randn(2, 2, 7, 7, generator=g, dtype=DT)
    assert folded_padding(pad, conv, (7, 7)) == (2, 1)
    torch.testing.assert_close(F.conv2d(x, conv.weight, conv.bias, 2, (2, 1)), conv(pad(x)),
                               rtol=1e-13, atol=1e-13)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    assert folded_padding(nn.ZeroPad2d((0, 1, 0, 1)), conv, (7, 7)) == (1, 1)
    assert folded_padding(nn.ConstantPad2d((0, 1, 0, 1), 0.5), conv, (7, 7)) is None
    assert folded_padding(nn.ZeroPad2d((0, -1, 0, 0)), conv, (7, 7)) is None
    assert folded_padding(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(2, 3, 3, padding="same"),
                          (7, 7)) is None
    assert folded_padding(nn.ZeroPad1d((1, 0)), nn.Conv1d(2, 3, 3, stride=2), (6,)) == (1,)


def test_the_omniglot_networks_zero_pad_runs_inside_its_convolution(monkeypatch):
    """The paper's network pads 7x7 maps to 8x8 before its third convolution: hand-batched,
    that padding is the convolution's own (no padded copy), and outputs, gradients and
    products equal vmap's, which pads (float64)."""
    model = omniglot_conv(3, filters=4).to(DT)
    fm = FunctionalModel(model, F.cross_entropy)
    steps = fm.stacked.steps
    assert [st.kind for st in steps].count("pad") == 1
    pad_module = next(st.module for st in steps if st.kind == "pad")
    calls = []
    monkeypatch.setattr(type(pad_module), "forward",
                        lambda self, x: calls.append(x.shape) or F.pad(x, self.padding))
    x, y = _episode(model, (1, 28, 28), F.cross_entropy, _ce(3), T=3)
    phi = fm.theta + 0.05 * torch.randn(3, fm.num_params, dtype=DT)
    v = torch.randn(phi.shape, dtype=DT)
    got = _passes(fm, phi, x, y, v)
    assert calls == []  # folded: the module never ran
    with fm.engine_mode(IMAMLConfig(layer_batching="vmap")):
        want = _passes(fm, phi, x, y, v)
    assert calls  # vmap runs the model as it is
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # 24x24 images: the third convolution sees 6x6 maps, where folding would change its
    # output size (3x3 instead of 4x4): the pad runs
    calls.clear()
    out = fm.outputs(phi, torch.randn(3, 2, 1, 24, 24, dtype=DT))
    assert calls == [(2, 12, 6, 6)] and out.shape == (3, 2, 3)

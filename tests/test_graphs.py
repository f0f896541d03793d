"""CUDA-graph capture of the meta-gradient (imaml_fast.graphs).

On the CPU: the whole pipeline a graph captures runs on the meta device, where any read of a
device value by the host (.item(), bool(), .tolist()) raises, so capture cannot meet a host
synchronisation; and asking for graphs without a GPU fails clearly. On a GPU: replays equal
the uncaptured computation, for new data too, one capture per input signature.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from _helpers import class_episode, conv_bn
from imaml_fast import IMAML, IMAMLConfig
from imaml_fast.functional import FunctionalModel
from imaml_fast.implicit import meta_gradient_flat
from imaml_fast.models import omniglot_conv

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("solver", ["gd", "gd_armijo", "agd", "hf"])
@pytest.mark.parametrize("hvp", ["revrev", "fwdrev"])
@pytest.mark.parametrize("clip", [False, True])
def test_captured_pipeline_makes_no_host_sync(solver, hvp, clip):
    fm = FunctionalModel(omniglot_conv(5).to("meta"), F.cross_entropy)
    xs = torch.empty(3, 5, 1, 28, 28, device="meta")
    ys = torch.empty(3, 5, dtype=torch.long, device="meta")
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2, cg_steps=3, hf_cg_steps=2,
                      backend="torch", task_batching="vmap", hvp=hvp, cg_clip=clip,
                      cg_damping=10.0 if clip else 0.0)
    r = meta_gradient_flat(fm, xs, ys, xs, ys, cfg, validate_values=False)
    assert r.grads_flat.shape == (fm.num_params,) and r.task_grads_flat.shape == (3, fm.num_params)
    assert (r.cg_status.shape == r.cg_clipped.shape == r.inner_residual.shape
            == r.first_order_cosine.shape == (3,))
    with pytest.raises(Exception):  # the device really refuses host reads
        bool(r.cg_status.sum() > 0)


@pytest.mark.parametrize("solver", ["gd", "gd_armijo", "agd", "hf"])
def test_captured_dense_path_makes_no_host_sync(solver):
    # The dense-Hessian path (cg_dense="always") captures too: no host read anywhere in it.
    fm = FunctionalModel(conv_bn().float().to("meta"), F.cross_entropy)
    xs = torch.empty(3, 4, 1, 6, 6, device="meta")
    ys = torch.empty(3, 4, dtype=torch.long, device="meta")
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2, cg_steps=3, hf_cg_steps=2,
                      backend="torch", task_batching="vmap", cg_dense="always")
    r = meta_gradient_flat(fm, xs, ys, xs, ys, cfg, validate_values=False)
    assert r.hvp == "dense" and r.grads_flat.shape == (fm.num_params,)


def test_cuda_graphs_need_a_cuda_model():
    model = conv_bn()
    with pytest.raises(ValueError, match="CUDA"):
        IMAML(model, F.cross_entropy, IMAMLConfig(), cuda_graphs=True)


def test_cuda_graphs_auto_is_off_for_a_cpu_model_and_the_option_is_checked():
    model = conv_bn()
    assert IMAML(model, F.cross_entropy, IMAMLConfig()).cuda_graphs is False  # default "auto"
    assert IMAML(model, F.cross_entropy, IMAMLConfig(), cuda_graphs=False).cuda_graphs is False
    with pytest.raises(ValueError, match="cuda_graphs='yes' is invalid"):
        IMAML(model, F.cross_entropy, IMAMLConfig(), cuda_graphs="yes")


def test_settings_that_cannot_be_captured_say_why():
    from imaml_fast.graphs import config_why_not

    assert config_why_not(IMAMLConfig()) == []
    assert config_why_not(IMAMLConfig(inner_solver="gd_armijo")) == []
    [why] = config_why_not(IMAMLConfig(inner_solver="gd_armijo", inner_tol=0.01))
    assert "inner_tol" in why and "cuda_graphs=False" in why
    [why] = config_why_not(IMAMLConfig(backend="reference"))
    assert "reference" in why


@pytest.mark.gpu
@needs_gpu
def test_inner_tol_runs_uncaptured_under_auto_and_is_refused_when_insisted_on():
    model = conv_bn().float().cuda()
    cfg = IMAMLConfig(inner_solver="gd_armijo", inner_steps=20, inner_lr=0.5, inner_tol=0.05)
    auto = IMAML(model, F.cross_entropy, cfg)
    assert auto.cuda_graphs is False
    r = auto.meta_gradient(*_cuda_episode(4))
    assert (r.inner_steps < 20).any() and r.inner_steps.device.type == "cuda"
    with pytest.raises(ValueError, match="inner_tol"):
        IMAML(model, F.cross_entropy, cfg, cuda_graphs=True)


class _FailingCapture:
    """Stands in for a CapturedMetaGradient whose capture fails."""

    calls = 0

    def __call__(self, *inputs):
        from imaml_fast.graphs import CaptureFailed

        _FailingCapture.calls += 1
        raise CaptureFailed("capturing the meta-gradient as a CUDA graph failed (test)")


def _episode():
    torch.manual_seed(0)
    return class_episode(4, 4, 4, (1, 6, 6), 3)


def test_auto_falls_back_to_uncaptured_once_when_a_capture_fails():
    model = conv_bn()
    cfg = IMAMLConfig(inner_steps=2, cg_steps=2)
    ep = _episode()
    want = IMAML(model, F.cross_entropy, cfg, cuda_graphs=False).meta_gradient(*ep)
    learner = IMAML(model, F.cross_entropy, cfg)  # "auto"
    learner._graphed, _FailingCapture.calls = _FailingCapture(), 0  # as on a GPU
    with pytest.warns(RuntimeWarning, match="runs its meta-steps uncaptured from now on"):
        got = learner.meta_gradient(*ep)
    torch.testing.assert_close(got.grads_flat, want.grads_flat, rtol=0, atol=0)
    assert learner.cuda_graphs is False
    learner.meta_gradient(*ep)  # no second attempt
    assert _FailingCapture.calls == 1


def test_explicit_cuda_graphs_raise_when_the_capture_fails():
    learner = IMAML(conv_bn(), F.cross_entropy, IMAMLConfig(inner_steps=2, cg_steps=2),
                    cuda_graphs=False)
    learner._graphed, learner._graphs_auto = _FailingCapture(), False  # as cuda_graphs=True
    from imaml_fast.graphs import CaptureFailed

    with pytest.raises(CaptureFailed, match="test"):
        learner.meta_gradient(*_episode())


def test_signatures_past_max_graphs_run_uncaptured(monkeypatch):
    """The bookkeeping of CapturedMetaGradient, on the CPU: capture is replaced by a
    recording stand-in; the signature past max_graphs runs the plain computation."""
    import imaml_fast.graphs as G

    monkeypatch.setattr(G, "graphs_why_not", lambda device: [])
    fm = FunctionalModel(conv_bn(), F.cross_entropy)
    cfg = IMAMLConfig(inner_steps=2, cg_steps=2)
    captured = []

    class Replay:
        def replay(self):
            pass

    def fake_capture(self, inputs):
        captured.append(tuple(inputs[1].shape))
        static = tuple(t.detach().clone() for t in inputs)
        return Replay(), static, self._run(*static, validate_values=True)

    monkeypatch.setattr(G.CapturedMetaGradient, "_capture", fake_capture)
    graphed = G.CapturedMetaGradient(fm, cfg, max_graphs=2)
    eps = [class_episode(T, 4, 4, (1, 6, 6), 3) for T in (2, 3, 4)]
    for ep in eps + eps[:1]:
        graphed(fm.theta, *ep)
    assert captured == [tuple(eps[0][0].shape), tuple(eps[1][0].shape)]
    assert (graphed.captures, graphed.uncaptured, graphed.replays) == (0, 1, 3)
    got = graphed(fm.theta, *eps[2])  # past the limit: the plain computation
    want = meta_gradient_flat(fm, *eps[2], cfg, theta=fm.theta)
    torch.testing.assert_close(got.grads_flat, want.grads_flat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_graphs=-1 is invalid"):
        G.CapturedMetaGradient(fm, cfg, max_graphs=-1)


def _cuda_episode(T):
    return [t.cuda().float() if t.is_floating_point() else t.cuda()
            for t in class_episode(T, 4, 4, (1, 6, 6), 3)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("solver,mode,extra,tol", [
    ("gd", True, {}, 1e-5), ("hf", True, {}, 1e-5), ("gd", "auto", {}, 1e-5),
    ("gd_armijo", True, {"inner_lr": 6.0}, 1e-5),  # line search cutting steps, replayed
    ("gd", True, {"cg_clip": True, "cg_damping": 0.5}, 1e-5),
    # the matrix-free products (this small model takes the dense path under "auto")
    ("gd", "auto", {"cg_dense": "never"}, 1e-5),
    ("gd", "auto", {"cg_dense": "never", "hvp": "fwdrev"}, 1e-5),
    ("gd", "auto", {"amp": "bf16"}, 1e-3),  # the same bf16 arithmetic, replayed
])
def test_replay_equals_uncaptured_for_new_data(solver, mode, extra, tol):
    torch.manual_seed(0)
    model = conv_bn().float().cuda()
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=3, cg_steps=4, hf_cg_steps=2, **extra)
    plain = IMAML(model, F.cross_entropy, cfg, cuda_graphs=False)
    graphed = IMAML(model, F.cross_entropy, cfg, cuda_graphs=mode)  # "auto": the default
    assert graphed.cuda_graphs and not plain.cuda_graphs
    if mode == "auto":  # nothing to capture for the reference backend
        assert not IMAML(model, F.cross_entropy, cfg.replace(backend="reference")).cuda_graphs
    for seed in range(3):
        torch.manual_seed(seed)
        ep = _cuda_episode(6)
        a, b = plain.meta_gradient(*ep), graphed.meta_gradient(*ep)
        torch.testing.assert_close(b.grads_flat, a.grads_flat, rtol=tol, atol=tol / 10)
        torch.testing.assert_close(b.adapted_flat, a.adapted_flat, rtol=tol, atol=tol / 10)
        torch.testing.assert_close(b.inner_residual, a.inner_residual, rtol=tol, atol=tol / 10)
        torch.testing.assert_close(b.first_order_cosine, a.first_order_cosine, rtol=tol,
                                   atol=tol / 10)
        assert torch.equal(b.cg_status, a.cg_status) and torch.equal(b.cg_clipped, a.cg_clipped)
        assert torch.equal(b.inner_steps, a.inner_steps)
    assert graphed._graphed.captures == 1 and graphed._graphed.replays == 3
    graphed.meta_gradient(*_cuda_episode(5))  # another T: a new graph
    assert graphed._graphed.captures == 2


class _ReadsOnHost(torch.nn.Module):
    """A model whose forward reads a device value on the host: runs uncaptured, cannot be
    captured."""

    def __init__(self):
        super().__init__()
        self.net = conv_bn()
        self.register_buffer("scale", torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):
        return self.net(x) * float(self.scale)  # a buffer is not batched: vmap lets it be read


@pytest.mark.gpu
@needs_gpu
def test_auto_recovers_from_a_real_capture_failure():
    torch.manual_seed(0)
    model = _ReadsOnHost().float().cuda()
    cfg = IMAMLConfig(inner_steps=2, cg_steps=2, cg_dense="never")
    ep = _cuda_episode(4)
    want = IMAML(model, F.cross_entropy, cfg, cuda_graphs=False).meta_gradient(*ep)
    learner = IMAML(model, F.cross_entropy, cfg)
    assert learner.cuda_graphs
    with pytest.warns(RuntimeWarning, match="uncaptured from now on"):
        got = learner.meta_gradient(*ep)
    assert not learner.cuda_graphs
    torch.testing.assert_close(got.grads_flat, want.grads_flat, rtol=1e-5, atol=1e-6)
    again = learner.meta_gradient(*_cuda_episode(4))  # the device still works
    assert torch.isfinite(again.grads_flat).all()


@pytest.mark.gpu
@needs_gpu
def test_graphed_meta_steps_equal_plain_meta_steps():
    torch.manual_seed(0)
    base = conv_bn().float().cuda()
    models = [base, copy.deepcopy(base)]
    cfg = IMAMLConfig(inner_steps=3, cg_steps=4)
    learners = [IMAML(m, F.cross_entropy, cfg, torch.optim.Adam(m.parameters(), 1e-2),
                      cuda_graphs=g) for m, g in zip(models, (False, True))]
    for seed in range(3):
        torch.manual_seed(seed)
        ep = _cuda_episode(6)
        for learner in learners:
            learner.meta_step(*ep)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)

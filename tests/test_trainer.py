import copy

import pytest
import torch
import torch.nn.functional as F

from _helpers import DT, class_episode, conv_bn, flat_params, mlp
from imaml_fast import IMAML, IMAMLConfig, meta_gradient

CFG = IMAMLConfig(inner_steps=3, cg_steps=4, inner_lr=0.1)


def test_meta_step_is_an_optimizer_step_with_the_meta_gradient():
    model = conv_bn()
    ep = class_episode(4, 5, 5, (1, 6, 6), 3)
    expected = meta_gradient(model, F.cross_entropy, *ep, CFG)
    theta0 = flat_params(model)
    learner = IMAML(model, F.cross_entropy, CFG, torch.optim.SGD(model.parameters(), lr=0.5))
    stats = learner.meta_step(*ep)
    assert torch.allclose(flat_params(model), theta0 - 0.5 * expected.grads_flat, rtol=0, atol=1e-14)
    d = stats.to_dict()
    assert d["backend"] == expected.backend and d["cg_iters"] == 4.0
    assert abs(d["query_loss"] - expected.query_loss.mean().item()) < 1e-12
    assert sum(d["cg_status"].values()) == 4


def test_accumulate_adds_into_grad_like_backward():
    model = mlp()
    ep = class_episode(3, 4, 4, (3,), 2)
    g = meta_gradient(model, F.cross_entropy, *ep, CFG).grads
    learner = IMAML(model, F.cross_entropy, CFG)
    # another loss on the same parameters first
    model(torch.randn(2, 3, dtype=DT)).sum().backward()
    other = {n: p.grad.clone() for n, p in model.named_parameters()}
    learner.accumulate(*ep)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, other[n] + g[n], rtol=1e-14)


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_same(model, opt, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[0][k])
    assert repr(opt.state_dict()) == repr(snap[1])


def test_failed_meta_step_changes_nothing():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    learner = IMAML(model, F.cross_entropy, CFG, opt)
    ep = list(class_episode(3, 4, 4, (3,), 2))
    learner.meta_step(*ep)  # Adam now has state
    snap = _snapshot(model, opt)
    grads = [p.grad.clone() for p in model.parameters()]
    bad = list(ep)
    bad[0] = bad[0].clone()
    bad[0][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        learner.meta_step(*bad)
    with pytest.raises(ValueError, match="mismatched"):
        learner.meta_step(ep[0], ep[1], ep[2][:2], ep[3][:2])
    _assert_same(model, opt, snap)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_non_finite_meta_gradient_is_refused_and_changes_nothing():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # An inner step this large makes the inner loop overflow.
    learner = IMAML(model, F.cross_entropy, IMAMLConfig(inner_steps=400, inner_lr=1e6), opt)
    xs, ys, xq, yq = class_episode(2, 4, 4, (3,), 2)
    snap = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="lower inner_lr"):
        learner.meta_step(xs * 1e3, ys, xq, yq)
    _assert_same(model, opt, snap)
    assert all(p.grad is None for p in model.parameters())


def test_adapt_and_predict():
    model = conv_bn()
    xs, ys, xq, yq = class_episode(3, 5, 4, (1, 6, 6), 3)
    learner = IMAML(model, F.cross_entropy, CFG)
    adapted = learner.adapt(xs, ys)
    r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, CFG)
    for n in adapted:
        assert torch.equal(adapted[n], r.adapted[n])
    out = learner.predict(adapted, xq)
    assert out.shape == (3, 4, 3)
    for i in range(3):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(adapted[n][i])
        assert torch.allclose(out[i], m(xq[i]), atol=1e-12)
    with pytest.raises(ValueError, match="T=2"):
        learner.predict(adapted, xq[:2])


def test_meta_training_reduces_query_loss():
    """A few meta-steps on a fixed family of tasks lower the post-adaptation query loss."""
    torch.manual_seed(1)
    model = mlp(d_in=3, hidden=8, d_out=2)
    w_true = torch.randn(3, dtype=DT)
    xs, xq = torch.randn(8, 10, 3, dtype=DT), torch.randn(8, 10, 3, dtype=DT)
    ys, yq = (xs @ w_true > 0).long(), (xq @ w_true > 0).long()
    learner = IMAML(model, F.cross_entropy, IMAMLConfig(inner_steps=5, cg_steps=5, lam=1.0),
                    torch.optim.Adam(model.parameters(), lr=0.05))
    first = learner.meta_step(xs, ys, xq, yq).result.query_loss.mean().item()
    for _ in range(30):
        last = learner.meta_step(xs, ys, xq, yq).result.query_loss.mean().item()
    assert last < 0.5 * first


def test_meta_step_needs_an_optimizer():
    learner = IMAML(mlp(), F.cross_entropy, CFG)
    with pytest.raises(ValueError, match="outer optimizer"):
        learner.meta_step(*class_episode(2, 3, 3, (3,), 2))


def test_inside_a_users_training_loop_with_scheduler_clipping_and_a_shared_loss():
    """accumulate() composes with any optimizer, LR scheduler, gradient clipping and other
    losses on the same parameters, exactly as the same gradients from backward() would."""
    torch.manual_seed(3)
    model = mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    learner = IMAML(model, F.cross_entropy, CFG)
    x_extra = torch.randn(6, 3, dtype=DT)
    for _ in range(3):
        ep = class_episode(3, 4, 4, (3,), 2)
        meta = meta_gradient(twin, F.cross_entropy, *ep, CFG).grads  # computed before any change
        opt.zero_grad()
        (0.1 * model(x_extra).pow(2).mean()).backward()      # a regulariser on shared parameters
        learner.accumulate(*ep)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        opt2.zero_grad()
        (0.1 * twin(x_extra).pow(2).mean()).backward()
        for n, p in twin.named_parameters():
            p.grad += meta[n]
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        opt2.step()
        sched2.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert sched.get_last_lr()[0] == 0.1 / 8


def test_torch_compiled_model_meta_trains_like_the_eager_one():
    # torch.compile wraps the module (parameter names gain "_orig_mod."); the engine runs
    # the module under it, and the user's compiled calls see every meta-step.
    torch._dynamo.reset()
    eager = conv_bn()
    # aot_eager: dynamo + AOTAutograd, torch.compile's own path short of code generation
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager")
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    ep = class_episode(4, 5, 5, (1, 6, 6), 3)
    a = meta_gradient(eager, F.cross_entropy, *ep, CFG)
    b = meta_gradient(compiled, F.cross_entropy, *ep, CFG)
    assert list(b.grads) == list(a.grads)
    assert torch.equal(b.grads_flat, a.grads_flat)
    c = meta_gradient(compiled, F.cross_entropy, *ep, CFG, params=dict(compiled.named_parameters()))
    assert torch.equal(c.grads_flat, a.grads_flat)

    learners = [IMAML(m, F.cross_entropy, CFG, torch.optim.Adam(m.parameters(), lr=1e-2))
                for m in (eager, compiled)]
    theta0 = flat_params(eager)
    for _ in range(2):
        for learner in learners:
            learner.meta_step(*ep)
    assert torch.equal(flat_params(compiled), flat_params(eager))
    assert (flat_params(eager) - theta0).abs().max() > 1e-3  # the steps moved the parameters
    x = ep[0][0]
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("strategy", ["vmap", "loop", 2])
@pytest.mark.parametrize("cfg_extra", [{}, {"cg_steps": 0}, {"inner_solver": "hf"}])
def test_query_outputs_are_what_predict_returns(strategy, cfg_extra):
    """The meta-gradient keeps the query outputs of its own forward pass (the training loop
    scores tasks with them instead of a second forward); they equal predict()'s."""
    model = conv_bn()
    ep = class_episode(5, 5, 4, (1, 6, 6), 3)
    learner = IMAML(model, F.cross_entropy, CFG.replace(task_batching=strategy, **cfg_extra))
    r = learner.meta_gradient(*ep)
    assert r.query_outputs.shape == (5, 4, 3)
    torch.testing.assert_close(r.query_outputs, learner.predict(r.adapted, ep[2]),
                               rtol=1e-12, atol=1e-12)
    assert not r.query_outputs.requires_grad
    ref = IMAML(model, F.cross_entropy, CFG.replace(backend="reference")).meta_gradient(*ep)
    assert ref.query_outputs is None  # the reference keeps the authors' structure

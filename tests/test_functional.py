import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import DT, class_episode, conv_bn, flat_params, mlp, task_loss_fn
from imaml_fast import FunctionalModel
from imaml_fast.functional import check_batchnorm


def test_flat_layout_round_trip_and_views():
    model = mlp()
    fm = FunctionalModel(model, F.cross_entropy)
    assert fm.num_params == sum(p.numel() for p in model.parameters()) == 32
    assert torch.equal(fm.theta, flat_params(model))
    flat = torch.randn(4, fm.num_params, dtype=DT)
    d = fm.unflatten(flat)
    assert d["0.weight"].shape == (4, 5, 3) and d["2.bias"].shape == (4, 2)
    d["0.bias"][1, 2] = 123.0  # a view: writes land in the flat buffer
    assert flat[1, 15 + 2] == 123.0
    assert torch.equal(fm.flatten(d), flat)


@pytest.mark.parametrize("strategy", ["vmap", "loop", 1, 2, 5])
def test_batched_losses_equal_per_task_losses(strategy):
    model = conv_bn()
    fm = FunctionalModel(model, F.cross_entropy)
    xs, ys, _, _ = class_episode(5, 4, 1, (1, 6, 6), 3)
    phi = fm.theta + 0.1 * torch.randn(5, fm.num_params, dtype=DT)
    losses = fm.losses(phi, xs, ys, strategy)
    g, _ = fm.grad_and_losses(phi, xs, ys, strategy)
    for i in range(5):
        f = task_loss_fn(model, F.cross_entropy, xs[i], ys[i])
        assert torch.allclose(losses[i], f(phi[i]), rtol=1e-13)
        w = phi[i].clone().requires_grad_(True)
        assert torch.allclose(g[i], torch.autograd.grad(f(w), w)[0], rtol=1e-11, atol=1e-14)


def test_batchnorm_uses_each_tasks_own_statistics():
    model = conv_bn()
    fm = FunctionalModel(model, F.cross_entropy)
    x = torch.randn(2, 4, 1, 6, 6, dtype=DT)
    x[1] = x[1] * 10 + 3  # a different scale: normalised away only with per-task statistics
    out = fm.outputs(fm.theta.expand(2, -1), x)
    assert torch.allclose(out[0], model(x[0]), atol=1e-12)
    assert torch.allclose(out[1], model(x[1]), atol=1e-12)


def test_batchnorm_with_running_stats_is_refused_with_a_fix():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"track_running_stats=False") as e:
        check_batchnorm(model)
    assert "'1'" in str(e.value)
    with pytest.raises(ValueError, match="running statistics"):
        FunctionalModel(model, F.cross_entropy)


def test_mixed_dtypes_are_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].double()
    with pytest.raises(ValueError, match="share dtype"):
        FunctionalModel(model, F.cross_entropy)


def test_model_without_parameters_is_refused():
    with pytest.raises(ValueError, match="no parameters"):
        FunctionalModel(nn.ReLU(), F.mse_loss)


def test_leaves_are_contiguous_copies_of_each_parameters_part():
    """FunctionalModel.leaves: one contiguous, grad-requiring copy per parameter tensor (one
    split_with_sizes_copy), equal to flat's parts, not sharing its storage (a later change
    of flat does not reach them), [t, *shape] for a [t, P] span and [*shape] for [P]."""
    from imaml_fast.models import omniglot_conv

    fm = FunctionalModel(omniglot_conv(3, filters=4).double(), F.cross_entropy)
    flat = torch.randn(3, fm.num_params, dtype=torch.float64)
    leaves = fm.leaves(flat[1:])
    for leaf, part, shape in zip(leaves, fm.split(flat[1:]), fm.shapes):
        assert leaf.is_contiguous() and leaf.requires_grad and leaf.is_leaf
        assert leaf.shape == (2, *shape) and torch.equal(leaf, part)
    before = [t.detach().clone() for t in leaves]
    flat.add_(1.0)
    assert all(torch.equal(t, b) for t, b in zip(leaves, before))
    one = fm.leaves(flat[0])
    assert [t.shape for t in one] == [torch.Size(s) for s in fm.shapes]
    with pytest.raises(ValueError, match=r"expected \[\.\.\., \d+\] \(the model's parameter count\)"):
        fm.leaves(flat[:, :-1])

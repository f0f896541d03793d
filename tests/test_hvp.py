import pytest
import torch
import torch.nn.functional as F

from _helpers import DT, class_episode, conv_bn, flat_params, hessian, mlp, task_loss_fn
from imaml_fast import BatchedHVP, FunctionalModel

CASES = {
    "mlp": (mlp, (3,), 2),
    "conv_bn": (conv_bn, (1, 6, 6), 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["fwdrev", "revrev"])
@pytest.mark.parametrize("strategy", ["vmap", "loop", 2])
def test_matches_materialised_hessian(case, mode, strategy):
    make, shape, n_way = CASES[case]
    model = make()
    T = 3
    xs, ys, _, _ = class_episode(T, 5, 1, shape, n_way)
    fm = FunctionalModel(model, F.cross_entropy)
    phi = flat_params(model) + 0.1 * torch.randn(T, fm.num_params, dtype=DT)
    v = torch.randn(T, fm.num_params, dtype=DT)
    hvp = BatchedHVP(fm, phi, xs, ys, mode, strategy, need_grad=True)
    hv = hvp(v)
    hv2 = hvp(2 * v)  # the graph (revrev) is reused for a second product
    for i in range(T):
        f = task_loss_fn(model, F.cross_entropy, xs[i], ys[i])
        H = hessian(f, phi[i])
        assert torch.allclose(hv[i], H @ v[i], rtol=1e-10, atol=1e-12)
        assert torch.allclose(hv2[i], 2 * (H @ v[i]), rtol=1e-10, atol=1e-12)
        w = phi[i].clone().requires_grad_(True)
        g = torch.autograd.grad(f(w), w)[0]
        assert torch.allclose(hvp.grad[i], g, rtol=1e-12, atol=1e-14)
        assert torch.allclose(hvp.losses[i], f(phi[i]), rtol=1e-12)
    assert hvp.calls == 2


def test_modes_agree_and_auto_is_revrev():
    model = mlp()
    xs, ys, _, _ = class_episode(4, 6, 1, (3,), 2)
    fm = FunctionalModel(model, F.cross_entropy)
    phi = flat_params(model).expand(4, -1)
    v = torch.randn(4, fm.num_params, dtype=DT)
    a = BatchedHVP(fm, phi, xs, ys, "fwdrev")(v)
    b = BatchedHVP(fm, phi, xs, ys, "auto")
    assert b.mode == "revrev"
    assert torch.allclose(a, b(v), rtol=1e-11, atol=1e-13)


def test_loss_linear_in_parameters_has_zero_hessian():
    model = torch.nn.Linear(3, 1, bias=False).to(DT)
    fm = FunctionalModel(model, lambda out, y: (out.squeeze(-1) * y).mean())
    xs = torch.randn(2, 4, 3, dtype=DT)
    ys = torch.randn(2, 4, dtype=DT)
    phi = flat_params(model).expand(2, -1)
    for mode in ("fwdrev", "revrev"):
        hv = BatchedHVP(fm, phi, xs, ys, mode)(torch.randn(2, 3, dtype=DT))
        assert torch.equal(hv, torch.zeros(2, 3, dtype=DT))

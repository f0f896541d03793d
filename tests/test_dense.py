import pytest
import torch
import torch.nn.functional as F

from _helpers import DT, class_episode, conv_bn, hessian, mlp, rel_err, task_loss_fn
from imaml_fast import CG_CONVERGED, CG_NEGATIVE_CURVATURE, FunctionalModel, IMAMLConfig, meta_gradient
from imaml_fast.dense import DENSE_MAX_BYTES, dense_bytes, dense_cg_ref, support_hessians


@pytest.mark.parametrize("strategy", ["loop", "vmap", 2])
@pytest.mark.parametrize("make,shape,n_way", [(mlp, (3,), 2), (conv_bn, (1, 6, 6), 3)])
def test_support_hessians_match_autograd(make, shape, n_way, strategy):
    model = make()
    fm = FunctionalModel(model, F.cross_entropy)
    xs, ys, _, _ = class_episode(3, 5, 1, shape, n_way)
    phi = fm.theta + 0.1 * torch.randn(3, fm.num_params, dtype=DT)
    H = support_hessians(fm, phi, xs, ys, strategy, chunk=7)  # odd chunks of the basis
    for i in range(3):
        expected = hessian(task_loss_fn(model, F.cross_entropy, xs[i], ys[i]), phi[i])
        torch.testing.assert_close(H[i], expected, rtol=1e-10, atol=1e-12)


def test_dense_cg_ref_solves_and_flags():
    T, P = 3, 12
    Q, _ = torch.linalg.qr(torch.randn(T, P, P, dtype=DT))
    eig = torch.rand(T, P, dtype=DT) + 0.1
    eig[2, 0] = -50.0  # shift + scale * H indefinite for task 2
    H = Q @ torch.diag_embed(eig) @ Q.transpose(1, 2)
    b = torch.randn(T, P, dtype=DT)
    b[2] = Q[2, :, 0]
    x, iters, res, status = dense_cg_ref(H, b, 1.0, 0.5, P, 1e-12)
    A = torch.eye(P, dtype=DT) + 0.5 * H
    torch.testing.assert_close(x[:2], torch.linalg.solve(A[:2], b[:2]), rtol=1e-9, atol=1e-11)
    assert status.tolist() == [CG_CONVERGED, CG_CONVERGED, CG_NEGATIVE_CURVATURE]
    assert torch.equal(x[2], b[2])


@pytest.mark.parametrize("solver", ["gd", "gd_armijo", "agd", "hf"])
def test_dense_meta_gradient_equals_matrix_free(solver):
    model = conv_bn()
    ep = class_episode(4, 5, 4, (1, 6, 6), 3)
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2 if solver == "hf" else 3, cg_steps=6,
                      backend="torch")
    dense = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(cg_dense="always"))
    free = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(cg_dense="never"))
    ref = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(backend="reference"))
    assert dense.hvp == "dense" and free.hvp == "revrev"
    for other in (free, ref):
        assert rel_err(dense.task_grads_flat, other.task_grads_flat) < 1e-10
        assert torch.equal(dense.cg_iters, other.cg_iters) and torch.equal(dense.cg_status, other.cg_status)
        assert rel_err(dense.inner_loss, other.inner_loss) < 1e-12


def test_auto_is_matrix_free_and_reference_has_no_dense_path():
    model = mlp()
    ep = class_episode(2, 4, 4, (3,), 2)
    r = meta_gradient(model, F.cross_entropy, *ep, IMAMLConfig(inner_steps=1))
    assert r.hvp == "revrev"
    with pytest.raises(ValueError, match="no dense CG"):
        meta_gradient(model, F.cross_entropy, *ep, IMAMLConfig(inner_steps=1, backend="reference", cg_dense="always"))
    with pytest.raises(ValueError, match="IMAMLConfig.cg_dense="):
        IMAMLConfig(cg_dense="sometimes")


def test_always_refuses_hessians_over_the_memory_bound_before_computing_anything():
    assert dense_bytes(32, 1761, torch.float32) == 32 * 1761 * 1761 * 4
    model = mlp(3, 4000, 2)  # P = 24,002: two float64 Hessians take 8.6 GiB
    before = [p.detach().clone() for p in model.parameters()]
    ep = class_episode(2, 4, 4, (3,), 2)
    assert dense_bytes(2, 24_002, DT) > DENSE_MAX_BYTES
    with pytest.raises(ValueError, match=r"cg_dense='always' would materialise 8\.6 GiB .*"
                                         r"cg_dense='auto'"):
        meta_gradient(model, F.cross_entropy, *ep, IMAMLConfig(inner_steps=1, cg_dense="always"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the first-order solve materialises nothing, so the bound does not apply
    r = meta_gradient(model, F.cross_entropy, *ep,
                      IMAMLConfig(inner_steps=1, cg_steps=0, cg_dense="always"))
    assert r.hvp == "revrev" and torch.isfinite(r.grads_flat).all()


def test_the_memory_bound_counts_the_hessians_of_one_chunk(monkeypatch):
    """With task_chunk the dense path holds one chunk's Hessians at a time, so the bound is
    checked for a chunk: a bound that two tasks' Hessians exceed refuses T = 2 at once,
    naming task_chunk, and allows chunks of one task, which give what the matrix-free
    solve gives."""
    from imaml_fast import implicit

    model = mlp(3, 4, 2)
    P = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(implicit, "DENSE_MAX_BYTES", dense_bytes(1, P, DT))
    ep = class_episode(2, 4, 4, (3,), 2)
    cfg = IMAMLConfig(inner_steps=2, cg_steps=P, cg_tol=0.0, cg_dense="always")
    with pytest.raises(ValueError, match=r"\(2 tasks x .*\(a smaller task_chunk\)"):
        meta_gradient(model, F.cross_entropy, *ep, cfg)
    r = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(task_chunk=1))
    free = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(cg_dense="never"))
    assert r.hvp == "dense" and r.task_chunks == 2
    assert torch.allclose(r.task_grads_flat, free.task_grads_flat, rtol=1e-8, atol=1e-12)

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import (DT, class_episode, conv_bn, exact_implicit, flat_params, grad, mlp, rel_err,
                      task_loss_fn)
from imaml_fast import (CG_CONVERGED, CG_NEGATIVE_CURVATURE, IMAMLConfig, meta_gradient)

CASES = {"mlp": (mlp, (3,), 2), "conv_bn": (conv_bn, (1, 6, 6), 3)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("solver,hvp", [("gd", "fwdrev"), ("gd", "revrev"), ("gd_armijo", "revrev"),
                                        ("hf", "auto")])
def test_matches_exact_implicit_gradient(case, solver, hvp):
    make, shape, n_way = CASES[case]
    model = make()
    xs, ys, xq, yq = class_episode(3, 6, 4, shape, n_way)
    P = sum(p.numel() for p in model.parameters())
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2 if solver == "hf" else 5, lam=2.0,
                      inner_lr=0.1, cg_steps=P, cg_tol=1e-13, hvp=hvp, cg_damping=0.3)
    r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
    exact = exact_implicit(model, F.cross_entropy, r.adapted_flat, xs, ys, xq, yq, 2.0, 0.3)
    assert (r.cg_status == CG_CONVERGED).all()
    assert rel_err(r.task_grads_flat, exact) <= 1e-6
    assert torch.allclose(r.grads_flat, exact.mean(0), rtol=1e-6, atol=1e-12)
    # the dict views carry the same numbers in the parameters' shapes
    for name, p in model.named_parameters():
        assert r.grads[name].shape == p.shape and r.task_grads[name].shape == (3, *p.shape)


@pytest.mark.parametrize("solver", ["gd", "gd_armijo", "agd", "hf"])
def test_linear_regression_closed_form(solver):
    """phi*(theta) = (2/N X'X + lam I)^-1 (2/N X'y + lam theta): autograd through this
    closed form gives the exact meta-gradient."""
    T, N, M, d, lam = 4, 7, 5, 3, 1.5
    model = nn.Linear(d, 1, bias=False).to(DT)
    xs, xq = torch.randn(T, N, d, dtype=DT), torch.randn(T, M, d, dtype=DT)
    ys, yq = torch.randn(T, N, 1, dtype=DT), torch.randn(T, M, 1, dtype=DT)
    theta = flat_params(model).requires_grad_(True)
    expected = []
    for i in range(T):
        A = 2.0 / N * xs[i].T @ xs[i] + lam * torch.eye(d, dtype=DT)
        phi = torch.linalg.solve(A, 2.0 / N * xs[i].T @ ys[i, :, 0] + lam * theta)
        lq = F.mse_loss(xq[i] @ phi, yq[i, :, 0])
        expected.append(torch.autograd.grad(lq, theta)[0])
    expected = torch.stack(expected)
    L = max(torch.linalg.eigvalsh(2.0 / N * xs[i].T @ xs[i]).max().item() for i in range(T)) + lam
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2 if solver == "hf" else 600,
                      inner_lr=1.0 / L, lam=lam, cg_steps=d, cg_tol=1e-14, hf_cg_steps=d)
    r = meta_gradient(model, F.mse_loss, xs, ys, xq, yq, cfg)
    assert rel_err(r.task_grads_flat, expected) <= 1e-9
    assert torch.allclose(r.grads["weight"].flatten(), expected.mean(0), rtol=1e-9)


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("solver,hvp,batching", [
    ("gd", "auto", "auto"), ("gd", "fwdrev", "vmap"), ("gd", "revrev", "loop"),
    ("gd", "revrev", 3), ("hf", "revrev", "vmap"), ("hf", "fwdrev", 2),
    ("gd_armijo", "auto", "auto"), ("gd_armijo", "fwdrev", 2),
    ("agd", "auto", "auto"), ("agd", "revrev", "loop"), ("agd", "fwdrev", 3)])
def test_batched_equals_reference(T, solver, hvp, batching):
    model = conv_bn(n_way=3, channels=3)
    xs, ys, xq, yq = class_episode(T, 3, 5, (1, 6, 6), 3)  # odd sizes: N=3, M=5, P=120
    # gd_armijo and agd at a step size their line search has to cut (both branches run)
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2 if solver == "hf" else 4, cg_steps=5,
                      hvp=hvp, task_batching=batching,
                      inner_lr=6.0 if solver in ("gd_armijo", "agd") else 0.3)
    a = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(backend="torch"))
    b = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(backend="reference"))
    assert (a.backend, b.backend) == ("torch", "reference")
    for field in ("grads_flat", "task_grads_flat", "adapted_flat", "inner_loss", "query_loss",
                  "cg_residual", "inner_residual", "first_order_cosine"):
        assert rel_err(getattr(a, field), getattr(b, field)) <= 1e-10, field
    assert torch.equal(a.cg_iters, b.cg_iters) and torch.equal(a.cg_status, b.cg_status)


def _independent_inner_residual(model, loss_fn, theta, phi, xs, ys, lam):
    """||grad L_i(phi_i) + lam (phi_i - theta)|| / ||grad L_i(theta)|| by per-task autograd."""
    out = []
    for i in range(phi.shape[0]):
        f = task_loss_fn(model, loss_fn, xs[i], ys[i])
        out.append((grad(f, phi[i]) + lam * (phi[i] - theta)).norm() / grad(f, theta).norm())
    return torch.stack(out)


@pytest.mark.parametrize("solver", ["gd", "gd_armijo", "agd", "hf"])
@pytest.mark.parametrize("path", ["revrev", "fwdrev", "dense", "first_order", "reference"])
def test_inner_residual_is_the_gradient_ratio(solver, path):
    """MetaGradient.inner_residual on every path that produces it (where the solver ends
    knowing grad F, where the HVP's graph gives the support gradient, and where it is one
    more evaluation) against per-task autograd at theta and at the returned phi_i."""
    model = conv_bn(n_way=3, channels=3)
    xs, ys, xq, yq = class_episode(4, 3, 5, (1, 6, 6), 3)
    lam = 1.5
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2 if solver == "hf" else 4, lam=lam,
                      cg_steps=0 if path == "first_order" else 3, inner_lr=0.3,
                      hvp="fwdrev" if path == "fwdrev" else "revrev",
                      cg_dense="always" if path == "dense" else "never",
                      backend="reference" if path == "reference" else "torch")
    r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
    expected = _independent_inner_residual(model, F.cross_entropy, flat_params(model),
                                           r.adapted_flat, xs, ys, lam)
    assert r.inner_residual.shape == (4,) and r.inner_residual.dtype == DT
    assert rel_err(r.inner_residual, expected) <= 1e-10
    assert (expected > 0).all() and (expected < 1).all()  # the inner loop made progress


@pytest.mark.parametrize("cg_steps", [0, 3])
def test_reference_takes_no_support_pass_of_its_own_for_diagnostics(cg_steps):
    """The reference, the authors' structure, evaluates each task's support loss once per
    inner step and once per Hessian-vector product (the graph rebuilt each time); its inner
    residual and support loss reuse the first product's gradient, so they cost a pass of
    their own only where CG runs no product. The values are checked against per-task
    autograd in test_inner_residual_is_the_gradient_ratio."""
    model = conv_bn(n_way=3, channels=3)
    xs, ys, xq, yq = class_episode(4, 3, 5, (1, 6, 6), 3)
    assert xs.shape[1] != xq.shape[1]  # support and query calls told apart by batch size
    sizes = []

    def counting_loss(out, y):
        sizes.append(out.shape[0])
        return F.cross_entropy(out, y)

    K = 4
    cfg = IMAMLConfig(inner_solver="gd", inner_steps=K, lam=1.5, inner_lr=0.3,
                      cg_steps=cg_steps, cg_tol=0.0, backend="reference")
    r = meta_gradient(model, counting_loss, xs, ys, xq, yq, cfg)
    T = xs.shape[0]
    products = int(r.cg_iters.sum())
    assert products == T * cg_steps
    assert sizes.count(xq.shape[1]) == T
    # + 1: the input check runs the loss once on task 0's support set (validation.py)
    assert sizes.count(xs.shape[1]) == 1 + T * K + (products if cg_steps else T)
    support = torch.stack([task_loss_fn(model, F.cross_entropy, xs[i], ys[i])(r.adapted_flat[i])
                           for i in range(T)])
    assert rel_err(r.inner_loss, support) <= 1e-12


def test_inner_residual_tells_a_solved_inner_loop_from_a_diverged_one():
    """On least squares (task i's Hessian 2/N X_i'X_i, L_i its largest eigenvalue + lam): at
    lr = 3 / min_i L_i the line search solves every task (residual below 1e-9), the fixed step
    diverges on every task (residual above 1), and no inner step at all is a residual of
    exactly 1."""
    T, N, d, lam = 3, 8, 4, 0.5
    torch.manual_seed(3)
    model = nn.Linear(d, 1, bias=False).to(DT)
    xs, xq = torch.randn(T, N, d, dtype=DT), torch.randn(T, N, d, dtype=DT)
    ys, yq = torch.randn(T, N, 1, dtype=DT), torch.randn(T, N, 1, dtype=DT)
    L = min(torch.linalg.eigvalsh(2.0 / N * xs[i].T @ xs[i]).max().item() for i in range(T)) + lam
    cfg = IMAMLConfig(inner_steps=300, inner_lr=3.0 / L, lam=lam, cg_steps=d, backend="torch")
    solved = meta_gradient(model, F.mse_loss, xs, ys, xq, yq, cfg.replace(inner_solver="gd_armijo"))
    diverged = meta_gradient(model, F.mse_loss, xs, ys, xq, yq, cfg.replace(inner_steps=20))
    none = meta_gradient(model, F.mse_loss, xs, ys, xq, yq, cfg.replace(inner_steps=0))
    assert solved.inner_residual.max() < 1e-9
    assert diverged.inner_residual.min() > 1
    assert torch.equal(none.inner_residual, torch.ones(T, dtype=DT))
    ref = meta_gradient(model, F.mse_loss, xs, ys, xq, yq, cfg.replace(inner_steps=0,
                                                                      backend="reference"))
    assert torch.equal(ref.inner_residual, torch.ones(T, dtype=DT))


def _tanh_regression(T=8, seed=0):
    """Sine regression on a tanh MLP after 3 inner steps: indefinite support Hessians, so some
    tasks' CG iterates outgrow the bound a minimiser would keep them in (lam 1, damping 2)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(),
                          nn.Linear(20, 1)).to(DT)
    xs, xq = 3 * torch.randn(T, 10, 1, dtype=DT), 3 * torch.randn(T, 10, 1, dtype=DT)
    cfg = IMAMLConfig(inner_steps=3, inner_lr=0.02, lam=1.0, cg_steps=20, cg_damping=2.0)
    return model, (xs, 4 * torch.sin(xs), xq, 4 * torch.sin(xq)), cfg


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cg_clip_scales_long_solutions_to_the_minimiser_bound(backend):
    """cg_clip: g_i * min(1, ||b_i|| lam / damping / ||g_i||), b_i the query gradient at phi_i
    (per-task autograd), g_i the unclipped solution; cg_clipped marks exactly those scaled."""
    model, ep, cfg = _tanh_regression()
    cfg = cfg.replace(backend=backend)
    plain = meta_gradient(model, F.mse_loss, *ep, cfg)
    clip = meta_gradient(model, F.mse_loss, *ep, cfg.replace(cg_clip=True))
    assert not plain.cg_clipped.any()
    assert torch.equal(plain.adapted_flat, clip.adapted_flat)
    b = torch.stack([grad(task_loss_fn(model, F.mse_loss, ep[2][i], ep[3][i]), clip.adapted_flat[i])
                     for i in range(8)])
    bound = b.norm(dim=1) * cfg.lam / cfg.cg_damping
    norm = plain.task_grads_flat.norm(dim=1)
    assert torch.equal(clip.cg_clipped, norm > bound)
    assert 0 < int(clip.cg_clipped.sum()) < 8  # both kinds of task
    expected = plain.task_grads_flat * torch.clamp(bound / norm, max=1.0).unsqueeze(1)
    assert rel_err(clip.task_grads_flat, expected) <= 1e-12
    assert torch.allclose(clip.task_grads_flat.norm(dim=1), torch.minimum(norm, bound), rtol=1e-12)


def test_cg_clip_batched_equals_reference():
    model, ep, cfg = _tanh_regression(T=5, seed=1)
    cfg = cfg.replace(cg_clip=True, cg_steps=6)
    a = meta_gradient(model, F.mse_loss, *ep, cfg.replace(backend="torch"))
    b = meta_gradient(model, F.mse_loss, *ep, cfg.replace(backend="reference"))
    assert torch.equal(a.cg_clipped, b.cg_clipped) and a.cg_clipped.any()
    assert rel_err(a.task_grads_flat, b.task_grads_flat) <= 1e-10


def test_cg_clip_never_binds_at_a_minimiser():
    """Least squares solved exactly: H + lam I is positive definite, so the damped system's
    solution is within the bound, and cg_clip returns the exact (I + (H + dI)/lam)^-1 b."""
    T, N, M, d, lam, damping = 4, 7, 5, 3, 1.5, 0.7
    torch.manual_seed(2)
    model = nn.Linear(d, 1, bias=False).to(DT)
    xs, xq = torch.randn(T, N, d, dtype=DT), torch.randn(T, M, d, dtype=DT)
    ys, yq = torch.randn(T, N, 1, dtype=DT), torch.randn(T, M, 1, dtype=DT)
    cfg = IMAMLConfig(inner_solver="hf", inner_steps=2, lam=lam, cg_steps=d, cg_tol=1e-14,
                      hf_cg_steps=d, cg_damping=damping, cg_clip=True)
    r = meta_gradient(model, F.mse_loss, xs, ys, xq, yq, cfg)
    exact = exact_implicit(model, F.mse_loss, r.adapted_flat, xs, ys, xq, yq, lam, damping)
    assert not r.cg_clipped.any()
    assert rel_err(r.task_grads_flat, exact) <= 1e-10


@pytest.mark.parametrize("backend,batching", [("torch", "vmap"), ("torch", "loop"),
                                              ("torch", 2), ("cpp", "vmap")])
def test_inner_tol_batched_equals_reference(backend, batching):
    """inner_tol with tasks that stop at different steps: every batched path (tasks leaving a
    vmap, a loop, chunks) gives the reference's per-task steps, adapted parameters and
    meta-gradients; each stopped task's inner residual is within the tolerance."""
    model = conv_bn()
    T = 5
    xs, ys, xq, yq = class_episode(T, 4, 4, (1, 6, 6), 3)
    xs = xs * torch.tensor([0.2, 0.5, 1.0, 2.0, 4.0], dtype=DT).view(T, 1, 1, 1, 1)
    cfg = IMAMLConfig(inner_solver="gd_armijo", inner_steps=40, inner_lr=0.5, inner_tol=0.02,
                      cg_damping=1.0, task_batching=batching)
    a = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(backend=backend))
    b = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(backend="reference"))
    steps = a.inner_steps.tolist()
    assert steps == b.inner_steps.tolist() and a.inner_steps.dtype == torch.long
    assert len(set(steps)) >= 2, steps
    stopped = a.inner_steps < cfg.inner_steps
    assert stopped.any() and (a.inner_residual[stopped] <= cfg.inner_tol).all()
    assert rel_err(a.adapted_flat, b.adapted_flat) <= 1e-10
    assert rel_err(a.task_grads_flat, b.task_grads_flat) <= 1e-9
    assert rel_err(a.inner_residual, b.inner_residual) <= 1e-9
    # batched gradient evaluations: the first, one per iteration the slowest task ran, the
    # query gradient (revrev takes grad F at phi from the solver)
    assert a.evals["grad"] == 1 + max(steps) + 1


def test_inner_steps_reports_the_fixed_count_without_a_tolerance():
    model = conv_bn()
    xs, ys, xq, yq = class_episode(3, 4, 4, (1, 6, 6), 3)
    for solver in ("gd", "gd_armijo", "agd", "hf"):
        for backend in ("torch", "reference"):
            cfg = IMAMLConfig(inner_solver=solver, inner_steps=3, backend=backend)
            r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
            assert r.inner_steps.tolist() == [3, 3, 3], (solver, backend)


def test_model_parameters_are_not_changed():
    model = conv_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys, xq, yq = class_episode(2, 4, 4, (1, 6, 6), 3)
    meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, IMAMLConfig(inner_steps=3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_explicit_params_override_the_models():
    model = mlp()
    xs, ys, xq, yq = class_episode(2, 4, 4, (3,), 2)
    params = {n: p.detach() + 0.5 for n, p in model.named_parameters()}
    a = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, IMAMLConfig(inner_steps=2), params=params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    b = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, IMAMLConfig(inner_steps=2))
    assert torch.equal(a.grads_flat, b.grads_flat)


@pytest.mark.parametrize("path", ["revrev", "fwdrev", "dense", "reference", "first_order"])
def test_first_order_cosine_is_the_angle_to_the_query_gradient(path):
    """MetaGradient.first_order_cosine = cos(g_i, grad L_query(phi_i)), against the exact
    implicit gradient (materialised Hessians, linalg.solve) and autograd's query gradient.
    Undamped with a small lam the Hessian turns the gradient (cosines well below 1); with a
    large cg_damping the operator is nearly a multiple of I and the cosines approach 1."""
    model = mlp()
    xs, ys, xq, yq = class_episode(4, 6, 4, (3,), 2)
    P = sum(p.numel() for p in model.parameters())
    for damping, lam in ((0.0, 0.5), (1e4, 2.0)):
        cfg = IMAMLConfig(inner_steps=5, inner_lr=0.1, lam=lam, cg_damping=damping, cg_steps=P,
                          cg_tol=1e-13, hvp="fwdrev" if path == "fwdrev" else "revrev",
                          cg_dense="always" if path == "dense" else "never",
                          backend="reference" if path == "reference" else "torch")
        if path == "first_order":
            cfg = cfg.replace(cg_steps=0)
        r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
        assert path == "first_order" or (r.cg_status == CG_CONVERGED).all()
        gq = torch.stack([grad(task_loss_fn(model, F.cross_entropy, xq[i], yq[i]),
                               r.adapted_flat[i]) for i in range(4)])
        g = gq if path == "first_order" else exact_implicit(
            model, F.cross_entropy, r.adapted_flat, xs, ys, xq, yq, lam, damping)
        expected = F.cosine_similarity(g, gq, dim=1)
        assert r.first_order_cosine.shape == (4,) and r.first_order_cosine.dtype == DT
        assert (r.first_order_cosine - expected).abs().max() <= 1e-6
        if path == "first_order" or damping:
            assert (1 - r.first_order_cosine).abs().max() <= 1e-4
        else:
            assert r.first_order_cosine.min() < 0.99  # the Hessian term turned them


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_first_order_cosine_is_one_for_a_flat_query_loss(backend):
    """A loss with zero gradient gives g_i = 0 = gq_i: nothing is turned (1, not 0/0)."""
    model = mlp()
    xs, ys, xq, yq = class_episode(3, 4, 4, (3,), 2)
    r = meta_gradient(model, lambda out, y: F.cross_entropy(out, y) * 0.0, xs, ys, xq, yq,
                      IMAMLConfig(inner_steps=2, backend=backend))
    assert torch.equal(r.task_grads_flat, torch.zeros_like(r.task_grads_flat))
    assert torch.equal(r.first_order_cosine, torch.ones(3, dtype=DT))


def test_zero_cg_steps_is_the_first_order_gradient():
    model = mlp()
    xs, ys, xq, yq = class_episode(3, 4, 4, (3,), 2)
    r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, IMAMLConfig(inner_steps=3, cg_steps=0))
    for i in range(3):
        w = r.adapted_flat[i].clone().requires_grad_(True)
        from _helpers import task_loss_fn
        g = torch.autograd.grad(task_loss_fn(model, F.cross_entropy, xq[i], yq[i])(w), w)[0]
        assert torch.allclose(r.task_grads_flat[i], g, rtol=1e-12)
    assert (r.cg_iters == 0).all()


def test_indefinite_operator_is_flagged_never_nan():
    # A concave support loss: H = -2/N X'X, so I + H/lam is indefinite for a small lam.
    model = nn.Linear(3, 1, bias=False).to(DT)

    def concave(out, y):
        return -((out - y) ** 2).mean()

    xs, xq = torch.randn(4, 6, 3, dtype=DT), torch.randn(4, 6, 3, dtype=DT)
    ys, yq = torch.randn(4, 6, 1, dtype=DT), torch.randn(4, 6, 1, dtype=DT)
    for backend in ("torch", "reference"):
        r = meta_gradient(model, concave, xs, ys, xq, yq,
                          IMAMLConfig(inner_steps=0, lam=0.01, cg_steps=10, backend=backend))
        assert (r.cg_status == CG_NEGATIVE_CURVATURE).all()
        assert torch.isfinite(r.grads_flat).all() and torch.isfinite(r.cg_residual).all()


class _SavedTensorMeter:
    """Counts bytes of tensors saved for backward that are still alive."""

    def __init__(self):
        self.live = self.peak = 0

    class _Box:
        def __init__(self, t):
            self.t = t

    def pack(self, t):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        box = self._Box(t.detach())  # detached: keeping t itself would make a cycle through t.grad_fn
        weakref.finalize(box, self._free, n)
        return box

    def _free(self, n):
        self.live -= n

    @staticmethod
    def unpack(box):
        return box.t


@pytest.mark.parametrize("solver", ["gd", "gd_armijo", "agd", "hf"])
def test_memory_does_not_grow_with_inner_steps(solver):
    model = conv_bn()
    xs, ys, xq, yq = class_episode(3, 5, 5, (1, 6, 6), 3)
    peaks = []
    for steps in (2, 12):
        meter = _SavedTensorMeter()
        cfg = IMAMLConfig(inner_solver=solver, inner_steps=steps, task_batching="loop", hvp="revrev")
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
        assert meter.peak > 0
        assert meter.live == 0  # nothing of any graph outlives the call
        assert r.grads_flat.grad_fn is None and not r.adapted_flat.requires_grad
        peaks.append(meter.peak)
    assert peaks[0] == peaks[1]


def test_custom_operator_matches_exact_solve_on_both_backends():
    """(shift I + scale H) g = grad L_query, here the iMAML authors' (1 + c) I + H / (lam + d)."""
    model = mlp()
    xs, ys, xq, yq = class_episode(2, 5, 4, (3,), 2)
    shift, scale = 1.0 + 1.0, 1.0 / (2.0 + 10.0)
    cfg = IMAMLConfig(inner_steps=3, cg_steps=32, cg_tol=1e-13)
    for backend in ("torch", "reference"):
        r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(backend=backend),
                          operator=(shift, scale))
        # the paper-form helper with lam' = 1/scale and damping chosen to give the same shift
        lam_eq = 1.0 / scale
        exact = exact_implicit(model, F.cross_entropy, r.adapted_flat, xs, ys, xq, yq, lam_eq,
                               damping=(shift - 1.0) * lam_eq)
        assert rel_err(r.task_grads_flat, exact) <= 1e-8
    with pytest.raises(ValueError, match="operator="):
        meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg, operator=(0.0, 1.0))


# ---- task_chunk: consecutive chunks of tasks, each solved whole before the next ----------

CHUNK_PER_TASK = ("task_grads_flat", "adapted_flat", "cg_residual", "inner_loss",
                  "inner_residual", "query_loss", "query_outputs", "first_order_cosine")
CHUNK_EXACT = ("cg_iters", "cg_status", "cg_clipped", "inner_steps")


def _chunk_case(T=7):
    torch.manual_seed(3)
    model = conv_bn()
    xs, ys, xq, yq = class_episode(T, 5, 4, (1, 6, 6), 3)
    cfg = IMAMLConfig(inner_steps=4, inner_lr=0.1, lam=1.0, cg_steps=6, cg_tol=0.0,
                      task_batching="vmap", task_threads=1)
    return model, (xs, ys, xq, yq), cfg


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("chunk,threads", [(3, 1), (2, 1), (4, 2), (1, 1)])
def test_chunks_give_each_task_what_one_call_gives_it(backend, chunk, threads):
    """T = 7 tasks in chunks of at most `chunk` (3: chunks of 3, 2, 2), one after another,
    with task_threads' groups inside each chunk: every per-task field equals one call's to
    float64 rounding, the mean is over all 7 tasks, the batched-call counts add up over the
    chunks, and the reference path agrees."""
    if backend == "cpp":
        from imaml_fast import backend_info

        if not {b["name"]: b["available"] for b in backend_info("cpu", DT)}["cpp"]:
            pytest.skip("imaml_fast._C is not built")
    model, ep, cfg = _chunk_case()
    cfg = cfg.replace(backend=backend)
    one = meta_gradient(model, F.cross_entropy, *ep, cfg)
    ours = meta_gradient(model, F.cross_entropy, *ep,
                         cfg.replace(task_chunk=chunk, task_threads=threads))
    n_chunks = -(-7 // chunk)
    assert one.task_chunks == 1 and ours.task_chunks == n_chunks
    assert rel_err(ours.grads_flat, one.grads_flat) <= 1e-12
    assert torch.allclose(ours.grads_flat, ours.task_grads_flat.mean(0), rtol=1e-13, atol=0)
    for name in CHUNK_PER_TASK:
        a, b = getattr(ours, name), getattr(one, name)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12), name
    for name in CHUNK_EXACT:
        assert torch.equal(getattr(ours, name), getattr(one, name)), name
    # the same batched calls per chunk as one call makes (a chunk of one task makes them too)
    assert ours.evals == {k: n_chunks * v for k, v in one.evals.items()}
    ref = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(backend="reference"))
    assert rel_err(ours.task_grads_flat, ref.task_grads_flat) <= 1e-9


@pytest.mark.parametrize("chunk,most", [(None, 7), (3, 3), (2, 2)])
def test_chunks_bound_the_product_graphs_alive_at_once(monkeypatch, chunk, most):
    """What task_chunk is for: at most `chunk` tasks' Hessian-vector-product graphs exist at
    any time (all 7 without chunks), since each chunk's CG ends, and its graph is released,
    before the next chunk starts."""
    from imaml_fast import implicit

    alive, peak = [0], [0]

    class Counted(implicit.BatchedHVP):
        def __init__(self, fm, phi, *args, **kw):
            super().__init__(fm, phi, *args, **kw)
            self._tasks = phi.shape[0]
            alive[0] += self._tasks
            peak[0] = max(peak[0], alive[0])

        def release(self):
            super().release()
            alive[0] -= self._tasks

    monkeypatch.setattr(implicit, "BatchedHVP", Counted)
    model, ep, cfg = _chunk_case()
    r = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(task_chunk=chunk, hvp="revrev"))
    assert peak[0] == most and alive[0] == 0 and r.task_grads_flat.shape[0] == 7


def test_chunked_adapt_and_meta_step_match_one_call():
    """IMAML.adapt and a meta-step in chunks end where one call ends. (SGD: Adam's first step
    is lr * sign(g), and the convolution bias before BatchNorm has a gradient of zero up to
    rounding, whose sign differs between batch sizes.)"""
    from imaml_fast import IMAML

    results = {}
    for chunk in (None, 3):
        model, (xs, ys, xq, yq), cfg = _chunk_case()
        learner = IMAML(model, F.cross_entropy, cfg.replace(task_chunk=chunk),
                        torch.optim.SGD(model.parameters(), lr=0.1))
        adapted = learner.adapt(xs, ys)
        learner.meta_step(xs, ys, xq, yq)
        results[chunk] = (adapted, {k: v.detach().clone() for k, v in model.named_parameters()})
    for name, phi in results[None][0].items():
        assert torch.allclose(results[3][0][name], phi, rtol=1e-12, atol=1e-12), name
    for name, p in results[None][1].items():
        assert torch.allclose(results[3][1][name], p, rtol=1e-12, atol=1e-12), name


def test_the_reference_backend_runs_one_task_at_a_time_whatever_the_chunk():
    model, ep, cfg = _chunk_case(T=4)
    cfg = cfg.replace(backend="reference")
    a = meta_gradient(model, F.cross_entropy, *ep, cfg)
    b = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(task_chunk=2))
    assert b.task_chunks == 1 and torch.equal(a.task_grads_flat, b.task_grads_flat)


@pytest.mark.parametrize("bad", [0, -2, True, 2.5, "4"])
def test_task_chunk_refuses_what_is_not_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"IMAMLConfig.task_chunk=.*None \(all tasks at once\) "
                                         r"or an int >= 1"):
        IMAMLConfig(task_chunk=bad)


def test_the_inner_gradient_is_reduced_to_the_residual_before_the_cg_solve(monkeypatch):
    """gd_armijo knows grad F at phi; the engine reduces it to the [T] inner residual before
    the products start, so no [T, P] of it lives through the CG solve, and the residual is
    the one that gradient gives: ||grad L_support(phi) + lam (phi - theta)|| / ||grad F(theta)||."""
    from imaml_fast import implicit

    seen = {}
    solve_inner = implicit.solve_inner

    def spy_inner(*args, **kw):
        seen["inner"] = solve_inner(*args, **kw)
        seen["had_grad"] = seen["inner"].final_grad is not None
        return seen["inner"]

    class Spy(implicit.BatchedHVP):
        def __init__(self, *args, **kw):
            seen["held_at_cg"] = seen["inner"].final_grad is not None
            super().__init__(*args, **kw)

    monkeypatch.setattr(implicit, "solve_inner", spy_inner)
    monkeypatch.setattr(implicit, "BatchedHVP", Spy)
    model, (xs, ys, xq, yq), cfg = _chunk_case(T=3)
    cfg = cfg.replace(inner_solver="gd_armijo", hvp="revrev")
    r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
    assert seen["had_grad"] and not seen["held_at_cg"]
    theta = flat_params(model)
    for i in range(3):
        f = task_loss_fn(model, F.cross_entropy, xs[i], ys[i])
        g_phi, g_theta = grad(f, r.adapted_flat[i]), grad(f, theta)
        want = (g_phi + cfg.lam * (r.adapted_flat[i] - theta)).norm() / g_theta.norm()
        assert torch.allclose(r.inner_residual[i], want, rtol=1e-9), i

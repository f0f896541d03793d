import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import DT, class_episode, flat_params, grad, mlp, task_loss_fn
from imaml_fast import FunctionalModel
from imaml_fast.inner import (inner_agd, inner_gd, inner_gd_armijo, inner_hf, prox_update_ref,
                              regularised_loss)


def test_prox_update_formula():
    phi, g = torch.randn(3, 7, dtype=DT), torch.randn(3, 7, dtype=DT)
    theta = torch.randn(7, dtype=DT)
    out = prox_update_ref(phi, g, theta, 0.1, 2.0)
    for i in range(3):
        assert torch.allclose(out[i], phi[i] - 0.1 * (g[i] + 2.0 * (phi[i] - theta)), rtol=0, atol=1e-15)
    theta_t = theta.expand(3, -1).clone()
    assert torch.equal(prox_update_ref(phi, g, theta_t, 0.1, 2.0), out)


def linreg_tasks(T, N, d, scales):
    X = torch.randn(T, N, d, dtype=DT) * scales
    y = torch.randn(T, N, 1, dtype=DT)
    return X, y


def linreg_minimiser(X, y, theta, lam):
    """argmin_w mean((Xw - y)^2) + lam/2 ||w - theta||^2, in closed form."""
    N, d = X.shape[1], X.shape[2]
    A = 2.0 / N * X.transpose(1, 2) @ X + lam * torch.eye(d, dtype=DT)
    rhs = 2.0 / N * X.transpose(1, 2) @ y + lam * theta.view(1, d, 1)
    return torch.linalg.solve(A, rhs).squeeze(-1)


def linreg_problem(d, lam):
    """Three 6-point linear-regression tasks: the model, its tasks, theta, the exact proximal
    minimisers and the regularised objective's largest curvature L."""
    model = nn.Linear(d, 1, bias=False).to(DT)
    fm = FunctionalModel(model, F.mse_loss)
    X, y = linreg_tasks(3, 6, d, torch.ones(d, dtype=DT))
    exact = linreg_minimiser(X, y, fm.theta, lam)
    L = torch.linalg.eigvalsh(2.0 / 6 * X.transpose(1, 2) @ X).max().item() + lam
    return fm, X, y, fm.theta, exact, L


def test_gd_and_hf_converge_to_the_closed_form_minimiser():
    d, lam = 4, 0.5
    fm, X, y, theta, exact, L = linreg_problem(d, lam)
    gd = inner_gd(fm, theta, X, y, steps=800, lr=1.0 / L, lam=lam)
    assert torch.allclose(gd.phi, exact, rtol=1e-9, atol=1e-10)
    hf = inner_hf(fm, theta, X, y, steps=2, lam=lam, cg_steps=d, cg_tol=1e-14, ls_steps=5)
    assert torch.allclose(hf.phi, exact, rtol=1e-9, atol=1e-10)


def test_gd_and_hf_reach_the_same_minimiser_of_a_nonlinear_problem():
    model = mlp()
    fm = FunctionalModel(model, F.cross_entropy)
    xs, ys, _, _ = class_episode(3, 8, 1, (3,), 2)
    lam = 1.0
    gd = inner_gd(fm, fm.theta, xs, ys, steps=400, lr=0.5, lam=lam)
    hf = inner_hf(fm, fm.theta, xs, ys, steps=8, lam=lam, cg_steps=32, cg_tol=1e-12, ls_steps=20)
    g, _ = fm.grad_and_losses(hf.phi, xs, ys)
    assert (g + lam * (hf.phi - fm.theta)).norm(dim=1).max() < 1e-10  # stationary
    assert torch.allclose(gd.phi, hf.phi, rtol=1e-8, atol=1e-9)


def test_hf_beats_gd_for_equal_evaluations_on_an_ill_conditioned_problem():
    d, lam = 6, 1e-3
    scales = torch.logspace(0, -2, d, dtype=DT)  # Hessian eigenvalues spread over ~1e4
    model = nn.Linear(d, 1, bias=False).to(DT)
    fm = FunctionalModel(model, F.mse_loss)
    X, y = linreg_tasks(4, 20, d, scales)
    theta = fm.theta
    exact = linreg_minimiser(X, y, theta, lam)

    def objective(phi):
        return regularised_loss(fm.losses(phi, X, y), phi, theta, lam)

    hf = inner_hf(fm, theta, X, y, steps=2, lam=lam, cg_steps=d, cg_tol=0.0, ls_steps=10)
    budget = hf.grad_evals + hf.hvp_evals
    assert budget == 2 + 2 * d
    L = torch.linalg.eigvalsh(2.0 / 20 * X.transpose(1, 2) @ X).max().item() + lam
    gd = inner_gd(fm, theta, X, y, steps=budget, lr=1.0 / L, lam=lam)
    opt = objective(exact)
    gap_hf = objective(hf.phi) - opt
    gap_gd = objective(gd.phi) - opt
    assert (gap_hf < 1e-10).all()
    assert (gap_gd > 1e3 * gap_hf.clamp_min(1e-16)).all()
    assert (gap_gd > 1e-6).all()


def test_hf_line_search_never_increases_the_regularised_objective():
    model = mlp(hidden=8)
    fm = FunctionalModel(model, F.cross_entropy)
    xs, ys, _, _ = class_episode(5, 6, 1, (3,), 2)
    xs = xs * 3
    lam = 0.05  # weak proximal term: the Hessian can be indefinite, CG may flag
    prev = regularised_loss(fm.losses(fm.theta.expand(5, -1), xs, ys), fm.theta.expand(5, -1), fm.theta, lam)
    for k in range(1, 6):
        phi = inner_hf(fm, fm.theta, xs, ys, steps=k, lam=lam, cg_steps=10, cg_tol=1e-12, ls_steps=30).phi
        cur = regularised_loss(fm.losses(phi, xs, ys), phi, fm.theta, lam)
        assert torch.isfinite(cur).all()
        assert (cur <= prev + 1e-12).all()
        prev = cur


def _proximal_objective(f, theta, lam):
    """(F, w -> (grad F(w), F(w))) for F(w) = f(w) + lam/2 ||w - theta||^2, by autograd."""
    def objective(w):
        return f(w) + 0.5 * lam * torch.dot(w - theta, w - theta)

    def grad_and_value(w):
        w = w.detach().requires_grad_(True)
        val = objective(w)
        return torch.autograd.grad(val, w)[0], val.detach()

    return objective, grad_and_value


def _armijo_loop(f, theta, steps, lr, lam, tol=0.0, with_steps=False):
    """inner_gd_armijo's rule for one task, on a loss w [P] -> scalar, written out with
    autograd and Python control flow. Returns phi and the accept/reject sequence (and, with
    with_steps, the iterations run: fewer than `steps` where ||grad F|| <= tol ||grad F(theta)||
    stopped it)."""
    flat = 64 * torch.finfo(theta.dtype).eps
    _, grad_and_value = _proximal_objective(f, theta, lam)
    phi, t, history = theta.clone(), lr, []
    G, Fv = grad_and_value(phi)
    G0, ran = G.norm(), steps
    for k in range(steps):
        if tol > 0 and G.norm() <= tol * G0:
            ran = k
            break
        cand = phi - t * G
        Gc, Fc = grad_and_value(cand)
        level = abs(Fc - Fv) <= flat * abs(Fv) and Gc.norm() < G.norm()
        if torch.isfinite(Fc) and (Fc <= Fv - 1e-4 * t * torch.dot(G, G) or level):
            phi, G, Fv, t = cand, Gc, Fc, min(1.25 * t, lr)
            history.append(True)
        else:
            t = 0.5 * t
            history.append(False)
    return (phi, history, ran) if with_steps else (phi, history)


def test_gd_armijo_matches_an_independent_per_task_loop():
    model = mlp()
    fm = FunctionalModel(model, F.cross_entropy)
    xs, ys, _, _ = class_episode(4, 6, 1, (3,), 2)
    xs = xs * 2
    lam, lr, steps = 0.5, 8.0, 12
    out = inner_gd_armijo(fm, fm.theta, xs, ys, steps=steps, lr=lr, lam=lam)
    assert out.grad_evals == steps + 1
    none = inner_gd_armijo(fm, fm.theta, xs, ys, steps=0, lr=lr, lam=lam)
    assert none.grad_evals == 0 and torch.equal(none.phi, fm.theta.expand(4, -1))
    theta = flat_params(model)
    histories = []
    for i in range(4):
        phi, history = _armijo_loop(task_loss_fn(model, F.cross_entropy, xs[i], ys[i]), theta,
                                    steps, lr, lam)
        assert torch.allclose(out.phi[i], phi, rtol=1e-12, atol=1e-13), i
        histories += history
    assert any(histories) and not all(histories)  # both branches ran


def test_gd_armijo_converges_where_fixed_step_gd_diverges():
    lam = 0.5
    fm, X, y, theta, exact, L = linreg_problem(4, lam)
    gd = inner_gd(fm, theta, X, y, steps=200, lr=3.0 / L, lam=lam)  # past the 2 / L bound
    assert ((gd.phi - exact).norm(dim=1) > 1e3).all()
    ls = inner_gd_armijo(fm, theta, X, y, steps=1000, lr=3.0 / L, lam=lam)
    # to the last digits: past where the objective's decrease is lost in its rounding (about
    # 1e-8 from the minimiser), the steps that shrink the gradient are kept
    assert torch.allclose(ls.phi, exact, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("solver", [inner_gd_armijo, inner_agd])
def test_line_search_solvers_never_increase_the_objective_and_reject_non_finite_steps(solver):
    model = mlp(hidden=8)

    def loss(out, y):  # undefined (NaN) where any logit leaves [-2, 2]
        bad = (out.abs() > 2).any()
        return F.cross_entropy(out, y) + torch.where(bad, torch.nan, 0.0)

    fm = FunctionalModel(model, loss)
    xs, ys, _, _ = class_episode(5, 6, 1, (3,), 2)
    lam, theta = 0.05, fm.theta
    prev = regularised_loss(fm.losses(theta.expand(5, -1), xs, ys), theta.expand(5, -1), theta, lam)
    assert torch.isfinite(prev).all()
    for k in range(1, 8):
        phi = solver(fm, theta, xs, ys, steps=k, lr=50.0, lam=lam).phi
        cur = regularised_loss(fm.losses(phi, xs, ys), phi, theta, lam)
        assert torch.isfinite(cur).all()
        assert (cur <= prev * (1 + 64 * 2.0 ** -52)).all()  # up to rounding
        prev = cur
    assert (prev < regularised_loss(fm.losses(theta.expand(5, -1), xs, ys), theta.expand(5, -1),
                                    theta, lam)).all()


def test_gd_armijo_tol_stops_each_task_where_its_own_loop_would():
    """inner_tol: each task stops at the first iteration where ||grad F_i|| <= tol
    ||grad F_i(theta)||, and leaves the batch; its phi and step count are what the written-out
    loop gives for that task alone, whichever other tasks share the batch."""
    model = mlp()
    fm = FunctionalModel(model, F.cross_entropy)
    T = 5
    xs, ys, _, _ = class_episode(T, 6, 1, (3,), 2)
    xs = xs * torch.tensor([0.3, 1.0, 2.0, 4.0, 8.0], dtype=DT).view(T, 1, 1)
    lam, lr, steps, tol = 0.5, 8.0, 40, 0.05
    out = inner_gd_armijo(fm, fm.theta, xs, ys, steps=steps, lr=lr, lam=lam, tol=tol)
    theta = flat_params(model)
    ran = []
    for i in range(T):
        phi, _, k = _armijo_loop(task_loss_fn(model, F.cross_entropy, xs[i], ys[i]), theta,
                                 steps, lr, lam, tol=tol, with_steps=True)
        assert torch.allclose(out.phi[i], phi, rtol=1e-12, atol=1e-13), i
        ran.append(k)
    assert out.steps_taken.tolist() == ran
    assert len(set(ran)) >= 3 and max(ran) < steps  # tasks left the batch at different steps
    assert out.grad_evals == 1 + max(ran)
    # final_grad is grad F at each task's phi, and the tolerance holds there
    resid = out.final_grad.norm(dim=1) / out.grad0_norm
    assert (resid <= tol).all()
    for i in range(T):
        d = out.phi[i] - theta
        g = grad(task_loss_fn(model, F.cross_entropy, xs[i], ys[i]), out.phi[i])
        assert torch.allclose(out.final_grad[i], g + lam * d, rtol=1e-10, atol=1e-12)
    # alone, a task gets the same numbers and count as in the batch
    for i in (0, 4):
        alone = inner_gd_armijo(fm, fm.theta, xs[i:i + 1], ys[i:i + 1], steps=steps, lr=lr,
                                lam=lam, tol=tol)
        assert torch.allclose(alone.phi[0], out.phi[i], rtol=1e-12, atol=1e-13)
        assert alone.steps_taken.tolist() == [ran[i]]


def test_gd_armijo_tol_caps_at_inner_steps_and_stops_flat_tasks_at_once():
    model = mlp()
    fm = FunctionalModel(model, F.cross_entropy)
    xs, ys, _, _ = class_episode(3, 6, 1, (3,), 2)
    lam, lr = 0.5, 8.0
    full = inner_gd_armijo(fm, fm.theta, xs, ys, steps=6, lr=lr, lam=lam)
    tight = inner_gd_armijo(fm, fm.theta, xs, ys, steps=6, lr=lr, lam=lam, tol=1e-12)
    # a tolerance no task reaches changes nothing: same iterates, every task runs the cap
    assert torch.equal(tight.phi, full.phi) and torch.equal(tight.final_grad, full.final_grad)
    assert tight.steps_taken.tolist() == [6, 6, 6] == full.steps_taken.tolist()
    assert tight.grad_evals == full.grad_evals == 7
    # a task whose gradient at theta is zero (0/0: residual 0) stops before its first step
    flat = FunctionalModel(mlp(), lambda out, y: (out * 0).sum())
    r = inner_gd_armijo(flat, flat.theta, xs, ys, steps=6, lr=lr, lam=lam, tol=0.1)
    assert r.steps_taken.tolist() == [0, 0, 0] and r.grad_evals == 1
    assert torch.equal(r.phi, flat.theta.expand(3, -1))


def _agd_loop(f, theta, steps, lr, lam):
    """inner_agd's rule for one task, written out with autograd and Python control flow.
    Returns phi and the counts of (accepted steps with momentum kept, restarts after an
    accepted step, steps refused)."""
    objective, grad_and_value = _proximal_objective(f, theta, lam)
    phi, v, t = theta.clone(), theta.clone(), lr
    F_phi = objective(phi).detach()
    flat = 64 * torch.finfo(theta.dtype).eps
    counts = [0, 0, 0]
    for _ in range(steps):
        G, Fv = grad_and_value(v)
        cand = v - t * G
        Fc = objective(cand).detach()
        level = abs(Fc - Fv) <= flat * abs(Fv)
        armijo = bool(torch.isfinite(Fc) and (Fc <= Fv - 1e-4 * t * torch.dot(G, G) or level))
        if armijo and (Fc <= F_phi or (level and abs(Fc - F_phi) <= flat * abs(F_phi))):
            step = cand - phi
            q = (lam * t) ** 0.5
            restart = bool(torch.dot(G, step) > 0)
            counts[1 if restart else 0] += 1
            phi, F_phi = cand, Fc
            v = phi + (0.0 if restart else (1 - q) / (1 + q)) * step
            t = min(1.25 * t, lr)
        else:
            counts[2] += 1
            v = phi
            if not armijo:
                t = 0.5 * t
    return phi, counts


def test_agd_matches_an_independent_per_task_loop():
    torch.manual_seed(3)  # gradient restarts are rare (the F(phi) test catches most
    model = mlp()         # overshoots first): this draw has a few, in 1-2 of 6 tasks
    fm = FunctionalModel(model, F.cross_entropy)
    T = 6
    xs, ys, _, _ = class_episode(T, 6, 1, (3,), 2)
    xs = xs * 4
    lam, lr, steps = 0.05, 0.5, 25
    out = inner_agd(fm, fm.theta, xs, ys, steps=steps, lr=lr, lam=lam)
    assert out.grad_evals == steps and out.loss_evals == steps and out.final_grad is None
    assert out.steps_taken.tolist() == [steps] * T
    theta = flat_params(model)
    totals = [0, 0, 0]
    for i in range(T):
        phi, counts = _agd_loop(task_loss_fn(model, F.cross_entropy, xs[i], ys[i]), theta,
                                steps, lr, lam)
        assert torch.allclose(out.phi[i], phi, rtol=1e-12, atol=1e-13), i
        totals = [a + b for a, b in zip(totals, counts)]
    assert all(totals), totals  # momentum kept, restarted and refused steps all ran
    g = torch.stack([grad(task_loss_fn(model, F.cross_entropy, xs[i], ys[i]), theta)
                     for i in range(T)])
    assert torch.allclose(out.grad0_norm, g.norm(dim=1), rtol=1e-12)
    none = inner_agd(fm, fm.theta, xs, ys, steps=0, lr=lr, lam=lam)
    assert none.grad_evals == 0 and torch.equal(none.phi, fm.theta.expand(T, -1))


def test_agd_reaches_the_minimiser_of_an_ill_conditioned_problem_in_far_fewer_steps():
    """Least squares whose curvature spans 100x (lam small against the data's): the
    accelerated solver gets to the closed-form minimiser where the line-searched gradient
    descent, at the same steps and step size, has covered a fraction of the way."""
    d, lam = 6, 0.05
    torch.manual_seed(3)
    model = nn.Linear(d, 1, bias=False).to(DT)
    fm = FunctionalModel(model, F.mse_loss)
    X, y = linreg_tasks(3, 12, d, torch.tensor([2.0, 1.0, 0.6, 0.4, 0.2, 0.1], dtype=DT))
    exact = linreg_minimiser(X, y, fm.theta, lam)
    L = torch.linalg.eigvalsh(2.0 / 12 * X.transpose(1, 2) @ X).max().item() + lam
    err0 = (fm.theta - exact).norm(dim=1)
    gd = inner_gd_armijo(fm, fm.theta, X, y, steps=150, lr=1.0 / L, lam=lam)
    agd = inner_agd(fm, fm.theta, X, y, steps=150, lr=1.0 / L, lam=lam)
    gd_err, agd_err = (gd.phi - exact).norm(dim=1) / err0, (agd.phi - exact).norm(dim=1) / err0
    assert (gd_err > 5e-2).all(), gd_err  # measured 0.07-0.24
    assert (agd_err < 1e-4).all(), agd_err  # measured 0.7-3.8e-5

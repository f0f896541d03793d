import pytest
import torch

from imaml_fast import (CG_CONVERGED, CG_MAX_ITER, CG_NEGATIVE_CURVATURE, CG_NONFINITE,
                        cg_solve)
from imaml_fast.cg import cg_update_ref

DT = torch.float64


def spd(T, P, cond=10.0):
    Q, _ = torch.linalg.qr(torch.randn(T, P, P, dtype=DT))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), P, dtype=DT).expand(T, P)
    return Q @ torch.diag_embed(eig) @ Q.transpose(1, 2)


def mv(A):
    return lambda v: torch.einsum("tij,tj->ti", A, v)


@pytest.mark.parametrize("T,P", [(1, 1), (1, 5), (7, 13), (4, 33)])
def test_exact_on_spd_within_P_iterations(T, P):
    A = spd(T, P)
    b = torch.randn(T, P, dtype=DT)
    res = cg_solve(mv(A), b, max_iter=P, tol=1e-12)
    exact = torch.linalg.solve(A, b)
    assert torch.allclose(res.x, exact, rtol=1e-9, atol=1e-11)
    assert (res.status == CG_CONVERGED).all()
    assert (res.iters <= P).all() and (res.iters >= 1).all()
    true_res = (b - mv(A)(res.x)).norm(dim=1)
    assert (true_res <= 1e-10 * b.norm(dim=1)).all()


def test_tasks_converge_at_different_iterations_and_then_stop_changing():
    # CG converges in exactly k iterations when A has k distinct eigenvalues.
    T, P = 5, 10
    Q, _ = torch.linalg.qr(torch.randn(T, P, P, dtype=DT))
    eigs = []
    for k in range(1, T + 1):
        vals = torch.linspace(1, 5, k, dtype=DT)
        eigs.append(vals[torch.arange(P) % k])
    A = Q @ torch.diag_embed(torch.stack(eigs)) @ Q.transpose(1, 2)
    b = torch.randn(T, P, dtype=DT)
    res = cg_solve(mv(A), b, max_iter=P, tol=1e-10)
    assert res.iters.tolist() == [1, 2, 3, 4, 5]
    assert (res.status == CG_CONVERGED).all()
    assert torch.allclose(res.x, torch.linalg.solve(A, b), atol=1e-9)
    # Stopping at exactly 3 iterations gives bit-identical answers for tasks 0..2:
    # masked tasks are left untouched by later iterations.
    short = cg_solve(mv(A), b, max_iter=3, tol=1e-10)
    assert torch.equal(short.x[:3], res.x[:3])
    assert short.status.tolist() == [CG_CONVERGED] * 3 + [CG_MAX_ITER] * 2


def test_zero_right_hand_side():
    A = spd(3, 6)
    b = torch.randn(3, 6, dtype=DT)
    b[1] = 0
    res = cg_solve(mv(A), b, max_iter=6, tol=1e-12)
    assert torch.equal(res.x[1], torch.zeros(6, dtype=DT))
    assert res.iters[1] == 0 and res.status[1] == CG_CONVERGED and res.residual[1] == 0
    assert torch.isfinite(res.x).all()
    assert torch.allclose(res.x[[0, 2]], torch.linalg.solve(A[[0, 2]], b[[0, 2]]), atol=1e-9)


def test_indefinite_system_is_flagged_without_nan():
    P = 6
    A = spd(3, P)
    # task 1: b along a negative-curvature eigenvector -> flagged on the first iteration,
    # which returns the steepest-descent step x = b (Nocedal & Wright, Alg. 7.1).
    Q, _ = torch.linalg.qr(torch.randn(P, P, dtype=DT))
    A[1] = Q @ torch.diag(torch.tensor([-1.0, 1, 2, 3, 4, 5], dtype=DT)) @ Q.T
    # task 2: indefinite, but the negative direction appears only later.
    A[2] = Q @ torch.diag(torch.tensor([-0.01, 5, 6, 7, 8, 9], dtype=DT)) @ Q.T
    b = torch.randn(3, P, dtype=DT)
    b[1] = Q[:, 0]
    b[2] = Q[:, 1:].sum(1) + 1e-3 * Q[:, 0]
    res = cg_solve(mv(A), b, max_iter=P, tol=1e-12)
    assert res.status.tolist() == [CG_CONVERGED, CG_NEGATIVE_CURVATURE, CG_NEGATIVE_CURVATURE]
    assert torch.equal(res.x[1], b[1]) and res.iters[1] == 0
    assert res.iters[2] >= 1
    assert torch.isfinite(res.x).all() and torch.isfinite(res.residual).all()
    assert torch.allclose(res.x[0], torch.linalg.solve(A[0], b[0]), atol=1e-9)


def test_nonfinite_product_stops_the_task_at_its_last_finite_iterate():
    A = spd(3, 5)
    b = torch.randn(3, 5, dtype=DT)
    calls = []

    def matvec(v):
        out = mv(A)(v)
        calls.append(1)
        if len(calls) == 3:
            out[2, 0] = float("nan")
        return out

    res = cg_solve(matvec, b, max_iter=5, tol=1e-12)
    two = cg_solve(mv(A), b, max_iter=2, tol=1e-12)
    assert res.status[2] == CG_NONFINITE and res.iters[2] == 2
    assert torch.equal(res.x[2], two.x[2])
    assert torch.isfinite(res.x).all()
    assert (res.status[:2] == CG_CONVERGED).all()


def test_nonfinite_rhs_is_flagged_not_propagated():
    A = spd(2, 4)
    b = torch.randn(2, 4, dtype=DT)
    b[0, 1] = float("inf")
    res = cg_solve(mv(A), b, max_iter=4)
    assert res.status.tolist()[0] == CG_NONFINITE
    assert torch.isfinite(res.x).all()
    assert res.status[1] == CG_CONVERGED


def test_warm_start():
    A = spd(2, 8)
    b = torch.randn(2, 8, dtype=DT)
    exact = torch.linalg.solve(A, b)
    res = cg_solve(mv(A), b, x0=exact, max_iter=8, tol=1e-8)
    assert res.iters.tolist() == [0, 0] and torch.equal(res.x, exact)
    res = cg_solve(mv(A), b, x0=exact + 0.1 * torch.randn_like(b), max_iter=8, tol=1e-13)
    assert torch.allclose(res.x, exact, atol=1e-10)


def test_zero_iterations_returns_start():
    A = spd(2, 3)
    b = torch.randn(2, 3, dtype=DT)
    res = cg_solve(mv(A), b, max_iter=0)
    assert torch.equal(res.x, torch.zeros_like(b)) and res.status.tolist() == [CG_MAX_ITER] * 2
    assert torch.allclose(res.residual, b.norm(dim=1))


def test_dict_input_matches_flat():
    A = spd(3, 7)
    b = torch.randn(3, 7, dtype=DT)
    bd = {"w": b[:, :6].reshape(3, 2, 3), "b": b[:, 6:]}

    def matvec(d):
        v = torch.cat([d["w"].reshape(3, -1), d["b"]], 1)
        out = mv(A)(v)
        return {"w": out[:, :6].reshape(3, 2, 3), "b": out[:, 6:]}

    rd = cg_solve(matvec, bd, max_iter=7, tol=1e-12)
    rf = cg_solve(mv(A), b, max_iter=7, tol=1e-12)
    assert torch.equal(torch.cat([rd.x["w"].reshape(3, -1), rd.x["b"]], 1), rf.x)
    assert rd.x["w"].shape == (3, 2, 3)


def test_no_host_synchronisation_in_the_loop():
    # On the meta device tensors have no data: any .item(), bool() or .cpu() raises.
    # The whole solve must still run, so it cannot be asking the host anything.
    A = torch.empty(32, 50, 50, device="meta")
    b = torch.empty(32, 50, device="meta")
    res = cg_solve(mv(A), b, max_iter=5, tol=1e-6)
    assert res.x.shape == (32, 50) and res.x.device.type == "meta"
    assert res.status.dtype == torch.int8 and res.iters.dtype == torch.long


def test_low_precision_accumulates_in_fp32():
    A = spd(2, 16, cond=4.0)
    b = torch.randn(2, 16, dtype=DT)
    exact = torch.linalg.solve(A, b)
    res = cg_solve(mv(A.bfloat16()), b.bfloat16(), max_iter=16, tol=1e-2)
    assert res.x.dtype == torch.bfloat16 and res.residual.dtype == torch.float32
    rel = ((res.x.double() - exact).norm() / exact.norm()).item()
    assert rel < 0.05, rel


def test_update_leaves_inactive_tasks_untouched():
    T, P = 4, 5
    x, r, p, Ap = (torch.randn(T, P, dtype=DT) for _ in range(4))
    rs = (r * r).sum(1)
    status = torch.tensor([CG_MAX_ITER, CG_CONVERGED, CG_NEGATIVE_CURVATURE, CG_NONFINITE], dtype=torch.int8)
    iters = torch.tensor([0, 3, 2, 1])
    Ap = Ap.abs() * p.sign()  # p.Ap > 0 for the running task
    out = cg_update_ref(x, r, p, Ap, rs, status, iters, torch.zeros(T, dtype=DT))
    for t, old in zip(out, (x, r, p, rs, status, iters)):
        assert torch.equal(t[1:], old[1:])
    assert not torch.equal(out[0][0], x[0]) and out[5][0] == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_iter"):
        cg_solve(lambda v: v, torch.ones(2, 3), max_iter=-1)
    with pytest.raises(ValueError, match=r"\[T, P\]"):
        cg_solve(lambda v: v, torch.ones(3), max_iter=1)
    with pytest.raises(ValueError, match="x0"):
        cg_solve(lambda v: v, torch.ones(2, 3), x0=torch.ones(3, 2), max_iter=1)

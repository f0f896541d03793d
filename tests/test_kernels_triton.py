"""Triton kernels against their references. On a machine without a GPU they run under
TRITON_INTERPRET=1 (set by conftest.py before triton is imported), with small fp32/fp64
shapes; the GPU-marked tests run real shapes and bf16 where a GPU is present."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import class_episode, conv_bn, rel_err
from imaml_fast import (CG_CONVERGED, CG_MAX_ITER, CG_NEGATIVE_CURVATURE, CG_NONFINITE,
                        IMAMLConfig, cg_solve, meta_gradient)
from imaml_fast.backends import resolve_backend
from imaml_fast.cg import batched_dot as batched_dot_ref, cg_update_ref
from imaml_fast.inner import prox_update_ref

from imaml_fast import kernels  # noqa: E402  (triton is a test requirement: CI runs these)
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# (dtype, atol, rtol) as data
TOLS = [(torch.float32, 1e-6, 1e-5), (torch.float64, 1e-14, 1e-12)]
SIZES = [(1, 1), (1, 13), (7, 1000), (3, 4097)]


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("T,P", SIZES)
@pytest.mark.parametrize("theta_per_task", [False, True])
def test_prox_update(dtype, atol, rtol, T, P, theta_per_task):
    phi, g = (torch.randn(T, P, dtype=dtype, device=DEVICE) for _ in range(2))
    theta = torch.randn(T, P, dtype=dtype, device=DEVICE) if theta_per_task else torch.randn(P, dtype=dtype, device=DEVICE)
    out = kernels.prox_update(phi, g, theta, 0.1, 2.0)
    torch.testing.assert_close(out, prox_update_ref(phi, g, theta, 0.1, 2.0), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("T,P", SIZES)
def test_batched_dot(dtype, atol, rtol, T, P):
    a, b = (torch.randn(T, P, dtype=dtype, device=DEVICE) for _ in range(2))
    exact = (a.double() * b.double()).sum(1)
    out = kernels.batched_dot(a, b)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), exact, atol=atol * P, rtol=rtol)


def spd(T, P, dtype):
    Q, _ = torch.linalg.qr(torch.randn(T, P, P, dtype=torch.float64))
    eig = torch.rand(T, P, dtype=torch.float64) * 4 + 0.5
    return (Q @ torch.diag_embed(eig) @ Q.transpose(1, 2)).to(dtype).to(DEVICE)


def mv(A):
    return lambda v: torch.einsum("tij,tj->ti", A, v)


def _state(T, P, dtype):
    x, r, p = (torch.randn(T, P, dtype=dtype, device=DEVICE) for _ in range(3))
    A = spd(T, P, dtype)
    Ap = mv(A)(p)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rs = batched_dot_ref(r, r).to(acc)
    status = torch.zeros(T, dtype=torch.int8, device=DEVICE)
    iters = torch.zeros(T, dtype=torch.long, device=DEVICE)
    thresh = torch.full((T,), 1e-30, dtype=acc, device=DEVICE)
    return x, r, p, Ap, rs, status, iters, thresh


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("T,P", [(1, 13), (7, 50), (4, 1100)])
def test_cg_update_one_step_matches_reference(dtype, atol, rtol, T, P):
    state = _state(T, P, dtype)
    # mixed statuses: task 1 converged earlier, task 2 flagged: both must stay bit-identical
    status = state[5]
    if T > 2:
        status[1], status[2] = CG_CONVERGED, CG_NEGATIVE_CURVATURE
    ref = cg_update_ref(*[s.clone() for s in state])
    out = kernels.cg_update(*[s.clone() for s in state])
    for name, a, b in zip("x r p rs status iters".split(), out, ref):
        if name in ("status", "iters"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10, msg=name)
    if T > 2:
        for i, s in enumerate(state[:3]):
            assert torch.equal(out[i][1:3], s[1:3])


@pytest.mark.parametrize("dtype,tol,atol", [(torch.float32, 1e-5, 1e-4), (torch.float64, 1e-12, 1e-10)])
@pytest.mark.parametrize("T,P", [(1, 9), (7, 40)])
def test_whole_solve_matches_reference(dtype, tol, atol, T, P):
    A = spd(T, P, dtype)
    b = torch.randn(T, P, dtype=dtype, device=DEVICE)
    ref = cg_solve(mv(A), b, max_iter=P, tol=tol)
    out = cg_solve(mv(A), b, max_iter=P, tol=tol, update=kernels.cg_update)
    assert torch.equal(out.status, ref.status) and torch.equal(out.iters, ref.iters)
    torch.testing.assert_close(out.x, ref.x, atol=atol, rtol=atol)
    exact = torch.linalg.solve(A.double(), b.double())
    assert rel_err(out.x.double(), exact) < (1e-3 if dtype == torch.float32 else 1e-9)


def test_flags_match_reference():
    P = 6
    dtype = torch.float64
    A = spd(4, P, dtype)
    Q, _ = torch.linalg.qr(torch.randn(P, P, dtype=dtype))
    Q = Q.to(DEVICE)
    A[1] = Q @ torch.diag(torch.tensor([-1.0, 1, 2, 3, 4, 5], dtype=dtype, device=DEVICE)) @ Q.T
    A[2] = Q @ torch.diag(torch.tensor([-0.01, 5, 6, 7, 8, 9], dtype=dtype, device=DEVICE)) @ Q.T
    b = torch.randn(4, P, dtype=dtype, device=DEVICE)
    b[1] = Q[:, 0]
    b[2] = Q[:, 1:].sum(1) + 1e-3 * Q[:, 0]
    b[3] = 0

    def matvec(v):
        out = mv(A)(v)
        out[0, 0] = float("nan") if matvec.calls == 2 else out[0, 0]
        matvec.calls += 1
        return out

    matvec.calls = 0
    ref = cg_solve(matvec, b, max_iter=P, tol=1e-12)
    matvec.calls = 0
    out = cg_solve(matvec, b, max_iter=P, tol=1e-12, update=kernels.cg_update)
    assert out.status.tolist() == ref.status.tolist() == [CG_NONFINITE, CG_NEGATIVE_CURVATURE,
                                                          CG_NEGATIVE_CURVATURE, CG_CONVERGED]
    assert torch.equal(out.iters, ref.iters)
    torch.testing.assert_close(out.x, ref.x, atol=1e-10, rtol=1e-10)
    assert torch.isfinite(out.x).all()
    assert torch.equal(out.x[1], b[1])


def test_meta_gradient_with_triton_backend_matches_torch():
    model = conv_bn().to(DEVICE)
    ep = [t.to(DEVICE) for t in class_episode(3, 4, 5, (1, 6, 6), 3)]
    for solver in ("gd", "gd_armijo", "agd", "hf"):
        cfg = IMAMLConfig(inner_solver=solver, inner_steps=2 if solver == "hf" else 3, cg_steps=5)
        a = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(backend="triton"))
        b = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(backend="torch"))
        assert a.backend == "triton"
        assert rel_err(a.grads_flat, b.grads_flat) < 1e-10
        assert torch.equal(a.cg_iters, b.cg_iters) and torch.equal(a.cg_status, b.cg_status)


def test_backend_reasons():
    from imaml_fast.backends.triton import why_not
    assert why_not(torch.device("cpu"), torch.float16)  # never on CPU in fp16
    assert any("not supported" in r for r in why_not(torch.device("mps"), torch.float32))
    if not GPU:
        assert resolve_backend("triton", "cpu", torch.float32).name == "triton"  # interpreter
        assert resolve_backend("auto", "cpu", torch.float32).name != "triton"  # never auto on CPU


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_gpu_within_twice_the_reference_error(dtype):
    T, P = 32, 113_221
    phi, g = (torch.randn(T, P, device="cuda") for _ in range(2))
    theta = torch.randn(P, device="cuda")
    exact = prox_update_ref(phi.double(), g.double(), theta.double(), 0.1, 2.0)
    ref_lp = prox_update_ref(phi.to(dtype), g.to(dtype), theta.to(dtype), 0.1, 2.0)
    out = kernels.prox_update(phi.to(dtype), g.to(dtype), theta.to(dtype), 0.1, 2.0)
    assert (out.double() - exact).abs().max() <= 2 * (ref_lp.double() - exact).abs().max()
    a, b = phi.to(dtype), g.to(dtype)
    exact_dot = (a.double() * b.double()).sum(1)
    assert (kernels.batched_dot(a, b).double() - exact_dot).abs().max() <= \
        2 * (batched_dot_ref(a, b).double() - exact_dot).abs().max() + 1e-3


@pytest.mark.parametrize("dtype,tol,atol", [(torch.float32, 1e-5, 1e-4), (torch.float64, 1e-12, 1e-10)])
@pytest.mark.parametrize("T,P", [(1, 1), (3, 37), (2, 130)])
def test_dense_cg_matches_reference(dtype, tol, atol, T, P):
    from imaml_fast.dense import dense_cg_ref
    Q, _ = torch.linalg.qr(torch.randn(T, P, P, dtype=torch.float64))
    eig = torch.rand(T, P, dtype=torch.float64) * 4 - 0.5  # some negative: flags possible
    H = (Q @ torch.diag_embed(eig) @ Q.transpose(1, 2)).to(dtype).to(DEVICE)
    b = torch.randn(T, P, dtype=dtype, device=DEVICE)
    if T > 1:
        b[-1] = 0
    out = kernels.dense_cg(H, b, 1.0, 0.5, P, tol)
    ref = dense_cg_ref(H, b, 1.0, 0.5, P, tol)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[3], ref[3])
    torch.testing.assert_close(out[0], ref[0], atol=atol, rtol=atol)
    torch.testing.assert_close(out[2].to(ref[2].dtype), ref[2], atol=atol, rtol=1e-3)


def test_dense_cg_flags_like_reference():
    from imaml_fast.dense import dense_cg_ref
    P = 8
    Q, _ = torch.linalg.qr(torch.randn(P, P, dtype=torch.float64))
    H = torch.stack([Q @ torch.diag(torch.linspace(-40.0, 1.0, P, dtype=torch.float64)) @ Q.T,
                     Q @ torch.diag(torch.linspace(1.0, 2.0, P, dtype=torch.float64)) @ Q.T]).to(DEVICE)
    b = torch.stack([Q[:, 0], torch.randn(P, dtype=torch.float64)]).to(DEVICE)
    H[1, 0, 0] = float("nan")
    out = kernels.dense_cg(H, b, 1.0, 0.5, P, 1e-12)
    ref = dense_cg_ref(H, b, 1.0, 0.5, P, 1e-12)
    assert out[3].tolist() == ref[3].tolist() == [CG_NEGATIVE_CURVATURE, CG_NONFINITE]
    assert torch.equal(out[0][0], b[0]) and torch.isfinite(out[0]).all()


def test_dense_meta_gradient_with_triton_matches_torch():
    model = conv_bn().to(DEVICE)
    ep = [t.to(DEVICE) for t in class_episode(3, 4, 5, (1, 6, 6), 3)]
    cfg = IMAMLConfig(inner_steps=3, cg_steps=5, cg_dense="always")
    a = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(backend="triton"))
    b = meta_gradient(model, F.cross_entropy, *ep, cfg.replace(backend="torch", cg_dense="never"))
    assert a.hvp == "dense" and rel_err(a.grads_flat, b.grads_flat) < 1e-10
    assert torch.equal(a.cg_iters, b.cg_iters)


# ---- bn_double_backward: BatchNorm's double backward -------------------------------------------

def bn_inputs(shape, dtype, absent=(), seed=0):
    """(a, b, c, gy, x, mean, invstd, weight) with x's batch statistics; gy and a with
    non-zero means; the inputs named in `absent` are None."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]

    def randn(*s, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) + shift).to(dtype).to(DEVICE)

    x = 2 * randn(*shape, shift=0.25)
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    t = {"a": randn(*shape, shift=0.2), "b": randn(C), "c": randn(C), "weight": randn(C, shift=1)}
    for name in absent:
        t[name] = None
    return t["a"], t["b"], t["c"], randn(*shape, shift=0.3), x, mean, invstd, t["weight"]


BN_ABSENT = [(), ("a",), ("b",), ("c",), ("weight",), ("a", "b", "c", "weight")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(5, 7, 3, 3), (4, 6), (1, 3, 2, 5), (3, 4, 1), (3, 2, 700)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("absent", BN_ABSENT,
                         ids=lambda a: "none_" + "_".join(a) if a else "all_given")
def test_bn_double_backward_matches_reference(dtype, tol, shape, absent):
    from imaml_fast.layers import batch_norm_double_backward
    args = bn_inputs(shape, dtype, absent)
    ops = resolve_backend("triton", DEVICE, dtype).ops()
    got = ops["bn_double_backward"](*args)  # (3, 2, 700): M = 2,100 > BLOCK, three blocks
    exact = batch_norm_double_backward(*(None if t is None else t.double() for t in args))
    for name, g_, e_ in zip(("dgy", "dx", "dw"), got, exact):
        if e_ is None:
            assert g_ is None, name
            continue
        assert g_.shape == e_.shape and g_.dtype == dtype and g_.is_contiguous(), name
        if not bool(e_.any()):
            assert torch.equal(g_, torch.zeros_like(g_)), name
        else:
            assert rel_err(g_.double(), e_) <= tol, (name, rel_err(g_.double(), e_))


def test_bn_double_backward_falls_back_and_checks_shapes():
    from imaml_fast.layers import batch_norm_double_backward
    args = bn_inputs((4, 3, 5), torch.float16 if GPU else torch.bfloat16)
    got = kernels.bn_double_backward(*args)  # not float32/float64: the reference
    assert all(torch.equal(u, v) for u, v in zip(got, batch_norm_double_backward(*args)))
    args = bn_inputs((4, 3, 5), torch.float64)  # under vmap: BatchedTensors
    got = torch.func.vmap(kernels.bn_double_backward)(*(t.expand(2, *t.shape) for t in args))
    assert all(torch.equal(u[1], v) for u, v in zip(got, batch_norm_double_backward(*args)))
    a, b, c, gy, x, mean, invstd, w = bn_inputs((4, 3, 5), torch.float32)
    with pytest.raises(ValueError, match=r"gy must be \(4, 3, 5\)"):
        kernels.bn_double_backward(a, b, c, gy[:2], x, mean, invstd, w)
    with pytest.raises(ValueError, match=r"x must be \[N, C, ...\]"):
        kernels.bn_double_backward(None, None, None, gy[0, 0], x[0, 0], mean, invstd, None)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_bn_double_backward_on_gpu_at_scale():
    from imaml_fast.layers import batch_norm_double_backward
    for shape in [(64, 16, 28, 28), (4096, 300)]:
        args = bn_inputs(shape, torch.float32)
        one = kernels.bn_double_backward(*args)
        two = kernels.bn_double_backward(*args)
        assert all(torch.equal(u, v) for u, v in zip(one, two))
        exact = batch_norm_double_backward(*(t.double() for t in args))
        for g_, e_ in zip(one, exact):
            assert rel_err(g_.double(), e_) <= 1e-4


# Every kernel compiled ahead of time for real GPU targets (PTX and cubin with the ptxas that
# ships with triton): the interpreter accepts programs the compiler rejects, and this machine
# may have no GPU, so this is how CI checks that the kernels build for sm_80 and sm_90. It runs
# in a subprocess because TRITON_INTERPRET=1 (set for this session) routes compilation
# through the interpreter.
def test_kernels_compile_for_gpu_targets():
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "imaml_fast.kernels.aot", "--arch", "80", "90"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("compiled")]
    assert len(lines) == 2 * 18, out.stdout  # 18 kernel variants x 2 architectures

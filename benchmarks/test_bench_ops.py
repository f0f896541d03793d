"""pytest-benchmark microbenchmarks of imaml_fast's CPU ops. Not part of the test suite
(setup.cfg's testpaths = tests does not collect benchmarks/); run them explicitly:

    python -m pytest benchmarks/test_bench_ops.py --benchmark-autosave
    python -m pytest benchmarks/test_bench_ops.py --benchmark-compare      # against the last save

Shapes are the paper's Omniglot setting: the authors' network for 5-way (P = 113,221
parameters), T = 32 tasks, 1 support example per class; the full meta-step runs at a reduced
T = 8 (16 inner steps, 5 CG steps) to keep the file quick.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imaml_fast import BatchedHVP, FunctionalModel, IMAMLConfig, cg_solve, meta_gradient
from imaml_fast.batching import choose_strategy
from imaml_fast.inner import prox_update_ref
from imaml_fast.models import omniglot_conv

T, N_WAY = 32, 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def episode(tasks, n_way=N_WAY):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(tasks, n_way, 1, 28, 28, generator=g)
    xq = torch.randn(tasks, n_way, 1, 28, 28, generator=g)
    y = torch.arange(n_way).expand(tasks, -1).contiguous()
    return xs, y, xq, y.clone()


@pytest.fixture(scope="module")
def omniglot():
    torch.manual_seed(0)
    model = omniglot_conv(N_WAY)
    fm = FunctionalModel(model, F.cross_entropy)
    return model, fm


def test_cg_solve_fixed_matvec(benchmark):
    """5 masked batched CG iterations on [T, P] with a fixed diagonal SPD operator: the vector
    work of the implicit solve without any model compute."""
    benchmark.group = "cg_solve"
    P = 113_221
    d = 1.0 + 2.0 * torch.rand(T, P)
    b = torch.randn(T, P)
    res = benchmark(cg_solve, lambda v: d * v, b, max_iter=5, tol=0.0)
    assert res.x.shape == (T, P) and bool(torch.isfinite(res.x).all())


def test_prox_update_ref(benchmark):
    """One proximal inner step phi - lr (g + lam (phi - theta)) over [T, P]."""
    benchmark.group = "prox_update"
    P = 113_221
    phi, g, theta = torch.randn(T, P), torch.randn(T, P), torch.randn(P)
    out = benchmark(prox_update_ref, phi, g, theta, 0.1, 2.0)
    assert out.shape == (T, P)


@pytest.mark.parametrize("mode", ["revrev", "fwdrev"])
def test_batched_hvp_product(benchmark, omniglot, mode):
    """One batched Hessian-vector product H v on the Omniglot network (T = 32), with the
    task batching the default engine would choose; revrev's graph is built once, outside the
    timed call, as in a CG solve."""
    benchmark.group = "batched_hvp"
    _, fm = omniglot
    xs, ys, _, _ = episode(T)
    strategy = choose_strategy("auto", fm, fm.theta, xs, ys)
    phi = fm.theta.expand(T, -1) + 0.01 * torch.randn(T, fm.num_params)
    hvp = BatchedHVP(fm, phi, xs, ys, mode, strategy)
    v = torch.randn(T, fm.num_params)
    out = benchmark(hvp, v)
    assert out.shape == v.shape and bool(torch.isfinite(out).all())
    hvp.release()


def test_meta_step_reduced(benchmark, omniglot):
    """One full default meta-gradient (16 inner steps, 5 CG steps) at a reduced T = 8."""
    benchmark.group = "meta_step"
    model, _ = omniglot
    ep = episode(8)
    cfg = IMAMLConfig(inner_steps=16, inner_lr=0.1, lam=2.0, cg_steps=5)
    r = benchmark.pedantic(meta_gradient, args=(model, F.cross_entropy, *ep, cfg),
                           rounds=5, iterations=1, warmup_rounds=1)
    assert r.grads_flat.shape == (sum(p.numel() for p in model.parameters()),)


def _ops(backend):
    from imaml_fast.backends import resolve_backend

    try:
        return resolve_backend(backend, torch.device("cpu"), torch.float32).ops()
    except ValueError as e:
        pytest.skip(str(e))


def _bn_relu_step(ops):
    """BatchNorm + ReLU forward then backward (gradients of x, weight, bias): the backend's
    fused bn_relu ops where it has them, ATen's two layers otherwise."""
    if "bn_relu_forward" in ops:
        fwd, bwd = ops["bn_relu_forward"], ops["bn_relu_backward"]

        def fused(x, w, b, gy):
            y, mean, invstd = fwd(x, w, b, 1e-5)
            return bwd(gy, x, mean, invstd, w, b, (True, True, True))
        return fused

    def aten(x, w, b, gy):
        y, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)
        out = torch.relu(y)
        g = torch.ops.aten.threshold_backward(gy, out, 0)
        return torch.ops.aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd,
                                                         True, 1e-5, [True, True, True])
    return aten


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("op", ["prox_update", "cg_update", "batched_dot", "dense_cg",
                                "bn_double_backward", "conv_input_grad", "bn_relu"])
def test_op_per_backend(benchmark, backend, op):
    """Each fused op of the batched engine, torch (the PyTorch reference ops) against cpp
    (the C++ CPU twins of the CUDA kernels), on the shapes a meta-step gives it: [T, P] with
    the Omniglot network's P for the vector ops, the sinusoid MLP (P = 1,761) for the
    5-iteration dense CG, the network's first BatchNorm under vmap ([5, 32 * 64, 14, 14]) for
    BatchNorm's second derivative, its second convolution with the tasks as groups (input
    [5, 32 * 64, 14, 14], stride 2) for the convolution input gradient (the torch backend has
    no such op: ATen's convolution_backward, the reference, runs there), and for BatchNorm +
    ReLU as one layer (forward then backward) the first BatchNorm again (on torch: ATen's
    BatchNorm and ReLU and their backward, what the torch backend runs). Compare within each
    group: the kernel backend should be no slower."""
    from imaml_fast.cg import CG_MAX_ITER
    from imaml_fast.layers import conv_input_grad_ref

    benchmark.group = f"op {op}"
    fn = _ops(backend).get(op, conv_input_grad_ref if op == "conv_input_grad" else None)
    if op == "bn_relu":
        fn = _bn_relu_step(_ops(backend))
    P = 113_221
    if op == "prox_update":
        phi, g, theta = torch.randn(T, P), torch.randn(T, P), torch.randn(P)
        args = (phi, g, theta, 0.1, 2.0)
    elif op == "batched_dot":
        args = (torch.randn(T, P), torch.randn(T, P))
    elif op == "cg_update":
        x, r, p, Ap = (torch.randn(T, P) for _ in range(4))
        rs = (r * r).sum(1)
        args = (x, r, p, Ap.abs() * p.sign() + p, rs,
                torch.full((T,), CG_MAX_ITER, dtype=torch.int8), torch.zeros(T, dtype=torch.long),
                1e-20 * rs)
    elif op == "bn_double_backward":
        shape, C = (5, T * 64, 14, 14), T * 64
        x, gy, a = (torch.randn(shape) for _ in range(3))
        w, b, c = (torch.randn(C) for _ in range(3))
        _, mean, invstd = torch.native_batch_norm(x, w, None, None, None, True, 0.0, 1e-5)
        args = (a, b, c, gy, x, mean, invstd, w)
    elif op == "bn_relu":
        shape, C = (5, T * 64, 14, 14), T * 64
        args = (torch.randn(shape), torch.randn(C), torch.randn(C), torch.randn(shape))
    elif op == "conv_input_grad":
        x, w = torch.randn(5, T * 64, 14, 14), torch.randn(T * 64, 64, 3, 3)
        args = (torch.randn(5, T * 64, 7, 7), x, w, [2, 2], [1, 1], [1, 1], T)
    else:
        Pd = 1761
        A = torch.randn(T, Pd, Pd) / Pd ** 0.5
        args = (A @ A.transpose(1, 2), torch.randn(T, Pd), 1.0, 0.5, 5, 0.0)
    benchmark(fn, *args)

"""The dense path for small models: materialise each task's Hessian once, then solve.

For a small network (the 1-40-40-1 sinusoid MLP has P = 1,761) a matrix-free CG step is a
whole forward/backward pass of tiny kernels: on a GPU each product is bound by launch
latency, not arithmetic. Materialising H_i [T, P, P] costs one batched forward-over-reverse
Jacobian of the gradient, after which the whole CG solve, every iteration of every task, is
one kernel launch (kernels.dense_cg / the C++ and CUDA twins). On a CPU the P products of the
materialisation cost far more than the few matrix-free products they replace, so "auto"
never chose it there. On a GPU the first whole-meta-step measurement (benchmarks/
bench_dense_path.py on an H200: sinusoid MLPs of P = 321 to 4,353, T = 32, 10 inner steps,
5 CG steps) had the dense path slower at every size, captured as a CUDA graph (1.65x at
P = 321 to 44x at P = 4,353) and uncaptured (1.09x to 5.3x): the P/256 batched
double-backward passes that build H cost more than the five products they replace, even
where the solve itself is one launch. So "auto" keeps the matrix-free solve everywhere, and
cg_dense="always" is there for solves that run many more CG iterations than they have
parameters to materialise.
"""
from __future__ import annotations

import torch

from .cg import CGResult, cg_solve
from .functional import FunctionalModel

# The most memory cg_dense="always" may take for the Hessians [T, P, P].
DENSE_MAX_BYTES = 2 << 30


def dense_bytes(T: int, P: int, dtype: torch.dtype) -> int:
    """Bytes of the T materialised P x P Hessians."""
    return T * P * P * torch.empty((), dtype=dtype).element_size()


def support_hessians(fm: FunctionalModel, phi: torch.Tensor, x, y, strategy="vmap",
                     chunk: int = 256) -> torch.Tensor:
    """H [T, P, P]: the Hessian of each task's support loss at phi_i.

    The support gradient is built once with create_graph=True and differentiated again
    against `chunk` basis vectors at a time in one batched backward (is_grads_batched).
    torch.func.hessian is not used: on torch 2.13 its reverse-over-reverse through
    batch-statistics BatchNorm gives wrong entries (0.21 where the exact value is 0 for a
    conv bias feeding a BatchNorm; tests/test_dense.py compares against autograd).
    """
    T, P = phi.shape
    H = phi.new_empty(T, P, P)
    with torch.enable_grad():
        grads, leaves, _ = fm.grad_pieces(phi, x, y, strategy, create_graph=True)
        start = 0
        for g, span in zip(grads, leaves):
            n = span[0].shape[0]
            if not g.requires_grad:  # loss linear in the parameters
                H[start:start + n] = 0
                start += n
                continue
            for j0 in range(0, P, chunk):
                j1 = min(j0 + chunk, P)
                # basis[i, :, j0 + i] = 1, written from an identity made on the device (a
                # scalar written through an index is a host-to-device copy, which a CUDA
                # graph capture refuses)
                basis = torch.zeros(j1 - j0, n, P, dtype=phi.dtype, device=phi.device)
                basis[:, :, j0:j1] = torch.eye(j1 - j0, dtype=phi.dtype,
                                               device=phi.device).unsqueeze(1)
                cols = torch.autograd.grad(g, span, basis, retain_graph=True,
                                           is_grads_batched=True, allow_unused=True,
                                           materialize_grads=True)
                cols = fm.join(cols, (j1 - j0, n))
                H[start:start + n, :, j0:j1] = cols.permute(1, 2, 0)
            start += n
    return H


def dense_cg_ref(H: torch.Tensor, b: torch.Tensor, shift: float, scale: float, max_iter: int,
                 tol: float):
    """(x, iters, residual, status) of CG on (shift I + scale H_t) x = b_t for every task:
    the matrix-free batched CG with a dense matvec. Kernels implement the same contract."""
    res: CGResult = cg_solve(lambda v: shift * v + scale * torch.einsum("tij,tj->ti", H, v), b,
                             max_iter=max_iter, tol=tol)
    return res.x, res.iters, res.residual, res.status

"""Small models, episodes and independent exact computations shared by the tests."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

DT = torch.float64

# The batched backends a CUDA GPU can run; the tests parametrised over them on a GPU call
# require_cuda_backend first.
CUDA_BACKENDS = ["torch", "cuda", "triton"]


def require_cuda_backend(backend: str, dtype=DT) -> None:
    """Skips the calling test unless `backend` runs on this machine's CUDA GPU for dtype."""
    from imaml_fast import backend_info

    if not {b["name"]: b["available"] for b in backend_info("cuda", dtype)}[backend]:
        pytest.skip(f"backend {backend} cannot run here")


def mlp(d_in=3, hidden=5, d_out=2):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(DT)


def conv_bn(n_way=3, channels=3):
    """A small conv net with batch-statistics BatchNorm: 1x6x6 -> 3 classes."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels, track_running_stats=False),
        nn.Tanh(), nn.Flatten(), nn.Linear(channels * 3 * 3, n_way)).to(DT)


def class_episode(T, n_support, n_query, in_shape, n_way):
    xs = torch.randn(T, n_support, *in_shape, dtype=DT)
    xq = torch.randn(T, n_query, *in_shape, dtype=DT)
    ys = torch.randint(0, n_way, (T, n_support))
    yq = torch.randint(0, n_way, (T, n_query))
    return xs, ys, xq, yq


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def task_loss_fn(model, loss_fn, x, y):
    """w [P] -> loss of one task, written independently of the package's flat layout code."""
    named = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def f(w):
        params, o = {}, 0
        for n, s, k in named:
            params[n] = w[o:o + k].reshape(s)
            o += k
        return loss_fn(functional_call(model, params, (x,)), y)
    return f


def hessian(f, w):
    return torch.autograd.functional.hessian(f, w)


def grad(f, w):
    w = w.detach().requires_grad_(True)
    return torch.autograd.grad(f(w), w)[0]


def exact_implicit(model, loss_fn, phi, xs, ys, xq, yq, lam, damping=0.0):
    """(I + (H + damping I)/lam)^-1 grad L_query at each phi_i, by materialised Hessians and
    torch.linalg.solve."""
    out = []
    for i in range(phi.shape[0]):
        H = hessian(task_loss_fn(model, loss_fn, xs[i], ys[i]), phi[i])
        gq = grad(task_loss_fn(model, loss_fn, xq[i], yq[i]), phi[i])
        A = torch.eye(len(gq), dtype=H.dtype) * (1 + damping / lam) + H / lam
        out.append(torch.linalg.solve(A, gq))
    return torch.stack(out)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()

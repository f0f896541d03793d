"""How far a meta-step is from the floor: the model compute alone, and the FLOP bound.

An iMAML-GD meta-step with K inner steps and C CG steps needs, per task, K support gradients
(forward + backward), one support gradient with its graph kept, C Hessian-vector products
through that graph, and one query gradient. `model_compute` times exactly those passes as
plain torch calls on ONE shared set of weights over all T tasks' images stacked into one
batch (no per-task weights, no vmap, no solver): the time torch's own kernels need for the
arithmetic, which no iMAML implementation built on them can beat by batching alone. The
graph the products differentiate is built as the engine builds it by default
(imaml_fast.layers: convolution and BatchNorm with written-out second derivatives).
`flops` counts the matmul/convolution FLOPs of the same passes (torch.utils.flop_counter),
and `matmul_gflops` measures this machine's float32 matrix-multiply rate (n x n products),
so flops / rate is the time the arithmetic would take at matrix-multiply speed.

    python benchmarks/floor.py [--n-way 5] [--inner-steps 16] [--tasks 32] [--threads 1] [--device cuda]
compare.py's speed figure reports both beside every implementation.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timing import sync  # benchmarks/timing.py (this folder is on sys.path for its scripts)


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype=torch.float32, device="cpu") -> float:
    """Best-of-`repeats` GFLOP/s of an n x n by n x n product on `device` (on a GPU n = 8192,
    so that the product fills the chip; float32 matmuls in torch's default precision)."""
    if torch.device(device).type == "cuda":
        n = max(n, 8192)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _layers(model):
    """The engine's default formulation of the graph the products differentiate:
    imaml_fast.layers' convolution and BatchNorm (second derivatives written out, BatchNorm's
    run by the default backend's fused kernel), so that the floor is one of the same
    formulation rather than of PyTorch's own double backward."""
    from imaml_fast.backends import resolve_backend
    from imaml_fast.layers import closed_form_layers

    p = next(model.parameters())
    ops = resolve_backend("auto", p.device, p.dtype).ops()
    return closed_form_layers(ops.get("bn_double_backward"))


def _passes(model, xs, ys, xq, yq, inner_steps: int, cg_steps: int):
    params = list(model.parameters())
    for _ in range(inner_steps):
        torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
    with _layers(model):
        out = model(xs)
    g = torch.autograd.grad(F.cross_entropy(out, ys), params, create_graph=True)
    v = [torch.ones_like(t) for t in g]
    for _ in range(cg_steps):
        torch.autograd.grad(g, params, v, retain_graph=True)
    torch.autograd.grad(F.cross_entropy(model(xq), yq), params)


def floor_passes(model, episode, inner_steps: int, cg_steps: int):
    """A zero-argument callable running one meta-step's model passes with shared weights
    (warmed up), for timing beside the implementations in the same rounds."""
    xs, ys, xq, yq = (t.reshape(-1, *t.shape[2:]) for t in episode)
    args = (model, xs, ys, xq, yq, inner_steps, cg_steps)
    _passes(*args)
    sync(xs.device)
    return lambda: _passes(*args)


def model_floor(model, episode, inner_steps: int, cg_steps: int, repeats: int = 3,
                times=None) -> dict:
    """Time (median after a warm-up) and matmul/conv FLOPs of one meta-step's model passes
    with shared weights; episode = (x_s [T, N, ...], y_s [T, N], x_q, y_q). times: timings
    already taken (floor_passes in the implementations' rounds) instead of `repeats` new ones."""
    xs, ys, xq, yq = (t.reshape(-1, *t.shape[2:]) for t in episode)
    args = (model, xs, ys, xq, yq, inner_steps, cg_steps)
    if times is None:
        run = floor_passes(model, episode, inner_steps, cg_steps)
        times = []
        for _ in range(repeats):
            sync(xs.device)
            t0 = time.perf_counter()
            run()
            sync(xs.device)
            times.append(time.perf_counter() - t0)
    counter = FlopCounterMode(display=False)
    with counter:
        _passes(*args)
    flops = counter.get_total_flops()
    rate = matmul_gflops(device=xs.device)
    return {"compute_s": statistics.median(times), "compute_times_s": times, "flops": flops,
            "matmul_gflops": rate, "flop_bound_s": flops / (rate * 1e9),
            "compute_gflops": flops / statistics.median(times) / 1e9}


def main(argv=None):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers.common import omniglot_episode

    from imaml_fast.models import omniglot_conv

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--cg-steps", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = omniglot_conv(args.n_way).to(args.device)
    ep = tuple(t.to(args.device)
               for t in omniglot_episode(args.tasks, args.n_way, shots=1, queries=1, seed=0))
    r = model_floor(model, ep, args.inner_steps, args.cg_steps)
    print(f"{torch.get_num_threads()} threads: model compute alone {r['compute_s']:.3f} s "
          f"({r['compute_gflops']:.1f} GFLOP/s), {r['flops'] / 1e9:.1f} GFLOP, matmul "
          f"{r['matmul_gflops']:.1f} GFLOP/s -> FLOP bound {r['flop_bound_s']:.3f} s")
    return r


if __name__ == "__main__":
    main()

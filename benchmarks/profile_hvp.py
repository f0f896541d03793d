"""Where one batched Hessian-vector product spends its time (torch.profiler), by op and by kind.

The setting of the roadmap's HVP item: the authors' Omniglot network, 5-way 1-shot, T = 32,
the default engine's HVP (reverse over reverse through a support-gradient graph built once,
as in a CG solve), its task batching and backend. Profiles `--products` products (after one
warm-up) twice: before (layer_derivatives="autograd": PyTorch's own double backward of every
layer) and after (the default "closed_form": imaml_fast.layers' convolution and BatchNorm
with written-out second derivatives, BatchNorm's run by the backend's fused kernel), and for
each prints the wall time per product and the top ops by self time on the device (CUDA time on a GPU, CPU time otherwise)
and the share of each kind of op: convolutions, BatchNorm, elementwise arithmetic, ReLU,
reductions, copies/layout, other. Kernels worth writing are the kinds with a large share that
are not convolutions or matmuls (cuDNN/cuBLAS/oneDNN already do those well).

    python benchmarks/profile_hvp.py [--device cuda] [--products 5] [--json out.json]

--json writes the raw figures and, beside them (.md), the tables printed.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from imaml_fast import BatchedHVP, IMAMLConfig
from imaml_fast.backends import resolve_backend
from imaml_fast.batching import choose_strategy, step_counts

from bench_meta_step import support_problem, time_it  # the same setting and median timing
from peers.common import write_results

KINDS = [  # (kind, substrings of the aten op name), first match wins
    ("imaml_fast.layers backward (kernels + glue)", ("fnbackward",)),
    ("convolution", ("conv", "cudnn")),
    ("batch norm", ("batch_norm",)),
    ("relu", ("threshold", "relu", "clamp")),
    ("reduction", ("sum", "mean", "var", "norm")),
    ("copy / layout", ("copy", "cat", "contiguous", "clone", "fill", "zero", "empty", "stack")),
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear")),
    ("elementwise", ("mul", "add", "sub", "div", "rsqrt", "sqrt", "pow", "neg", "where", "exp",
                     "log", "softmax")),
]


def kind_of(name: str) -> str:
    n = name.lower()
    for kind, keys in KINDS:
        if any(k in n for k in keys):
            return kind
    return "other"


def profile_products(fm, xs, ys, phi, strategy, layers, backend, products, dev):
    """Profile `products` HVPs built with the given layer derivatives; returns (per-op list,
    per-kind dict, profiled time per product in ms, wall ms per product: median of 5)."""
    T = phi.shape[0]
    cuda = dev.type == "cuda"
    with fm.layer_derivatives(layers, backend):
        hvp = BatchedHVP(fm, phi, xs, ys, "revrev", strategy)
    v = torch.randn(T, fm.num_params, device=dev)
    wall = time_it(lambda: hvp(v), 5, dev)[0]  # warm-up, then the median of 5
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(products):
            hvp(v)
        if cuda:
            torch.cuda.synchronize()
    hvp.release()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    # On the CPU: ATen ops, plus the self time of imaml_fast.layers' backward nodes, where
    # the C++ twin kernels (not profiled ops themselves) and the Python glue run.
    ops_ = [(e.key, getattr(e, attr, 0.0) or 0.0, e.count) for e in prof.key_averages()
            if e.key.startswith("aten::") or e.key.endswith("FnBackward") or cuda]
    ops_ = [o for o in ops_ if o[1] > 0]
    total = sum(t for _, t, _ in ops_) or 1.0
    by_kind = defaultdict(float)
    for name, t, _ in ops_:
        by_kind[kind_of(name)] += t
    return ops_, by_kind, total / 1e3 / products, 1e3 * wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--products", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", help="write the per-op and per-kind figures here")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    T = args.tasks
    fm, xs, ys, phi = support_problem(T, dev)
    # the task batching and backend the default configuration's meta-step would use
    strategy = choose_strategy("auto", fm, fm.theta, xs, ys, **step_counts(IMAMLConfig()))
    backend = resolve_backend("auto", dev, fm.dtype)
    cuda = dev.type == "cuda"
    where = torch.cuda.get_device_name(dev) if cuda else "CPU"
    out = {"device": where, "tasks": T, "strategy": str(strategy), "backend": backend.name,
           "products": args.products, "runs": {}}
    lines = []

    def emit(text=""):
        print(text)
        lines.append(text)

    emit(f"batched HVP, Omniglot 5-way 1-shot, T = {T}, task batching {strategy}, backend "
          f"{backend.name}, {where}, {torch.get_num_threads()} threads\n")
    for layers in ("autograd", "closed_form"):
        ops_, by_kind, per_product, wall = profile_products(
            fm, xs, ys, phi, strategy, layers, backend, args.products, dev)
        total = per_product * args.products * 1e3
        label = {"autograd": "before: ATen's own double backward (layer_derivatives='autograd')",
                 "closed_form": "after: imaml_fast.layers (layer_derivatives='closed_form', "
                                "the default)"}[layers]
        emit(f"## {label}\n\n{wall:.1f} ms wall per product (median of 5), "
              f"{per_product:.1f} ms of {'device' if cuda else 'CPU'} time in ops "
              f"(profiler self times)\n")
        emit("| kind | share |\n| --- | ---: |")
        for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            emit(f"| {kind} | {100 * t / total:.1f}% |")
        emit(f"\n| op | ms per product | calls per product | share |\n| --- | ---: | ---: | ---: |")
        for name, t, n in sorted(ops_, key=lambda o: -o[1])[:args.top]:
            emit(f"| {name[:60]} | {t / 1e3 / args.products:.2f} | {n / args.products:.0f} | "
                  f"{100 * t / total:.1f}% |")
        emit()
        out["runs"][layers] = {
            "wall_ms_per_product": wall, "per_product_ms": per_product,
            "by_kind": {k: t / total for k, t in by_kind.items()},
            "ops": [{"op": n, "ms_per_product": t / 1e3 / args.products, "calls": c}
                    for n, t, c in ops_]}
    a, b = out["runs"]["autograd"], out["runs"]["closed_form"]
    emit(f"after vs before: {a['wall_ms_per_product'] / b['wall_ms_per_product']:.2f}x faster "
          f"per product (wall), {a['per_product_ms'] / b['per_product_ms']:.2f}x less op time")
    if args.json:  # the raw figures, and beside them the tables printed above
        write_results(args.json, out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

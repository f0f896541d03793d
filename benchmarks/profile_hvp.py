"""Where one batched Hessian-vector product spends its time (torch.profiler), by op and by kind.

The setting of the roadmap's HVP item: the authors' Omniglot network, 5-way 1-shot, T = 32,
the default engine's HVP (reverse over reverse through a support-gradient graph built once,
as in a CG solve) and its task batching. Profiles `--products` products (after one warm-up),
then prints the top ops by self time on the device (CUDA time on a GPU, CPU time otherwise)
and the share of each kind of op: convolutions, BatchNorm, elementwise arithmetic, ReLU,
reductions, copies/layout, other. Kernels worth writing are the kinds with a large share that
are not convolutions or matmuls (cuDNN/cuBLAS/oneDNN already do those well).

    python benchmarks/profile_hvp.py [--device cuda] [--products 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from imaml_fast import BatchedHVP, IMAMLConfig
from imaml_fast.batching import choose_strategy, step_counts

from bench_meta_step import support_problem  # the same setting as the other HVP benchmarks

KINDS = [  # (kind, substrings of the aten op name), first match wins
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
    # the task batching the default configuration's meta-step would use
    strategy = choose_strategy("auto", fm, fm.theta, xs, ys, **step_counts(IMAMLConfig()))
    hvp = BatchedHVP(fm, phi, xs, ys, "revrev", strategy)
    v = torch.randn(T, fm.num_params, device=dev)
    hvp(v)  # warm-up
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(args.products):
            hvp(v)
        if cuda:
            torch.cuda.synchronize()
    hvp.release()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [(e.key, getattr(e, attr, 0.0) or 0.0, e.count) for e in prof.key_averages()
           if e.key.startswith("aten::") or cuda]
    ops = [o for o in ops if o[1] > 0]
    total = sum(t for _, t, _ in ops) or 1.0
    by_kind = defaultdict(float)
    for name, t, _ in ops:
        by_kind[kind_of(name)] += t
    where = torch.cuda.get_device_name(dev) if cuda else "CPU"
    print(f"batched HVP, Omniglot 5-way 1-shot, T = {T}, task batching {strategy}, {where}, "
          f"{torch.get_num_threads()} threads: {total / 1e3 / args.products:.1f} ms of "
          f"{'device' if cuda else 'CPU'} time per product (profiler self times)\n")
    print("| kind | share |\n| --- | ---: |")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {100 * t / total:.1f}% |")
    print(f"\n| op | ms per product | calls per product | share |\n| --- | ---: | ---: | ---: |")
    for name, t, n in sorted(ops, key=lambda o: -o[1])[:args.top]:
        print(f"| {name[:60]} | {t / 1e3 / args.products:.2f} | {n / args.products:.0f} | "
              f"{100 * t / total:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "tasks": T, "strategy": str(strategy),
                       "products": args.products, "per_product_ms": total / 1e3 / args.products,
                       "by_kind": {k: t / total for k, t in by_kind.items()},
                       "ops": [{"op": n, "ms_per_product": t / 1e3 / args.products,
                                "calls": c} for n, t, c in ops]}, f, indent=2)


if __name__ == "__main__":
    main()

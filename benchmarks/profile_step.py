"""Where one whole meta-step spends its time (torch.profiler), by op and by kind.

profile_hvp.py looks at one Hessian-vector product; this looks at a whole default meta-step
(`meta_gradient`, uncaptured: the inner loop, the support graph, the CG solve and the query
gradient) of the authors' Omniglot network on random data, T = 32, 5-way 1-shot with 16 inner
steps or 20-way with 25, 5 CG steps. It prints the wall time per step (median of 3, after a
warm-up), the time in ops per step (CUDA kernel time on a GPU, CPU self time otherwise,
under the profiler) and its share of the wall time, then the share of each kind of op
(profile_hvp.py's kinds: convolutions, BatchNorm, ReLU, elementwise, reductions,
copies/layout, matmuls, the imaml_fast.layers backward nodes with the C++ kernels they call)
and the top ops.

On a GPU the kernel time is about what a captured step (IMAML's default there) costs, and
the rest of the wall time is the host launching kernels; the shares say which kernels a
captured step would gain from. On a CPU the shares say how much of a step the convolutions
are, against everything a fused kernel could still take.

    python benchmarks/profile_step.py [--device cuda] [--n-way 5] [--steps 2] [--json out.json]

--json also writes the printed tables beside it (out.md), as the other benchmarks do.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from imaml_fast import IMAMLConfig, meta_gradient
from imaml_fast.cpu_memory import keep_freed_cpu_memory
from imaml_fast.models import omniglot_conv

from bench_meta_step import episode  # the same random episodes as the meta-step benchmark
from peers.common import meta_line, run_meta, write_results
from profile_hvp import kind_of


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--n-way", type=int, default=5, help="5 (16 inner steps) or 20 (25)")
    ap.add_argument("--steps", type=int, default=2, help="meta-steps profiled")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--malloc", default="keep", choices=("keep", "default"),
                    help="the CPU allocator: keep freed memory (keep_freed_cpu_memory(), as "
                         "imaml-fast train runs) or glibc's default")
    ap.add_argument("--json", help="write the raw figures here (and the tables, .md, beside it)")
    args = ap.parse_args(argv)
    if args.malloc == "keep":
        keep_freed_cpu_memory()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = omniglot_conv(args.n_way).to(dev)
    ep = episode(args.tasks, args.n_way, 1, 1, dev)
    cfg = IMAMLConfig(inner_steps=16 if args.n_way <= 5 else 25, cg_steps=5, lam=2.0,
                      inner_lr=0.1)

    def step():
        return meta_gradient(model, F.cross_entropy, *ep, cfg)

    r = step()  # warm-up (and the task batching's tuning)
    walls = []
    for _ in range(3):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls) * 1e3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        _sync(dev)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    # On the CPU: ATen ops, plus the self time of imaml_fast.layers' Function nodes, where the
    # C++ kernels (not profiled ops themselves) and the Python glue run.
    ops_ = [(e.key, getattr(e, attr, 0.0) or 0.0, e.count) for e in prof.key_averages()
            if cuda or e.key.startswith("aten::") or e.key.endswith("Fn")
            or e.key.endswith("FnBackward")]
    ops_ = [o for o in ops_ if o[1] > 0]
    total = sum(t for _, t, _ in ops_) or 1.0
    by_kind = defaultdict(float)
    for name, t, _ in ops_:
        by_kind[kind_of(name)] += t
    per_step = total / 1e3 / args.steps
    meta = run_meta("benchmarks/profile_step.py", vars(args), str(dev))
    unit = "kernel" if cuda else "op (CPU self)"
    caveat = "" if cuda else " (on a CPU the profiler slows the ops it times: can pass 100%)"
    lines = [f"{meta_line(meta)}: one meta-step, Omniglot {args.n_way}-way 1-shot, T = "
             f"{args.tasks}, {cfg.inner_steps} inner steps, 5 CG steps, backend {r.backend}, "
             f"task batching {r.task_batching}, CPU allocator: {args.malloc}\n",
             f"{wall:.1f} ms wall per step (median of 3, not profiled), {per_step:.1f} ms of "
             f"{unit} time per step (profiled): {100 * per_step / wall:.0f}% of the wall "
             f"time{caveat}\n",
             "| kind | ms per step | share |\n| --- | ---: | ---: |"]
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {t / 1e3 / args.steps:.1f} | {100 * t / total:.1f}% |")
    lines.append("\n| op | ms per step | calls per step | share |\n| --- | ---: | ---: | ---: |")
    for name, t, n in sorted(ops_, key=lambda o: -o[1])[:args.top]:
        lines.append(f"| {name[:60]} | {t / 1e3 / args.steps:.2f} | {n / args.steps:.0f} | "
                     f"{100 * t / total:.1f}% |")
    md = "\n".join(lines) + "\n"
    print(md, end="")
    if args.json:  # the raw figures, and the table beside them (.md)
        write_results(args.json, {
            "meta": meta, "inner_steps": cfg.inner_steps, "backend": r.backend,
            "task_batching": str(r.task_batching), "wall_ms": wall, "op_ms_per_step": per_step,
            "by_kind": {k: t / total for k, t in by_kind.items()},
            "ops": [{"op": n, "ms_per_step": t / 1e3 / args.steps,
                     "calls_per_step": c / args.steps} for n, t, c in ops_]}, md)

if __name__ == "__main__":
    main()

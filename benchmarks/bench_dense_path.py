"""Dense-Hessian path against matrix-free CG: a meta-step of small MLPs, to find where
materialising Hessians pays.

The dense path (imaml_fast/dense.py) builds each task's Hessian [T, P, P] once (P/256
batched double-backward passes) and solves in one kernel; matrix-free CG runs one
Hessian-vector product per iteration. Which wins depends on P and on whether the step is
captured as a CUDA graph (the dense path's case was launch latency, which a graph replay
removes). On an H200 (results/NVIDIA-H200/bench_dense_path.md) matrix-free won at every
P from 321 to 4,353, captured and uncaptured, so cg_dense="auto" no longer materialises
anywhere; "always" still does.

Setting: MAML's sinusoid regression (the `sinusoid` preset: 10 support and 10 query points,
10 inner steps, inner lr 0.02, lam = 2, cg_damping 10, 5 CG steps), T tasks, on 1-H-H-1
ReLU MLPs with P = H^2 + 4H + 1 (H = 40 is the preset's 1,761). For each width: cg_dense
"always" and "never", each through IMAML as a user runs it (on a GPU captured as a CUDA
graph, and uncaptured too). The variants of one width run in this one process, interleaved
(one call of each per round), median of --repeats rounds after a warm-up; these models are
small enough that the variants do not disturb each other's allocator much, and a process
per variant would spend the GPU check's minutes starting CUDA contexts. Prints the table,
the ratio dense / matrix-free, and the two paths' largest relative difference in the
meta-gradient (they solve the same system: a check, not a speed).

    python benchmarks/bench_dense_path.py [--device cuda] [--hidden 16 40 64] [--tasks 32]
        [--repeats 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from imaml_fast import IMAML, IMAMLConfig
from imaml_fast.data.sinusoid import SinusoidSampler
from imaml_fast.graphs import graphs_why_not
from imaml_fast.models import sinusoid_mlp
from peers.common import meta_line, run_meta, write_results
from timing import sync  # benchmarks/timing.py


def variants(device: str):
    """[(name, cg_dense, cuda_graphs)]: both paths, captured where this device captures."""
    captured = not graphs_why_not(device)
    out = []
    for dense in ("always", "never"):
        out.append((f"{'dense' if dense == 'always' else 'matrix-free'}"
                    f"{', CUDA graph' if captured else ''}", dense, "auto"))
        if captured:
            out.append((f"{'dense' if dense == 'always' else 'matrix-free'}, uncaptured",
                        dense, False))
    return out


def measure(hidden: int, args):
    torch.manual_seed(0)
    model = sinusoid_mlp(hidden).to(args.device)
    P = sum(p.numel() for p in model.parameters())
    ep = SinusoidSampler(10, 10, args.tasks, device=args.device, seed=0).sample()
    batch = (ep.x_support, ep.y_support, ep.x_query, ep.y_query)
    base = IMAMLConfig(inner_steps=10, inner_lr=0.02, lam=2.0, cg_steps=5, cg_damping=10.0)
    runs, grads, info = {}, {}, {}
    for name, dense, graphs in variants(args.device):
        learner = IMAML(model, F.mse_loss, base.replace(cg_dense=dense), cuda_graphs=graphs)
        runs[name] = learner
        r = learner.meta_gradient(*batch)  # warm-up (and capture)
        r = learner.meta_gradient(*batch)  # a replay, where captured
        grads[name] = r.grads_flat.detach().double().cpu()
        info[name] = {"backend": r.backend, "hvp": r.hvp,
                      "captured": bool(learner.cuda_graphs)}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, learner in runs.items():
            sync(args.device)
            t0 = time.perf_counter()
            learner.meta_gradient(*batch)
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
    ref = next(g for n, g in grads.items() if n.startswith("matrix-free"))
    rows = []
    for name in runs:
        diff = float((grads[name] - ref).norm() / ref.norm().clamp_min(1e-30))
        rows.append({"hidden": hidden, "params": P, "variant": name,
                     "median_ms": 1e3 * statistics.median(times[name]),
                     "times_s": times[name], "rel_diff_vs_matrix_free": diff, **info[name]})
    return rows


def markdown(meta, rows):
    head = (f"{meta_line(meta)}: sinusoid MLPs 1-H-H-1, "
            f"T = {meta['settings']['tasks']}, 10 inner steps, 5 CG steps, median of "
            f"{meta['settings']['repeats']} interleaved rounds\n\n")
    lines = ["| H | P | variant | ms / meta-step | dense / matrix-free | rel. diff of the "
             "meta-gradient | ran as |", "| ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        pair = next(q for q in rows if q["hidden"] == r["hidden"]
                    and q["variant"] == r["variant"].replace("dense", "matrix-free"))
        ratio = r["median_ms"] / pair["median_ms"] if r["variant"].startswith("dense") else None
        lines.append(f"| {r['hidden']} | {r['params']:,} | {r['variant']} | "
                     f"{r['median_ms']:.2f} | {'' if ratio is None else f'{ratio:.2f}'} | "
                     f"{r['rel_diff_vs_matrix_free']:.1e} | {r['backend']}, hvp={r['hvp']} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, nargs="+", default=[16, 24, 40, 56, 64])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="write the raw results here (and a .md beside it)")
    args = ap.parse_args(argv)
    rows = []
    for h in args.hidden:
        for r in measure(h, args):
            rows.append(r)
            print(f"H={h:3d} P={r['params']:6d} {r['variant']:28s} {r['median_ms']:9.2f} ms  "
                  f"rel diff {r['rel_diff_vs_matrix_free']:.1e}  ({r['backend']}, "
                  f"hvp={r['hvp']})", flush=True)
    meta = run_meta("benchmarks/bench_dense_path.py", vars(args), args.device)
    md = markdown(meta, rows)
    print()
    print(md)
    if args.json:  # the .md beside it
        write_results(args.json, {"meta": meta, "rows": rows}, md)
    return rows


if __name__ == "__main__":
    main()

"""How many ATen operations one meta-step dispatches: the host's share of an uncaptured GPU step.

Uncaptured on a GPU, a meta-step is paced by the host launching kernels (on an H200 the
captured 5-way step took 0.042 s and the same step uncaptured 0.33 s), so the number of
operations per step, not their arithmetic, is what the uncaptured path pays for. This counts
every ATen operation one meta_gradient call dispatches (a TorchDispatchMode, after a warm-up
call), split into views (no kernel) and the rest (on a GPU nearly each one a kernel launch),
for the paper's Omniglot setting on random data. Counts do not depend on the machine's speed,
so they are a CPU-measurable proxy for the uncaptured GPU overhead.

    python benchmarks/op_count.py [--tasks 8] [--backend cpp] [--inner-solver gd gd_armijo]
        [--layer-batching auto vmap] [--json benchmarks/results/cpu-epyc-2core/op_count.json]

--layer-batching compares the hand-batched layers (IMAMLConfig.layer_batching="auto", the
default for this network, imaml_fast.stacked) with the model under torch.func.vmap.

The "host-bound step" column times the same meta-step (one torch thread, median of
--repeats, the configurations interleaved round by round in this process) with the network
shrunk to 2 filters: its arithmetic is then negligible, and what is left is the host's work
per operation (dispatch, autograd, Python), the part of an uncaptured GPU step that the
operation count stands for.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from imaml_fast import IMAMLConfig, meta_gradient
from imaml_fast.models import omniglot_conv
from bench_meta_step import episode  # benchmarks/bench_meta_step.py
from peers.common import meta_line, run_meta, write_results

# Operations that only make a new view of existing storage (no kernel, no allocation).
VIEWS = {"view", "permute", "detach", "slice", "transpose", "_unsafe_view", "unsqueeze",
         "squeeze", "expand", "alias", "as_strided", "t", "select", "unbind", "split",
         "split_with_sizes", "narrow", "_reshape_alias", "unfold", "diagonal", "lift_fresh"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(cfg: IMAMLConfig, tasks: int, device: str = "cpu") -> collections.Counter:
    torch.manual_seed(0)
    model = omniglot_conv(5).to(device)
    ep = episode(tasks, 5, 1, 1, device)
    meta_gradient(model, F.cross_entropy, *ep, cfg)  # warm-up: task batching, lazy set-up
    with _Count() as c:
        meta_gradient(model, F.cross_entropy, *ep, cfg)
    return c.counts


def host_bound_seconds(cfgs, tasks: int, repeats: int):
    """Median seconds of one meta_gradient call per config, with a 2-filter network: the
    host's cost of the step's operations without their arithmetic."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = omniglot_conv(5, filters=2)
    ep = episode(tasks, 5, 1, 1, "cpu")
    for cfg in cfgs:
        meta_gradient(model, F.cross_entropy, *ep, cfg)  # warm-up
    times = [[] for _ in cfgs]
    for _ in range(repeats):
        for i, cfg in enumerate(cfgs):
            t0 = time.perf_counter()
            meta_gradient(model, F.cross_entropy, *ep, cfg)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--inner-solver", nargs="+", default=["gd", "gd_armijo"])
    ap.add_argument("--layer-batching", nargs="+", default=["auto", "vmap"])
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per configuration")
    ap.add_argument("--top", type=int, default=12, help="most frequent operations listed")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for solver in args.inner_solver:
        for lb in args.layer_batching:
            cfg = IMAMLConfig(inner_solver=solver, inner_steps=16, inner_lr=0.1, lam=2.0,
                              cg_steps=5, backend=args.backend, task_batching="vmap",
                              layer_batching=lb)
            c = count(cfg, args.tasks)
            views = sum(v for op, v in c.items() if op in VIEWS)
            rows.append({"cfg": cfg, "inner_solver": solver, "layer_batching": lb,
                         "total": sum(c.values()),
                         "views": views, "not_views": sum(c.values()) - views,
                         "top": c.most_common(args.top)})
    secs = host_bound_seconds([r.pop("cfg") for r in rows], args.tasks, args.repeats)
    for r, t in zip(rows, secs):
        r["host_bound_step_s"] = t
    meta = run_meta("benchmarks/op_count.py", {"tasks": args.tasks, "backend": args.backend,
                                                "inner_steps": 16, "cg_steps": 5})
    md = [f"{meta_line(meta)}: ATen operations dispatched by one meta_gradient call, authors' "
          f"Omniglot network, 5-way 1-shot, T = {args.tasks}, 16 inner steps, 5 CG steps, "
          f"backend {args.backend}, all tasks in one batched call (task_batching vmap); layer "
          f"batching auto: the hand-batched layers (imaml_fast.stacked), vmap: the model under "
          f"torch.func.vmap\n",
          "| inner solver | layer batching | operations | views | not views | host-bound step | most frequent |",
          "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        top = ", ".join(f"{op} {n}" for op, n in r["top"])
        md.append(f"| {r['inner_solver']} | {r['layer_batching']} | {r['total']:,} | {r['views']:,} | "
                  f"{r['not_views']:,} | {r['host_bound_step_s'] * 1e3:.0f} ms | {top} |")
    md.append(f"\nhost-bound step: the same meta-step with the network shrunk to 2 filters (its "
              f"arithmetic negligible), one torch thread, median of {args.repeats} calls, the "
              f"rows interleaved: the host's cost of the step's operations")
    md = "\n".join(md) + "\n"
    print(md)
    if args.json:
        write_results(args.json, {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
    main()

"""Tasks per second of task-parallel meta-training at 1 and more ranks (torch.distributed).

    python benchmarks/bench_scaling.py [--ranks 1 2] [--tasks 16] [--steps 6] [--json out.json]

Each point runs IMAML meta-steps of the Omniglot network (5-way 1-shot, 16 inner steps, 5 CG
steps) on random episodes, each rank taking its share of the meta-batch, gloo on CPUs and
NCCL on GPUs. On a CPU the ranks share the machine's cores (torch threads per rank = cores /
ranks), so the comparison is the same hardware split two ways, not more hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from imaml_fast import IMAML, IMAMLConfig
from imaml_fast import distributed as D
from imaml_fast.models import omniglot_conv


def _worker(rank, world, rendezvous, args, queue):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        D.init_local(rank, world, rendezvous, args.device)
    torch.manual_seed(0)
    model = omniglot_conv(5).to(args.device)
    learner = IMAML(model, F.cross_entropy, IMAMLConfig(task_batching=args.task_batching),
                    torch.optim.Adam(model.parameters(), 1e-3), distributed=world > 1)
    g = torch.Generator().manual_seed(1)
    mine = D.shard(args.tasks, rank, world)
    times = []
    for step in range(args.steps + 1):
        xs = torch.randn(args.tasks, 5, 1, 28, 28, generator=g)[mine].to(args.device)
        ys = torch.arange(5).repeat(args.tasks, 1)[mine].to(args.device)
        t0 = time.perf_counter()
        learner.meta_step(xs, ys, xs, ys)
        if world > 1:
            torch.distributed.barrier()
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
    if rank == 0:
        queue.put(statistics.median(times))
    if world > 1:
        D.end_worker()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task-batching", default="vmap")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for world in args.ranks:
        queue = ctx.SimpleQueue()
        with D.local_rendezvous() as rendezvous:
            mp.start_processes(_worker, args=(world, rendezvous, args, queue), nprocs=world,
                               join=True, start_method="spawn")
        s = queue.get()
        rows.append({"ranks": world, "s_per_step": s, "tasks_per_s": args.tasks / s})
        print(f"{world} rank(s): {s:.3f} s / meta-step, {args.tasks / s:.1f} tasks/s", flush=True)
    for r in rows:
        r["speedup_vs_1"] = rows[0]["s_per_step"] / r["s_per_step"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"device": args.device, "cores": os.cpu_count(), "tasks": args.tasks,
                                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

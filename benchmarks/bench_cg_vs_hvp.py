"""The implicit CG solve against the Hessian-vector products it needs, on the Omniglot network.

A CG solve of n iterations needs n HVPs; everything else (dots, the masked vector updates,
flags) is overhead. This prints, for each batched backend available on the device, the
median time of: the HVP setup (support-gradient graph, paid once per solve), n HVPs alone,
and the whole n-iteration solve, and the ratio solve / (setup + n HVPs). Target on a GPU:
at most 1.1x.

    python benchmarks/bench_cg_vs_hvp.py [--device cuda] [--tasks 32] [--iters 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from imaml_fast import backend_info, cg_solve
from imaml_fast.backends import resolve_backend
from imaml_fast.hvp import BatchedHVP

from bench_meta_step import support_problem, time_it  # the same setting and median timing


def median_time(fn, device, repeats):
    return time_it(fn, repeats, device)[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--task-batching", default="vmap")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    T = args.tasks
    fm, xs, ys, phi = support_problem(T, device)
    b = torch.randn(T, fm.num_params, device=device)
    tb = args.task_batching if args.task_batching in ("vmap", "loop") else int(args.task_batching)
    rows = []
    names = [i["name"] for i in backend_info(device) if i["available"] and i["name"] != "reference"]
    for name in names:
        ops = resolve_backend(name, device, torch.float32).ops()
        setup = median_time(lambda: BatchedHVP(fm, phi, xs, ys, "revrev", tb).release(), device,
                            args.repeats)
        h = BatchedHVP(fm, phi, xs, ys, "revrev", tb)

        def hvps():
            v = b
            for _ in range(args.iters):
                v = h(v)
        t_hvp = median_time(hvps, device, args.repeats)
        t_cg = median_time(lambda: cg_solve(lambda v: v + 0.5 * h(v), b, max_iter=args.iters,
                                            tol=0.0, update=ops["cg_update"]), device, args.repeats)
        h.release()
        row = {"backend": name, "setup_s": setup, "hvps_s": t_hvp, "cg_s": t_cg,
               "cg_over_hvps": t_cg / t_hvp,
               "solve_over_floor": (setup + t_cg) / (setup + t_hvp)}
        rows.append(row)
        print(f"{name:8s} setup {setup * 1e3:8.1f} ms  {args.iters} HVPs {t_hvp * 1e3:8.1f} ms  "
              f"CG {t_cg * 1e3:8.1f} ms  CG/HVPs {row['cg_over_hvps']:.3f}  "
              f"(setup+CG)/(setup+HVPs) {row['solve_over_floor']:.3f}", flush=True)
    if args.json:
        meta = {"device": str(device), "tasks": T, "iters": args.iters, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()

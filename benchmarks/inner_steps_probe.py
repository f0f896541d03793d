"""Is a checkpoint's inner loop long enough? The meta-gradient at a saved run's parameters with
several numbers of inner steps K, on one meta-batch of its training tasks.

For each K: the inner residual ||grad F(phi)|| / ||grad F(theta)|| (MetaGradient.inner_residual),
the support loss at phi, the share of tasks whose implicit CG met negative curvature and,
with --cg-clip, the share clipped. Everything else is the run's own settings unless named.
A share of negative-curvature stops that vanishes with more inner steps says that the inner
loop stops partway down, in a region of negative curvature, rather than at a minimum.

    python benchmarks/inner_steps_probe.py RUN_DIR --data-root DATA [--steps 25 100 400]
        [--cg-damping 10] [--cg-clip] [--tasks 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from imaml_fast.cg import CG_NEGATIVE_CURVATURE
from imaml_fast.implicit import meta_gradient
from imaml_fast.train import build_sampler, load_run, loss_fn_for
from peers.common import meta_line, run_meta, write_results

SAMPLE_SEED = 321  # the meta-batch probed: drawn from its own stream, the same for every run


def probe(run_dir: str, data_root: str, steps, tasks: int, cg_damping=None,
          cg_clip: bool = False) -> tuple:
    """(rows, settings): one row per K."""
    ckpt, s, model = load_run(f"{run_dir}/checkpoint.pt", data_root)
    xs, ys, xq, yq = build_sampler(s, "train", tasks, seed=SAMPLE_SEED).sample()
    damping = s.cg_damping if cg_damping is None else cg_damping
    base = s.imaml_config().replace(task_batching="vmap", cg_damping=damping, cg_clip=cg_clip)
    rows = []
    for k in steps:
        r = meta_gradient(model, loss_fn_for(s), xs, ys, xq, yq, base.replace(inner_steps=k))
        rows.append({
            "inner_steps": k, "residual": r.inner_residual.tolist(),
            "support_loss": r.inner_loss.tolist(),
            "negative_curvature": float((r.cg_status == CG_NEGATIVE_CURVATURE).double().mean()),
            "clipped": float(r.cg_clipped.double().mean())})
        print(f"K = {k}: residual median {statistics.median(rows[-1]['residual']):.4f}, "
              f"support loss {statistics.mean(rows[-1]['support_loss']):.4f}, CG stopped on "
              f"negative curvature {rows[-1]['negative_curvature']:.0%}, clipped "
              f"{rows[-1]['clipped']:.0%}", flush=True)
    settings = {"run": run_dir.rstrip("/").split("/")[-1], "step": ckpt["step"],
                "preset": s.preset, "tasks": tasks, "cg_damping": damping, "cg_clip": cg_clip,
                "inner_solver": s.inner_solver, "inner_lr": s.inner_lr, "lam": s.lam}
    return rows, settings


def markdown(meta: dict, rows) -> str:
    s = meta["settings"]
    head = (f"{meta_line(meta)}: run {s['run']} at step {s['step']} ({s['preset']}), one "
            f"meta-batch of {s['tasks']} training tasks, {s['inner_solver']} at inner lr "
            f"{s['inner_lr']:g}, lam {s['lam']:g}, cg_damping {s['cg_damping']:g}"
            f"{', cg_clip' if s['cg_clip'] else ''}. Residual: median over tasks; support "
            f"loss: mean.\n\n")
    lines = ["| inner steps | inner residual | support loss | CG stopped on negative curvature "
             "| clipped |", "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['inner_steps']} | {statistics.median(r['residual']):.4f} | "
                     f"{statistics.mean(r['support_loss']):.4f} | "
                     f"{r['negative_curvature']:.0%} | {r['clipped']:.0%} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder (holds checkpoint.pt)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 100, 400])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--cg-damping", type=float, default=None, help="default: the run's")
    ap.add_argument("--cg-clip", action="store_true")
    ap.add_argument("--json", help="write the raw results here (and a .md beside it)")
    args = ap.parse_args(argv)
    rows, settings = probe(args.run, args.data_root, args.steps, args.tasks, args.cg_damping,
                           args.cg_clip)
    meta = run_meta("inner_steps_probe.py", settings)
    md = markdown(meta, rows)
    print(md)
    if args.json:
        write_results(args.json, {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
    main()

"""Is a checkpoint's inner loop long enough? The meta-gradient at a saved run's parameters with
several numbers of inner steps K, on one meta-batch of its training tasks.

For each K: the inner residual ||grad F(phi)|| / ||grad F(theta)|| (MetaGradient.inner_residual),
the support loss at phi, the share of tasks whose implicit CG met negative curvature and,
with --cg-clip, the share clipped, the seconds it took, and the meta-gradient's relative
distance from the one with the most inner steps (the best solved). Everything else is the
run's own settings unless named. A share of negative-curvature stops that vanishes with more
inner steps says that the inner loop stops partway down, in a region of negative curvature,
rather than at a minimum. --inner-tol adds one row per tolerance (IMAMLConfig.inner_tol,
capped at the largest K): the steps the tasks took (mean and most) for the same measures.
--inner-solver compares solvers at each K, by the inner objective each reached (the
objective gap: how far above the lowest value any row found) as well; --inner-lr compares
inner learning rates (for gd_armijo the largest step a task takes) the same way. --first-order adds,
for each K, the first solver's first-order meta-gradient (cg_steps 0: the query gradient at
phi), to see whether the implicit term moves the meta-gradient towards the best-solved one;
the cosine column compares directions (the error mixes direction and length).

    python benchmarks/inner_steps_probe.py RUN_DIR --data-root DATA [--steps 25 100 400]
        [--inner-solver gd_armijo agd] [--inner-lr 0.03 0.1] [--inner-tol 0.02 0.005] [--float64]
        [--cg-damping 10] [--cg-clip] [--first-order] [--tasks 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from imaml_fast.cg import CG_NEGATIVE_CURVATURE
from imaml_fast.config import INNER_SOLVERS
from imaml_fast.functional import FunctionalModel
from imaml_fast.implicit import meta_gradient
from imaml_fast.train import build_sampler, load_run, loss_fn_for
from peers.common import meta_line, run_meta, write_results

SAMPLE_SEED = 321  # the meta-batch probed: drawn from its own stream, the same for every run


def probe(run_dir: str, data_root: str, steps, tasks: int, cg_damping=None,
          cg_clip: bool = False, tols=(), solvers=None, dtype=None,
          first_order: bool = False, lrs=None) -> tuple:
    """(rows, settings): one row per solver, inner lr and K, then one per tolerance
    (gd_armijo), then (first_order) one first-order row per K for the first solver; the
    tolerance and first-order rows at the first inner lr."""
    ckpt, s, model = load_run(f"{run_dir}/checkpoint.pt", data_root)
    xs, ys, xq, yq = build_sampler(s, "train", tasks, seed=SAMPLE_SEED).sample()
    if dtype is not None:
        model, xs, xq = model.to(dtype), xs.to(dtype), xq.to(dtype)
    theta = FunctionalModel(model, loss_fn_for(s)).theta  # the flat layout of adapted_flat
    damping = s.cg_damping if cg_damping is None else cg_damping
    base = s.imaml_config().replace(task_batching="vmap", cg_damping=damping, cg_clip=cg_clip)
    solvers = solvers or [base.inner_solver]
    lrs = lrs or [base.inner_lr]
    cap = max(steps)
    # (solver, K, inner_tol, cg_steps, inner_lr)
    runs = [(solver, k, 0.0, base.cg_steps, lr) for solver in solvers for lr in lrs
            for k in steps]
    runs += [("gd_armijo", cap, tol, base.cg_steps, lrs[0]) for tol in tols]
    if first_order:
        runs += [(solvers[0], k, 0.0, 0, lrs[0]) for k in steps]
    rows, grads, objectives = [], [], []
    for solver, k, tol, cg_steps, lr in runs:
        t0 = time.perf_counter()
        r = meta_gradient(model, loss_fn_for(s), xs, ys, xq, yq,
                          base.replace(inner_solver=solver, inner_steps=k, inner_tol=tol,
                                       cg_steps=cg_steps, inner_lr=lr))
        seconds = time.perf_counter() - t0
        grads.append((r.grads_flat, r.task_grads_flat))
        # the inner objective F = L + lam/2 ||phi - theta||^2 each task reached
        d = r.adapted_flat - theta
        objectives.append(r.inner_loss.double() + 0.5 * s.lam * (d * d).sum(1).double())
        rows.append({
            "inner_solver": solver, "inner_lr": lr, "inner_steps": k, "inner_tol": tol,
            "cg_steps": cg_steps,
            "steps_taken": r.inner_steps.tolist(), "seconds": seconds,
            "residual": r.inner_residual.tolist(), "support_loss": r.inner_loss.tolist(),
            "objective": objectives[-1].tolist(),
            "negative_curvature": float((r.cg_status == CG_NEGATIVE_CURVATURE).double().mean()),
            "clipped": float(r.cg_clipped.double().mean())})
        print(f"{solver}, lr {lr:g}, K = {k}{f', inner_tol {tol:g}' if tol else ''}"
              f"{', first-order' if cg_steps == 0 else ''}: steps taken mean "
              f"{statistics.mean(rows[-1]['steps_taken']):.1f}, residual median "
              f"{statistics.median(rows[-1]['residual']):.4f}, objective mean "
              f"{statistics.mean(rows[-1]['objective']):.4g}, CG stopped on negative "
              f"curvature {rows[-1]['negative_curvature']:.0%}, clipped "
              f"{rows[-1]['clipped']:.0%}, {seconds:.1f} s", flush=True)
    # g*: the meta-gradient of the fully run row (K = the largest) with the lowest objective
    full = [i for i, (_, k, tol, cg, _) in enumerate(runs) if k == cap and tol == 0 and cg]
    ref = min(full, key=lambda i: float(objectives[i].mean()))
    best, best_tasks = grads[ref]
    lowest = torch.stack(objectives).min(0).values
    for row, (g, tg), obj in zip(rows, grads, objectives):
        row["grad_error"] = float((g - best).norm() / best.norm())
        row["grad_cosine"] = float(torch.nn.functional.cosine_similarity(g, best, dim=0))
        row["task_grad_error"] = ((tg - best_tasks).norm(dim=1) / best_tasks.norm(dim=1)).tolist()
        row["objective_gap"] = (obj - lowest).tolist()
    # a first-order row against the implicit one with the same solver and K: what the
    # implicit term changes in the direction and the length
    implicit = {(solver, k, lr): i for i, (solver, k, tol, cg, lr) in enumerate(runs)
                if cg and tol == 0}
    for i, (solver, k, tol, cg, lr) in enumerate(runs):
        if cg == 0 and (solver, k, lr) in implicit:
            g, gi = grads[i][0], grads[implicit[solver, k, lr]][0]
            rows[i]["cosine_to_implicit"] = float(torch.nn.functional.cosine_similarity(g, gi, dim=0))
            rows[i]["length_to_implicit"] = float(g.norm() / gi.norm())
    settings = {"run": run_dir.rstrip("/").split("/")[-1], "step": ckpt["step"],
                "preset": s.preset, "tasks": tasks, "cg_damping": damping, "cg_clip": cg_clip,
                "inner_solver": s.inner_solver, "inner_lr": s.inner_lr, "lam": s.lam,
                "dtype": str(dtype or "the run's").replace("torch.", ""),
                "reference_row": f"{runs[ref][0]}, inner lr {runs[ref][4]:g}, K = {runs[ref][1]}"}
    return rows, settings


def markdown(meta: dict, rows) -> str:
    s = meta["settings"]
    head = (f"{meta_line(meta)}: run {s['run']} at step {s['step']} ({s['preset']}), one "
            f"meta-batch of {s['tasks']} training tasks, {s['dtype']} arithmetic, run's solver "
            f"{s['inner_solver']} at inner lr {s['inner_lr']:g}, lam {s['lam']:g}, cg_damping "
            f"{s['cg_damping']:g}{', cg_clip' if s['cg_clip'] else ''}. Residual: median over "
            f"tasks; objective gap: median over tasks of F - the lowest F any row reached for "
            f"that task (F = support loss + lam/2 ||phi - theta||^2); meta-gradient error: "
            f"||g - g*|| / ||g*||, g* the meta-gradient of {s.get('reference_row', 'the most inner steps')} "
            f"(the fully run row with the lowest mean F), for the mean over tasks and (median) "
            f"for each task's; cosine: of the mean meta-gradient with g*'s; first-order rows: "
            f"the cosine and length ratio of their mean meta-gradient to the implicit one with "
            f"the same solver and K; seconds: one meta-gradient on this machine.\n\n")
    lines = ["| solver | inner lr | inner steps | inner_tol | steps taken (mean / most) | inner residual "
             "| objective gap | support loss | CG stopped on negative curvature | clipped "
             "| meta-gradient error (mean / tasks) | cosine to g* | first-order: cosine / length "
             "to implicit | seconds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    for r in rows:
        taken = r.get("steps_taken") or [r["inner_steps"]]
        gap = r.get("objective_gap")
        solver = r.get('inner_solver', s['inner_solver'])
        if r.get("cg_steps") == 0:
            solver += ", first-order"
        versus = (f"{r['cosine_to_implicit']:.3f} / {r['length_to_implicit']:.2f}"
                  if "cosine_to_implicit" in r else "")
        lines.append(f"| {solver} | {r.get('inner_lr', s['inner_lr']):g} | {r['inner_steps']} | "
                     f"{r.get('inner_tol', 0.0):g} | "
                     f"{statistics.mean(taken):.1f} / {max(taken)} | "
                     f"{statistics.median(r['residual']):.4f} | "
                     f"{statistics.median(gap) if gap else float('nan'):.2e} | "
                     f"{statistics.mean(r['support_loss']):.4f} | "
                     f"{r['negative_curvature']:.0%} | {r['clipped']:.0%} | "
                     f"{r.get('grad_error', float('nan')):.2e} / "
                     f"{statistics.median(r.get('task_grad_error', [float('nan')])):.2e} | "
                     f"{r.get('grad_cosine', float('nan')):.3f} | {versus} | "
                     f"{r.get('seconds', float('nan')):.1f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder (holds checkpoint.pt)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 100, 400])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--cg-damping", type=float, default=None, help="default: the run's")
    ap.add_argument("--cg-clip", action="store_true")
    ap.add_argument("--inner-tol", type=float, nargs="*", default=[],
                    help="gd_armijo tolerances to add, each capped at the largest --steps")
    ap.add_argument("--inner-solver", nargs="+", choices=INNER_SOLVERS,
                    help="solvers to compare at each K (default: the run's)")
    ap.add_argument("--inner-lr", type=float, nargs="+",
                    help="inner learning rates to compare (default: the run's)")
    ap.add_argument("--float64", action="store_true",
                    help="probe in float64 (the model and images converted)")
    ap.add_argument("--first-order", action="store_true",
                    help="add the first solver's first-order meta-gradient (cg_steps 0) at each K")
    ap.add_argument("--json", help="write the raw results here (and a .md beside it)")
    args = ap.parse_args(argv)
    rows, settings = probe(args.run, args.data_root, args.steps, args.tasks, args.cg_damping,
                           args.cg_clip, args.inner_tol, args.inner_solver,
                           torch.float64 if args.float64 else None, args.first_order,
                           args.inner_lr)
    meta = run_meta("inner_steps_probe.py", settings)
    md = markdown(meta, rows)
    print(md)
    if args.json:
        write_results(args.json, {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
    main()

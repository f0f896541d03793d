"""Does the inner loop still solve its problem as meta-training goes on? One solver per run.

Meta-trains an Omniglot preset from the same seed once per inner solver named, and every
--every meta-steps, on that step's tasks, records per task:

- the relative residual ||grad F(phi)|| / ||grad F(theta)|| of the inner problem
  F(phi) = L_support(phi) + lam/2 ||phi - theta||^2 at the solver's phi (the implicit
  meta-gradient assumes grad F(phi) = 0): the meta-step's own MetaGradient.inner_residual;
- the support loss at phi (its inner_loss);
- the Hessian eigenvalue of largest magnitude of L_support at phi (power iteration on the
  batched Hessian-vector product), against the bound 2 / inner_lr - lam past which the
  fixed-step gradient descent is unstable;

and, from each meta-step, the query loss and accuracy after adaptation and the share of tasks
whose implicit CG stopped on negative curvature. It shows why the fixed step ("gd") stops
converging on 20-way 1-shot and what the line search ("gd_armijo") does there.

    python benchmarks/inner_convergence.py --data-root DATA [--preset omniglot-20w1s]
        [--tasks 16] [--steps 150] [--every 10] [--inner-solver gd gd_armijo] [--cg-damping 10]
        [--json benchmarks/results/cpu-epyc-2core/inner_convergence/inner_convergence.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from imaml_fast.cg import CG_NEGATIVE_CURVATURE
from imaml_fast.config import INNER_SOLVERS
from imaml_fast.functional import FunctionalModel
from imaml_fast.hvp import BatchedHVP
from imaml_fast.presets import PRESETS
from imaml_fast.train import RunSettings, build_model, build_sampler, loss_fn_for, task_metric
from imaml_fast.trainer import IMAML
from peers.common import meta_line, run_meta, write_results


def top_eigenvalue(fm, phi, x, y, iters: int, seed: int = 0) -> torch.Tensor:
    """[T] Rayleigh quotients after `iters` power iterations: the eigenvalue of largest
    magnitude of each task's support Hessian at phi, with its sign."""
    hvp = BatchedHVP(fm, phi, x, y)
    gen = torch.Generator(device=phi.device).manual_seed(seed)
    v = torch.randn(phi.shape, generator=gen, device=phi.device, dtype=phi.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    lam = torch.zeros(phi.shape[0], dtype=phi.dtype, device=phi.device)
    for _ in range(iters):
        w = hvp(v)
        lam = (w * v).sum(1)
        v = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    hvp.release()
    return lam


def probe(fm, r, xs, ys, power_iters: int) -> dict:
    """The inner-loop figures of meta-step result `r` (a MetaGradient) on its tasks xs, ys."""
    top = top_eigenvalue(fm, r.adapted_flat, xs, ys, power_iters)
    return {"rel_residual": r.inner_residual.tolist(), "support_loss": r.inner_loss.tolist(),
            "top_eigenvalue": top.tolist()}


def run(args, solver: str, settings: dict) -> list:
    """Meta-train with `solver`; returns the rows and records the run's settings in
    settings[solver]."""
    torch.manual_seed(0)
    s = RunSettings.from_preset(args.preset, tasks=args.tasks, steps=args.steps,
                                data_root=args.data_root, out="unused", device=args.device,
                                inner_solver=solver, task_batching="vmap", progress=False,
                                cg_damping=args.cg_damping)
    torch.manual_seed(s.seed)
    model = build_model(s).to(s.device)
    loss_fn = loss_fn_for(s)
    opt = torch.optim.Adam(model.parameters(), lr=s.outer_lr)
    sampler = build_sampler(s, "train", s.tasks, seed=s.seed)
    cfg = s.imaml_config()
    learner = IMAML(model, loss_fn, cfg, opt, cuda_graphs=False)
    settings[solver] = s.to_dict()
    rows = []
    t0 = time.perf_counter()
    for step in range(1, s.steps + 1):
        xs, ys, xq, yq = sampler.sample()
        row = {"solver": solver, "step": step}
        r = learner.meta_step(xs, ys, xq, yq).result
        if (step - 1) % args.every == 0:
            row.update(probe(FunctionalModel(model, loss_fn), r, xs, ys, args.power_iters))
        row.update(query_loss=float(r.query_loss.mean()),
                   accuracy=float(task_metric(s, learner, r.adapted, xq, yq, r.query_outputs).mean()),
                   negative_curvature=float((r.cg_status == CG_NEGATIVE_CURVATURE).double().mean()))
        rows.append(row)
        if "rel_residual" in row:
            med = statistics.median
            print(f"{solver} step {step}: residual {med(row['rel_residual']):.2f}, support loss "
                  f"{med(row['support_loss']):.3f}, top eigenvalue {med(row['top_eigenvalue']):.0f}"
                  f" (bound {2 / s.inner_lr - s.lam:.0f}), query accuracy {row['accuracy']:.1%}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def markdown(meta, settings, rows, args) -> str:
    s = meta["settings"]
    p = settings[args.inner_solver[0]]
    bound = 2 / p["inner_lr"] - p["lam"]
    head = (f"{meta_line(meta)}: {s['preset']}, {s['tasks']} tasks per meta-step, seed 0, "
            f"inner lr {p['inner_lr']:g}, {p['inner_steps']} inner steps, "
            f"lam {p['lam']:g}, cg_damping {p['cg_damping']:g}. Probes: medians over the step's "
            f"tasks, measured before the step; stability bound of the fixed step 2 / lr - lam = "
            f"{bound:.0f}. Training: means over the {args.every} meta-steps from the probe on.\n\n")
    lines = ["| solver | step | inner residual | support loss | top Hessian eigenvalue | "
             "query loss | query accuracy | CG stopped on negative curvature |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    med = statistics.median
    for i, r in enumerate(rows):
        if "rel_residual" not in r:
            continue
        block = [b for b in rows[i:i + args.every] if b["solver"] == r["solver"]]
        mean = lambda k: sum(b[k] for b in block) / len(block)  # noqa: E731
        lines.append(f"| {r['solver']} | {r['step']} | {med(r['rel_residual']):.2f} | "
                     f"{med(r['support_loss']):.3f} | {med(r['top_eigenvalue']):.0f} | "
                     f"{mean('query_loss'):.2f} | {mean('accuracy'):.1%} | "
                     f"{mean('negative_curvature'):.0%} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--preset", default="omniglot-20w1s",
                    choices=[p for p in PRESETS if p.startswith("omniglot")])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--power-iters", type=int, default=12)
    ap.add_argument("--cg-damping", type=float, default=None, help="override the preset's")
    ap.add_argument("--inner-solver", nargs="+", default=["gd", "gd_armijo"], choices=INNER_SOLVERS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the raw results here (and a .md beside it)")
    args = ap.parse_args(argv)
    settings = {}
    rows = [r for solver in args.inner_solver for r in run(args, solver, settings)]
    meta = run_meta("benchmarks/inner_convergence.py", vars(args), args.device)
    md = markdown(meta, settings, rows, args)
    print(md)
    if args.json:
        write_results(args.json, {"meta": meta, "settings": settings, "rows": rows}, md)
    return rows


if __name__ == "__main__":
    main()

"""How far float32 meta-gradients are from float64, and why: the inner loop's step size.

For the authors' Omniglot network (random data, 5-way 1-shot, T tasks, 16 inner steps,
lam = 2, 5 CG steps) this computes the meta-gradient and the adapted parameters in float64
and in float32 with imaml_fast's default (hand-batched layers, imaml_fast.stacked), the same
with the model under vmap, and its sequential reference, for each inner
learning rate given, and prints each float32 result's relative difference from float64.
Where the inner gradient descent is close to unstable it amplifies rounding from step to
step, and every implementation, the reference too, ends equally far from float64: the
speed benchmarks' inner lr 0.1 is such a setting (the presets train with 0.03; see
imaml_fast/presets.py). On a CUDA device each float32 row runs with the engine's TF32
(IMAMLConfig.tf32) on and off: the H200 rows of 2026-11-27, on against off, are why it is off
by default.

    python benchmarks/precision.py [--device cuda] [--tasks 8] [--inner-lr 0.1 0.03]
        [--json out.json]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from imaml_fast import IMAMLConfig, meta_gradient
from imaml_fast.models import omniglot_conv
from bench_meta_step import episode  # benchmarks/bench_meta_step.py
from peers.common import meta_line, run_meta, write_results


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def measure(args):
    torch.manual_seed(0)
    model = omniglot_conv(5).to(args.device)
    ep = episode(args.tasks, 5, 1, 1, args.device)
    model64 = omniglot_conv(5).to(args.device)
    model64.load_state_dict(model.state_dict())
    model64.double()
    ep64 = [e.double() if e.is_floating_point() else e for e in ep]
    cuda = torch.device(args.device).type == "cuda"
    tf32_modes = (True, False) if cuda else (None,)
    rows = []
    for lr in args.inner_lr:
        cfg = IMAMLConfig(inner_steps=args.inner_steps, cg_steps=5, lam=2.0, inner_lr=lr)
        exact = meta_gradient(model64, F.cross_entropy, *ep64, cfg)
        for tf32 in tf32_modes:
            for name, c in (("imaml_fast default", cfg),
                            ("imaml_fast default, layers under vmap",
                             cfg.replace(layer_batching="vmap")),
                            ("imaml_fast reference", cfg.replace(backend="reference"))):
                # IMAMLConfig.tf32 decides inside the engine, whatever torch's global flags say
                c = c.replace(tf32=bool(tf32))
                r = meta_gradient(model, F.cross_entropy, *ep, c)
                rows.append({"inner_lr": lr, "tf32": tf32, "impl": name,
                             "meta_grad_vs_float64": rel(r.grads_flat, exact.grads_flat),
                             "adapted_vs_float64": rel(r.adapted_flat, exact.adapted_flat),
                             "backend": r.backend, "task_batching": str(r.task_batching)})
    return rows


def markdown(meta, rows):
    s = meta["settings"]
    head = (f"{meta_line(meta)}: float32 against float64, "
            f"authors' Omniglot network, random data, 5-way 1-shot, T = {s['tasks']}, "
            f"{s['inner_steps']} inner steps, lam = 2, 5 CG steps\n\n")
    tf = meta.get("gpu") is not None
    lines = ["| inner lr | " + ("TF32 convolutions | " if tf else "") + "implementation | "
             "adapted parameters, rel. diff | meta-gradient, rel. diff | ran as |",
             "| ---: | " + ("--- | " if tf else "") + "--- | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['inner_lr']:g} | " + (f"{'on' if r['tf32'] else 'off'} | " if tf else "")
                     + f"{r['impl']} | {r['adapted_vs_float64']:.1e} | "
                     f"{r['meta_grad_vs_float64']:.1e} | {r['backend']}, "
                     f"task_batching={r['task_batching']} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--inner-lr", type=float, nargs="+", default=[0.1, 0.03])
    ap.add_argument("--json", help="write the raw results here (and a .md beside it)")
    args = ap.parse_args(argv)
    rows = measure(args)
    meta = run_meta("benchmarks/precision.py", vars(args), args.device)
    md = markdown(meta, rows)
    print(md)
    if args.json:  # the .md beside it
        write_results(args.json, {"meta": meta, "rows": rows}, md)
    return rows


if __name__ == "__main__":
    main()

"""Omniglot on a budget (5-way 1-shot unless --preset says otherwise): train, evaluate on 600
meta-test tasks, record.

    python benchmarks/train_omniglot_quick.py --data-root ../shared/data/omniglot \
        [--preset omniglot-5w1s] [--steps 1000] [--tasks 16] [--inner-solver gd_armijo] \
        [--out benchmarks/results/cpu-epyc-2core/omniglot_quick]
    python benchmarks/train_omniglot_quick.py --data-root DATA --device cuda --tasks 32 \
        --steps 30000 --minutes 6 --out benchmarks/results/<gpu>/omniglot_train

--minutes stops training (with a checkpoint) at the first step past that many minutes, so a
GPU run of bounded length gets as far through the paper's 30,000 steps as it can; the
record says how many steps ran.

Runs `imaml-fast train PRESET` with the given budget (the preset's other settings: for
5-way 16 inner steps, for 20-way 25, gd_armijo at inner lr 0.03, lam = 0.5, 5 CG steps, Adam
1e-3; imaml_fast/presets.py), then `imaml-fast eval`
on 600 meta-test tasks, and writes quick.json / quick.md with accuracy ± 95% CI, wall time, the settings and
the learning curve's trend (mean train accuracy per tenth of the run) into --out.
The paper reports, after full training, 99.16 ± 0.35 (iMAML-GD) and 99.50 ± 0.26 (iMAML-HF)
for 5-way 1-shot and 94.46 ± 0.42 (GD) and 96.18 ± 0.36 (HF) for 20-way 1-shot.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from imaml_fast.checkpoint import write_json_atomic
from imaml_fast.config import INNER_SOLVERS
from imaml_fast.presets import PRESETS
from imaml_fast.train import RunSettings, evaluate, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--preset", default="omniglot-5w1s",
                    choices=[p for p in PRESETS if p.startswith("omniglot")])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--out", default="benchmarks/results/cpu-epyc-2core/omniglot_quick")
    ap.add_argument("--run-dir", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--inner-solver", default=None, choices=INNER_SOLVERS,
                    help="override the preset's inner solver")
    ap.add_argument("--minutes", type=float, default=None,
                    help="time limit of the training part (default: none)")
    ap.add_argument("--tf32", action="store_true",
                    help="GPU: TF32 convolutions in the engine (IMAMLConfig.tf32; default off)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run_dir or tempfile.mkdtemp(prefix="imaml_fast_quick_"))
    s = RunSettings.from_preset(args.preset, steps=args.steps, tasks=args.tasks,
                                data_root=args.data_root, out=str(run), progress=False,
                                checkpoint_every=max(1, min(args.steps // 4, 1000)),
                                device=args.device, inner_solver=args.inner_solver,
                                tf32=True if args.tf32 else None)
    t0 = time.perf_counter()
    summary = train(s, max_seconds=None if args.minutes is None else 60 * args.minutes)
    train_s = time.perf_counter() - t0
    r = evaluate(run / "checkpoint.pt", tasks=args.eval_tasks, device=args.device)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    tenth = max(1, len(rows) // 10)
    trend = [round(sum(x["accuracy"] for x in rows[i:i + tenth]) / len(rows[i:i + tenth]) * 100, 1)
             for i in range(0, len(rows), tenth)]
    result = {"accuracy": r["mean"], "ci95": r["ci95"], "eval_tasks": r["tasks"],
              "steps_run": summary["steps"], "steps_planned": args.steps,
              "stopped": summary.get("stopped"), "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "train_seconds": train_s, "eval_seconds": r["seconds"],
              "seconds_per_step": train_s / max(1, summary["steps"]),
              "train_accuracy_by_tenth": trend, "settings": r["settings"],
              "preset": args.preset, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    write_json_atomic(result, out / "quick.json")
    for name in ("metrics.jsonl", "curve.png"):
        if (run / name).exists():
            shutil.copyfile(run / name, out / name)
    where = result["gpu"] or f"{result['cpu']} ({result['threads']} threads)"
    ran = (f"{summary['steps']} of {args.steps} meta-steps (stopped at the {args.minutes:g}-minute "
           f"limit)" if summary.get("stopped") else f"{summary['steps']} meta-steps")
    solver = f" (inner solver {s.inner_solver})" if args.inner_solver else ""
    solver += ", TF32" if args.tf32 else ""
    md = (f"{args.preset}{solver}, {ran} of {args.tasks} tasks on {where}, torch {result['torch']}, "
          f"{result['date']}\n\n"
          f"| meta-test accuracy ({r['tasks']} tasks) | train time | s / step | train accuracy by tenth of the run |\n"
          f"| ---: | ---: | ---: | --- |\n"
          f"| {r['mean']:.2f} ± {r['ci95']:.2f} % | {train_s / 60:.1f} min | "
          f"{result['seconds_per_step']:.2f} | {' → '.join(map(str, trend))} |\n")
    (out / "quick.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""Meta-test accuracy against meta-steps for one or more training runs, beside the paper's
figure for each run's preset: a PNG and a markdown table from the runs' evaluation files.

    python benchmarks/plot_evals.py "5-way 1-shot preset=runs/o5w1s" \
        "20-way 1-shot preset=runs/o20w1s/eval_step*.json" --out results/cpu-epyc-2core/x/evals

Each argument is NAME=PATH. PATH is a run folder (its evals.jsonl from `imaml-fast train
--eval-every`, and any eval*.json in it), one JSON file of `imaml-fast eval` or an
evals .jsonl file, or a glob of them. An evaluation of the same step found twice counts once
(the last file read wins). Writes OUT.md (a row per evaluation: steps, accuracy ± 95% CI, tasks, the paper's figure) and
OUT.png (with matplotlib).
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

# iMAML-GD after its full schedule (Rajeswaran et al. 2019, Omniglot table): mean, 95% CI
PAPER = {"omniglot-5w1s": (99.16, 0.35), "omniglot-20w1s": (94.46, 0.42)}


def read_evals(path: str) -> list:
    """The evaluations under `path` (see the module docstring), sorted by step."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("eval*.json"))
        rows = [json.loads(l) for l in (p / "evals.jsonl").read_text().splitlines()
                if l.strip()] if (p / "evals.jsonl").exists() else []
        preset = None
        if (p / "settings.json").exists():
            preset = json.loads((p / "settings.json").read_text()).get("preset")
        rows = [{**r, "preset": r.get("preset", preset)} for r in rows]
    else:
        files = [Path(f) for f in sorted(glob.glob(path))]
        rows = []
    for f in files:
        if f.suffix == ".jsonl":  # an evals.jsonl kept under another name
            rows += [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        else:
            rows.append(json.loads(f.read_text()))
    if not rows:
        raise SystemExit(f"no evaluations under {path!r}: give a run folder, an eval JSON or a glob")
    by_step = {r["step"]: r for r in rows}
    return [by_step[k] for k in sorted(by_step)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("series", nargs="+", metavar="NAME=PATH")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args(argv)
    series = []
    for item in args.series:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{item!r}: expected NAME=PATH")
        series.append((name, read_evals(path)))

    lines = ["| run | meta-steps | meta-test accuracy | tasks | the paper (iMAML-GD, full schedule) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, rows in series:
        for r in rows:
            paper = PAPER.get(r.get("preset"))
            lines.append(f"| {name} | {r['step']:,} | {r['mean']:.2f} ± {r['ci95']:.2f}{r.get('unit', '')} "
                         f"| {r['tasks']} | " + (f"{paper[0]:.2f} ± {paper[1]:.2f}%" if paper else "-")
                         + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for the plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, rows) in enumerate(series):
        color = f"C{i}"
        ax.errorbar([r["step"] for r in rows], [r["mean"] for r in rows],
                    yerr=[r["ci95"] for r in rows], fmt="o-", capsize=3, color=color, label=name)
        paper = PAPER.get(rows[-1].get("preset"))
        if paper:
            ax.axhline(paper[0], ls="--", color=color, alpha=0.6,
                       label=f"the paper, {rows[-1]['preset']} ({paper[0]:.2f}%)")
    ax.set_xlabel("meta-step")
    tasks = sorted({r["tasks"] for _, rows in series for r in rows})
    ax.set_ylabel(f"meta-test accuracy (%), {'/'.join(map(str, tasks))} tasks, 95% CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""Figure 2: peak memory of one meta-step against the number of inner steps K.

iMAML back-propagates through nothing of the inner loop, so its memory should not depend on
K; unrolled second-order MAML (through `higher`) keeps the graph of every inner step, so its
memory grows linearly with K. On the CPU each point is a FRESH SUBPROCESS: it imports torch
and one implementation, builds the model and the meta-batch, records its resident set size
(VmRSS), resets its peak-RSS mark to that (/proc/self/clear_refs), runs ONE meta-step and
reads the peak (VmHWM). Reported: the peak, and its increase over the RSS after set-up
("delta"), which is what the meta-step itself needed. On a GPU (--device cuda) each point is
also a fresh subprocess, and the figure is the device memory that PyTorch's allocator handed
out: torch.cuda.memory_allocated() after set-up, the peak torch.cuda.max_memory_allocated()
of the step (the peak mark reset after set-up), and their difference.

Why not getrusage(RUSAGE_SELF).ru_maxrss alone: Linux keeps the high-water mark across
fork + exec, so a child's ru_maxrss is never below its parent's RSS at the fork (a child of
`compare.py all`, whose parent holds ~1.2 GB after the speed figure, reported 1166 MiB for
every point). ru_maxrss is still recorded in the JSON beside VmHWM.

Settings: the authors' Omniglot network, 5-way 1-shot (1 query example per class), T = 8
tasks, lam = 2, inner lr 0.1, 5 CG steps, K in {5, 10, 20, 40, 80}, random data, float32.

    python benchmarks/memory_vs_steps.py [--steps 5 10 20 40 80] [--tasks 8] [--threads 1]
                                         [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

IMPLS = ["imaml_fast default", "imaml_fast reference", "TorchOpt normal_cg", "betty cg",
         "higher unrolled MAML"]
STEPS = [5, 10, 20, 40, 80]


def proc_status_kb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident of this address space), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(impl_name: str, K: int, T: int, n_way: int, threads: int, device: str = "cpu") -> dict:
    """One point, in this (fresh) process: set-up, then one meta-step."""
    import warnings

    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.INFO)
    from imaml_fast.models import omniglot_conv
    from peers import implementations
    from peers.common import Settings, omniglot_episode

    torch.manual_seed(0)
    model = omniglot_conv(n_way).to(device)
    ep = tuple(t.to(device) for t in omniglot_episode(T, n_way, seed=0))
    s = Settings(inner_steps=K, inner_lr=0.1, lam=2.0, cg_steps=5)
    impls, skipped = implementations(model, F.cross_entropy, s, names=[impl_name],
                                     log=lambda m: None)
    if impl_name not in impls:
        return {"impl": impl_name, "K": K, "skipped": "; ".join(skipped) or "unknown name"}
    if torch.device(device).type == "cuda":
        return _cuda_point(impls[impl_name], ep, impl_name, K, device)
    rss_setup = proc_status_kb("VmRSS")
    hwm_setup = proc_status_kb("VmHWM")
    maxrss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    was_reset = reset_peak()
    t0 = time.perf_counter()
    result = impls[impl_name](*ep)
    seconds = time.perf_counter() - t0
    peak = proc_status_kb("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"impl": impl_name, "K": K, "rss_after_setup_mb": rss_setup / 1024,
            "peak_after_setup_mb": hwm_setup / 1024, "peak_after_step_mb": peak / 1024,
            "delta_mb": (peak - rss_setup) / 1024, "peak_reset": was_reset,
            "ru_maxrss_after_setup_mb": maxrss_setup / 1024,
            "ru_maxrss_after_step_mb": maxrss / 1024, "step_s": seconds,
            "threads": torch.get_num_threads(), "info": result.info}


def _cuda_point(impl, ep, impl_name, K, device) -> dict:
    """One GPU point: the allocator's memory after set-up and its peak during one step."""
    import torch

    torch.cuda.synchronize(device)
    setup = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = impl(*ep)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device)
    mib = 1024 * 1024
    return {"impl": impl_name, "K": K, "allocated_after_setup_mb": setup / mib,
            "peak_after_step_mb": peak / mib, "delta_mb": (peak - setup) / mib,
            "memory": "torch.cuda.max_memory_allocated", "step_s": seconds,
            "info": result.info}


# --freed-returned: glibc maps every block of 128 KiB or more on its own and returns it when
# freed, so the peak RSS is close to the most the step holds at once (without it glibc keeps
# freed memory in its arenas, and how much depends on the order of allocations and frees)
FREED_RETURNED_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure(impl_name, K, T, n_way, threads=0, timeout=600, device="cpu", env=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl_name, str(K), str(T),
           str(n_way), str(threads or 0), str(device)]
    from peers.common import child_json

    r = child_json(cmd, timeout, env)
    return {"impl": impl_name, "K": K, **r} if "error" in r else r


def measure_median(name, K, args) -> dict:
    """measure() in args.repeats fresh processes: the run with the median delta_mb (the
    lower middle one for an even count; the first error or skip as is), every run's delta
    and peak kept in "samples"."""
    runs = []
    for _ in range(max(1, args.repeats)):
        r = measure(name, K, args.tasks, args.n_way, args.threads, device=args.device,
                    env=FREED_RETURNED_ENV if args.freed_returned else None)
        if "delta_mb" not in r:
            return r
        runs.append(r)
    mid = sorted(runs, key=lambda r: r["delta_mb"])[(len(runs) - 1) // 2]
    if len(runs) > 1:
        mid = {**mid, "samples": [{"delta_mb": r["delta_mb"],
                                   "peak_after_step_mb": r["peak_after_step_mb"]} for r in runs]}
    return mid


def markdown(payload):
    from peers.common import bullet_list, meta_line

    meta, rows = payload["meta"], payload["rows"]
    st = meta["settings"]
    steps = st["steps"]
    out = [f"### Peak memory against inner steps K\n\n{meta_line(meta)}; one meta-step in a "
           f"fresh subprocess per point; authors' Omniglot network, {st['n_way']}-way 1-shot, "
           f"T = {st['tasks']}, lam = 2, inner lr 0.1, 5 CG steps, float32. Each cell: "
           + ("peak of torch.cuda.max_memory_allocated during the step minus the memory "
              "allocated after set-up, MiB (the peak in parentheses)" if meta.get("gpu") else
              "peak RSS after the step minus RSS after imports and set-up, MiB (peak RSS in "
              "parentheses)")
           + (f"; the median of {st['repeats']} fresh processes per point (the run with the "
              f"median of the first figure, the lower middle one for an even count; every "
              f"run's figures in the JSON, ranges below)"
              if st.get("repeats", 1) > 1 else "")
           + ("; glibc returned every freed block of 128 KiB or more at once "
              "(MALLOC_MMAP_THRESHOLD_=131072), so the peak is close to what the step holds "
              "at once" if st.get("freed_returned") else "") + ".\n",
           "| implementation | " + " | ".join(f"K = {k}" for k in steps) +
           " | growth K=" + f"{steps[0]}->{steps[-1]} |",
           "| --- | " + " | ".join("---:" for _ in steps) + " | ---: |"]
    for name in st["impls"]:
        pts = {r["K"]: r for r in rows if r["impl"] == name}
        if any("skipped" in r for r in pts.values()):
            out.append(f"| {name} | " + " | ".join("skipped" for _ in steps) + " | - |")
            continue
        cells = []
        for k in steps:
            r = pts.get(k, {})
            cells.append(f"{r['delta_mb']:.0f} ({r['peak_after_step_mb']:.0f})"
                         if "delta_mb" in r else "error")
        a, b = pts.get(steps[0], {}), pts.get(steps[-1], {})
        growth = (f"{b['delta_mb'] - a['delta_mb']:+.0f} MiB"
                  if "delta_mb" in a and "delta_mb" in b else "-")
        out.append(f"| {name} | " + " | ".join(cells) + f" | {growth} |")
    d = {r["K"]: r for r in rows if r["impl"] == "imaml_fast default" and "delta_mb" in r}
    if steps[0] in d and steps[-1] in d:
        a, b = d[steps[0]]["peak_after_step_mb"], d[steps[-1]]["peak_after_step_mb"]
        change = (b - a) / a
        da, db = d[steps[0]]["delta_mb"], d[steps[-1]]["delta_mb"]
        what = "peak allocated" if meta.get("gpu") else "peak RSS"
        out.append(f"\nTarget: imaml_fast default's peak memory at K = {steps[-1]} within 10% of "
                   f"K = {steps[0]}: **{'met' if abs(change) <= 0.10 else 'missed'}** "
                   f"({100 * change:+.1f}% {what}, {b:.0f} vs {a:.0f} MiB; "
                   f"{100 * (db - da) / da:+.1f}% above set-up, {db:.0f} vs {da:.0f} MiB).")
    notes = []
    for name in st["impls"]:
        ran = [str((r.get("info") or {}).get("task_batching")) for r in rows
               if r["impl"] == name and "task_batching" in (r.get("info") or {})]
        if ran and name != "imaml_fast reference":
            notes.append(f"{name} ran task_batching = {', '.join(ran)} for K = "
                         f"{', '.join(map(str, steps))} (\"auto\" times the candidates in each "
                         f"fresh process and picks the fastest; the memory follows that choice, "
                         f"not K)")
        groups = [str((r.get("info") or {}).get("task_threads")) for r in rows
                  if r["impl"] == name and "task_threads" in (r.get("info") or {})]
        if groups and name != "imaml_fast reference":
            notes.append(f"{name} ran its tasks in {', '.join(groups)} group(s) on worker "
                         f"threads (task_threads) for K = {', '.join(map(str, steps))}")
    for name in st["impls"]:
        spans = [f"K = {r['K']}: {min(x['delta_mb'] for x in r['samples']):.0f}-"
                 f"{max(x['delta_mb'] for x in r['samples']):.0f}"
                 for r in rows if r["impl"] == name and "samples" in r]
        if spans:
            notes.append(f"{name}, the runs' range (MiB above set-up): " + "; ".join(spans))
    notes += sorted({r["skipped"] for r in rows if "skipped" in r})
    out.append(bullet_list(notes))
    return "\n".join(out) + "\n"


def plot(payload, path):
    from peers.common import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    st = payload["meta"]["settings"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, name in enumerate(st["impls"]):
        rows = sorted((r for r in payload["rows"] if r["impl"] == name and "delta_mb" in r),
                      key=lambda r: r["K"])
        if rows:
            ax.plot([r["K"] for r in rows], [r["delta_mb"] for r in rows], marker="o",
                    label=name, linestyle="--" if name.startswith("higher") else "-")
        if name != "imaml_fast reference":  # label auto's task-batching choice per point
            for r in rows:
                tb = (r.get("info") or {}).get("task_batching")
                if tb is not None:
                    ax.annotate(str(tb), (r["K"], r["delta_mb"]), textcoords="offset points",
                                xytext=(0, -12), ha="center", fontsize=7, color=f"C{i}")
    ax.set_xlabel("inner steps K")
    ax.set_ylabel("peak allocated - allocated after set-up (MiB)" if payload["meta"].get("gpu")
                  else "peak RSS - RSS after set-up (MiB)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(st["steps"], [str(k) for k in st["steps"]])
    ax.set_title(f"one meta-step, {st['n_way']}-way 1-shot, T = {st['tasks']}, 5 CG steps",
                 fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path, payload["meta"])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Figure 2: peak memory against inner steps")
    ap.add_argument("--child", nargs=6, metavar=("IMPL", "K", "T", "N_WAY", "THREADS", "DEVICE"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda[:i] (peak of "
                    "torch.cuda.max_memory_allocated)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in each subprocess (default: torch's choice)")
    ap.add_argument("--steps", type=int, nargs="+", default=STEPS)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--impls", nargs="+", default=IMPLS)
    ap.add_argument("--freed-returned", action="store_true",
                    help="CPU: run every point with MALLOC_MMAP_THRESHOLD_=131072, so that "
                         "glibc returns freed blocks at once and the peak RSS is close to what "
                         "the step holds (slower steps)")
    ap.add_argument("--name", default="memory_vs_steps",
                    help="base name of the .json, .md and .png written")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh processes per point; the table shows the one with the median "
                         "delta (every run's figures in the JSON)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--replot", action="store_true",
                    help="only rewrite the markdown and the plot from the saved JSON")
    args = ap.parse_args(argv)
    if args.child:
        name, K, T, n_way, threads, device = args.child
        print(json.dumps(child(name, int(K), int(T), int(n_way), int(threads), device)))
        return None

    import torch

    from peers.common import results_dir, run_meta, write_figure_files

    if args.threads:  # the subprocesses set it themselves; this makes the metadata say so
        torch.set_num_threads(args.threads)
    out_dir = args.out or results_dir(args.device)
    if args.replot:
        with open(os.path.join(out_dir, args.name + ".json")) as f:
            payload = json.load(f)
        write_figure_files(args.name, payload, markdown, plot, out_dir, raw=False)
        return payload
    t0 = time.perf_counter()
    rows = []
    for name in args.impls:
        for K in args.steps:
            r = measure_median(name, K, args)
            rows.append(r)
            if "skipped" in r:
                print(f"{name}: {r['skipped']}")
                break
            if "error" in r:
                print(f"{name} K={K}: FAILED\n{r['error']}")
                continue
            ran = r.get("info") or {}
            ran = "".join(f", {k}={ran[k]}" for k in ("task_batching", "task_threads")
                          if k in ran)
            print(f"{name:22s} K={K:3d}: peak {r['peak_after_step_mb']:7.1f} MiB, "
                  f"after set-up {r.get('rss_after_setup_mb', r.get('allocated_after_setup_mb')):7.1f} MiB, "
                  f"delta {r['delta_mb']:7.1f} MiB  ({r['step_s']:.1f} s{ran})", flush=True)
    meta = run_meta("benchmarks/memory_vs_steps.py", {
        "steps": args.steps, "tasks": args.tasks, "n_way": args.n_way, "shots": 1,
        "queries": 1, "cg_steps": 5, "lam": 2.0, "inner_lr": 0.1, "impls": args.impls,
        "threads": args.threads, "repeats": args.repeats,
        "freed_returned": bool(args.freed_returned),
        "method": ("fresh subprocess per point; torch.cuda.max_memory_allocated during one "
                   "meta-step (peak mark reset after set-up) minus torch.cuda.memory_allocated "
                   "after set-up" if torch.device(args.device).type == "cuda" else
                   "fresh subprocess per point; peak RSS (VmHWM, reset to the current RSS "
                   "after set-up through /proc/self/clear_refs) after one meta-step, minus "
                   "VmRSS after imports and set-up; ru_maxrss recorded too (see docstring)")},
        device=args.device)
    meta["wall_s"] = time.perf_counter() - t0
    payload = {"meta": meta, "rows": rows}
    write_figure_files(args.name, payload, markdown, plot, out_dir)
    return payload


if __name__ == "__main__":
    main()

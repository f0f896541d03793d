"""imaml_fast against the sequential reference path and its peers: seconds per meta-step.

Figure 1 (`speed`, the default): the paper's Omniglot settings on random data, the authors'
network (imaml_fast.models.omniglot_conv), T = 32 tasks, 1 support and 1 query example per
class, lam = 2, inner lr 0.1, 5 CG steps; 5-way with 16 inner steps and 20-way with 25.
Every implementation runs the same tasks from the same meta-parameters. Before timing, each
one's meta-gradient (from its warm-up call) is compared with imaml_fast's default and
reference; then all are timed in interleaved rounds (one call of each per round, so a slow
spell of this shared machine hits all alike) and the median is reported, with the ratio of
each implementation's time to imaml_fast's default measured in the same run. Every timed
process keeps glibc's allocator defaults, as the peers' users would; --malloc keep runs them
all with the setting `imaml-fast train` uses (benchmarks/timing.py).

The other figures have their own scripts, also reachable from here:
    python benchmarks/compare.py [speed] [--repeats 3] [--settings omniglot-5w1s omniglot-20w1s]
    python benchmarks/compare.py memory     # = benchmarks/memory_vs_steps.py
    python benchmarks/compare.py accuracy   # = benchmarks/grad_accuracy.py
    python benchmarks/compare.py all [speed options]   # all three, then the combined compare.md
    python benchmarks/compare.py table      # only rebuild compare.md from the figures' .md files
Results go to benchmarks/results/cpu-epyc-2core/ (JSON, markdown, PNG).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from floor import floor_passes, model_floor  # noqa: E402
from timing import MALLOC_CHOICES, sync, time_in_processes  # noqa: E402
from peers import DEFAULT, UNCAPTURED, implementations  # noqa: E402
from peers.common import (RESULTS_DIR, bullet_list, Settings, median, meta_line, omniglot_episode,  # noqa: E402
                          pyplot, rel_diff, results_dir, run_meta, save_figure, write_json,
                          write_text)

FLOOR = "floor (model passes)"

SETTINGS = {  # name: (n_way, inner_steps)
    "omniglot-5w1s": (5, 16),
    "omniglot-20w1s": (20, 25),
}
REFERENCE = "imaml_fast reference"
# What each implementation computes, beside "the paper's iMAML meta-gradient with 5 CG steps".
NOTES = {
    "TorchOpt normal_cg": "CG on the normal equations A^T A u = A^T v (its example's solver): "
                          "other iterates, so a different approximation at 5 steps",
    "betty cg": "betty 0.1.1's CG builds p from the previous residual: not CG after "
                "iteration 1, so a different approximation",
}


def _f(x, spec=".2e"):
    return "-" if x is None else format(x, spec)


def quiet_peers():
    # TorchOpt warns about functorch.vjp on every call; betty logs its problem set-up.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchopt")
    import logging

    logging.getLogger("betty").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


def call_each(impls, args, log=print, what="warm-up"):
    """{name: (result, seconds)} of one call of each implementation; one that raises (a peer
    that does not run on this device, say) is reported, dropped from `impls` and left out, so
    that the others are still compared."""
    out = {}
    for n, impl in list(impls.items()):
        t0 = time.perf_counter()
        try:
            r = impl(*args)
        except Exception as e:  # noqa: BLE001  (reported, and the comparison goes on)
            log(f"  {n} FAILED in its {what} and is left out: {type(e).__name__}: {e}")
            impls.pop(n)
            continue
        sync(args[0].device)
        out[n] = (r, time.perf_counter() - t0)
    return out


def check_float64(model, s, ep, tasks, log=print):
    """Every implementation's meta-gradient in float64 on the first `tasks` tasks, relative
    difference against imaml_fast's reference."""
    import copy

    m64 = copy.deepcopy(model).double()
    ep64 = tuple(t[:tasks].double() if t.is_floating_point() else t[:tasks] for t in ep)
    impls, _ = implementations(m64, F.cross_entropy, s, names=ONLY, log=lambda m: None)
    res = {n: r for n, (r, _) in call_each(impls, ep64, log, "float64 check").items()}
    ref = res.get(REFERENCE)
    out = {}
    log(f"  same quantity? float64, first {tasks} tasks, relative difference vs reference:")
    for n, r in res.items():
        out[n] = {"float64_vs_reference": rel_diff(r.grad, ref.grad) if ref else None,
                  "float64_adapted_vs_reference": (rel_diff(r.phi, ref.phi)
                                                   if ref is not None and r.phi is not None
                                                   else None),
                  "float64_tasks": tasks}
        log(f"    {n:24s} meta-gradient {_f(out[n]['float64_vs_reference'])}   adapted "
            f"parameters {_f(out[n]['float64_adapted_vs_reference'])}")
    return out


ONLY = None  # --only, for check_float64


def _apply_tf32():
    """--tf32 on/off, passed to the spawned timing processes through the environment."""
    mode = os.environ.get("IMAML_FAST_BENCH_TF32", "default")
    if mode != "default":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = mode == "on"


def _setting_inputs(n_way, T, device="cpu"):
    """The model and episode every process of a setting builds alike (same seeds)."""
    from imaml_fast.models import omniglot_conv

    _apply_tf32()
    torch.manual_seed(0)
    model = omniglot_conv(n_way).to(device)
    ep = omniglot_episode(T, n_way, shots=1, queries=1, seed=0)
    return model, tuple(t.to(device) for t in ep)


def _timed_impl(name, n_way, T, s, device="cpu"):
    """One implementation's meta-step as a zero-argument callable, built in its own process."""
    quiet_peers()
    model, ep = _setting_inputs(n_way, T, device)
    impls, _ = implementations(model, F.cross_entropy, s, names=[name], log=lambda m: None)
    impl = impls[name]
    return lambda: impl(*ep).info  # what ran (backend, task batching ...) in this process


def _timed_floor(n_way, T, s, device="cpu"):
    model, ep = _setting_inputs(n_way, T, device)
    return floor_passes(model, ep, s.inner_steps, s.cg_steps)


def run_setting(name, T, repeats, only=None, log=print, check_tasks=4, device="cpu",
                malloc="default"):
    n_way, steps = SETTINGS[name]
    s = Settings(inner_steps=steps, inner_lr=0.1, lam=2.0, cg_steps=5)
    model, ep = _setting_inputs(n_way, T, device)
    impls, skipped = implementations(model, F.cross_entropy, s, names=only, log=log)
    log(f"\n{name}: {n_way}-way 1-shot, T = {T}, {steps} inner steps, 5 CG steps, "
        f"lam = 2, inner lr 0.1; implementations: {', '.join(impls)}")

    # Same quantity? In float64 on the first `check_tasks` tasks, where rounding cannot hide
    # a difference, every meta-gradient against imaml_fast's reference.
    checks = check_float64(model, s, ep, check_tasks, log) if check_tasks else {}

    # Warm-up (float32, all T tasks); its meta-gradients are compared too, for information:
    # in float32 batched and per-task convolutions round differently, and 16 inner steps of
    # this network amplify that.
    results, warm = {}, {}
    for n, (r, took) in call_each(impls, ep, log).items():
        results[n], warm[n] = r, took
        log(f"  warm-up {n}: {took:.2f} s")
    ref = results.get(REFERENCE)
    log("  float32 meta-gradients of the warm-up, relative difference vs reference:")
    for n, r in results.items():
        c = checks.setdefault(n, {})
        c["float32_vs_reference"] = rel_diff(r.grad, ref.grad) if ref else None
        c["float32_adapted_vs_reference"] = (rel_diff(r.phi, ref.phi)
                                             if ref is not None and r.phi is not None else None)
        log(f"    {n:24s} meta-gradient {_f(c['float32_vs_reference'])}   adapted parameters "
            f"{_f(c['float32_adapted_vs_reference'])}")

    # Timing: every implementation, and the floor's model passes, in a process of its own,
    # in interleaved rounds (benchmarks/timing.py: a slow spell of this shared machine hits
    # them alike, and none inherits another's allocator or thread-pool state); then the FLOP
    # bound.
    factories = {n: (_timed_impl, (n, n_way, T, s, device)) for n in impls}
    factories[FLOOR] = (_timed_floor, (n_way, T, s, device))
    times, ran_as = time_in_processes(factories, repeats, threads=torch.get_num_threads(),
                                      device=device, log=log, malloc=malloc)
    for n in [n for n in impls if n not in times]:  # failed in its process: reported above
        impls.pop(n)
    t_def = median(times[DEFAULT]) if DEFAULT in times else None
    t_ref = median(times[REFERENCE]) if REFERENCE in times else None
    floor = model_floor(model, ep, steps, s.cg_steps, times=times.pop(FLOOR))
    log(f"  floor: model compute alone {floor['compute_s']:.3f} s, FLOP bound "
        f"{floor['flop_bound_s']:.3f} s ({floor['flops'] / 1e9:.1f} GFLOP at "
        f"{floor['matmul_gflops']:.0f} GFLOP/s)")
    rows = []
    for n in impls:
        med = median(times[n])
        rows.append({
            "setting": name, "impl": n, "median_s": med, "times_s": times[n],
            "warmup_s": warm[n], "tasks_per_s": T / med,
            "time_vs_default": med / t_def if t_def else None,
            "speedup_vs_reference": t_ref / med if t_ref else None,
            "time_vs_compute_floor": med / floor["compute_s"],
            "check": checks.get(n, {}),
            "info": ran_as.get(n) or results[n].info, "note": NOTES.get(n, ""),
        })
    for row in rows:
        log(f"  {row['impl']:24s} {row['median_s']:7.3f} s/step {row['tasks_per_s']:6.1f} tasks/s"
            f"  {_f(row['time_vs_default'], '5.2f')}x default's time")
    return {"setting": name, "n_way": n_way, "tasks": T, "settings": s.to_dict(),
            "rows": rows, "skipped": skipped, "floor": floor}


def speed_markdown(payload):
    meta = payload["meta"]
    tf32 = meta["settings"].get("tf32")
    engine = tf32.get("imaml_fast") if tf32 else None
    tf32 = (f"; TF32 for cuDNN convolutions {'on' if tf32['cudnn'] else 'off'}, for matmuls "
            f"{'on' if tf32['matmul'] else 'off'}"
            + (f" (imaml_fast's engine: {'on' if engine else 'off'}, IMAMLConfig.tf32)"
               if engine is not None else "")
            if tf32 and meta.get("gpu") else "")
    out = [f"### Seconds per meta-step\n\n{meta_line(meta)}{tf32}; median of "
           f"{meta['settings']['repeats']} interleaved rounds after a warm-up; random data, "
           f"authors' Omniglot network, T = {meta['settings']['tasks']}, 1 support + 1 query "
           f"example per class, lam = 2, inner lr 0.1, 5 CG steps; CPU allocator in every timed "
           f"process: {meta['settings'].get('malloc', 'default')} (benchmarks/timing.py).\n"]
    for res in payload["results"]:
        out.append(f"\n**{res['setting']}** ({res['n_way']}-way 1-shot, "
                   f"{res['settings']['inner_steps']} inner steps)\n")
        out.append("| implementation | s / meta-step | tasks / s | time / default's time | "
                   "speed-up over reference | time / compute floor | "
                   "meta-grad rel. diff vs reference, float64 | ran as |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in res["rows"]:
            info = ", ".join(f"{k}={v}" for k, v in (r["info"] or {}).items()
                             if k != "cg_iters_mean")
            out.append(f"| {r['impl']} | {r['median_s']:.3f} | {r['tasks_per_s']:.1f} | "
                       f"{_f(r['time_vs_default'], '.2f')} | {_f(r['speedup_vs_reference'], '.2f')}x | "
                       f"{_f(r.get('time_vs_compute_floor'), '.2f')}x | "
                       f"{_f(r['check'].get('float64_vs_reference'), '.1e')} | {info} |")
        fl = res.get("floor")
        if fl:
            ref = next((r["median_s"] for r in res["rows"] if r["impl"] == REFERENCE), None)
            out.append(
                f"\nFloor, same run: the model passes alone (shared weights, all tasks' images in "
                f"one batch, plain torch calls, the products' graph built with imaml_fast.layers as "
                f"the engine builds it; timed in the same rounds, in a process of its own) take "
                f"{fl['compute_s']:.3f} s "
                f"({fl['compute_gflops']:.0f} GFLOP/s); their {fl['flops'] / 1e9:.1f} GFLOP of "
                f"convolutions and matmuls at this machine's {fl['matmul_gflops']:.0f} GFLOP/s "
                f"matrix-multiply rate take {fl['flop_bound_s']:.3f} s"
                + (f". Against the reference, the compute floor allows at most "
                   f"{ref / fl['compute_s']:.2f}x and the FLOP bound {ref / fl['flop_bound_s']:.2f}x."
                   if ref else ".")
                + (" The default ran faster than those shared-weight passes: here they are no "
                   "lower bound (one batch of every task's images is not the fastest way for "
                   "torch's kernels to do this arithmetic)."
                   if any(r["impl"] == DEFAULT and r["median_s"] < fl["compute_s"]
                          for r in res["rows"]) else ""))
        out.append(speed_target(res, meta.get("device", "cpu")))
        out.append(bullet_list([f"{r['impl']}: {r['note']}" for r in res["rows"] if r["note"]]
                               + res["skipped"]))
    return "\n".join(out) + "\n"


# The roadmap's targets for the default, each against these implementations in the same run:
# on the 2-core CPU 3x the reference and TorchOpt's solve_cg (issue "benchmarks"); on one GPU
# 30x the sequential reference on the same GPU (issue "kernels"; the roadmap names an H100).
TARGETS = {"cpu": (3.0, (REFERENCE, "TorchOpt cg")), "cuda": (30.0, (REFERENCE,))}


def speed_target(res, device="cpu") -> str:
    """The roadmap's speed target for this setting, met or missed, with the measured ratios."""
    speedup, against = TARGETS[torch.device(device).type]
    times = {r["impl"]: r["median_s"] for r in res["rows"]}
    lines = []
    for name, who in ((DEFAULT, "the default"), (UNCAPTURED, "the default uncaptured")):
        got = {n: times[n] / times[name] for n in against if n in times and name in times}
        if not got:
            continue
        met = all(v >= speedup for v in got.values())
        ratios = ", ".join(f"{v:.2f}x vs {n}" for n, v in got.items())
        lines.append(f"\nTarget: {who} at least {speedup:.0f}x faster than "
                     f"{' and '.join(got)}: **{'met' if met else 'missed'}** ({ratios}).")
    return "\n".join(lines)


def speed_plot(payload, path):
    plt = pyplot()
    if plt is None:
        return None
    results = payload["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        names = [r["impl"] for r in res["rows"]]
        vals = [r["median_s"] for r in res["rows"]]
        bars = ax.barh(names, vals, color=["C0" if n.startswith("imaml_fast") else "C1"
                                           for n in names])
        for b, r in zip(bars, res["rows"]):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                    f" {r['median_s']:.2f} s ({_f(r['time_vs_default'], '.1f')}x)", va="center",
                    fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per meta-step (median)")
        ax.set_title(f"{res['setting']}, T = {res['tasks']}, "
                     f"{res['settings']['inner_steps']} inner steps")
        ax.set_xlim(0, max(vals) * 1.45)
    return save_figure(fig, path, payload["meta"], fontsize=8)


def speed_main(argv=None):
    ap = argparse.ArgumentParser(description="Figure 1: seconds per meta-step, imaml_fast vs peers")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", help="run only these implementations (by name)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--check-tasks", type=int, default=4,
                    help="tasks of the float64 same-quantity check (0: skip it)")
    ap.add_argument("--name", default="compare_speed", help="basename of the output files")
    ap.add_argument("--out", default=None,
                    help=f"where the files go (default {RESULTS_DIR} on the CPU; on a GPU "
                         "benchmarks/results/<GPU name>/)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where every "
                    "implementation runs (on a GPU the timings synchronise the device)")
    ap.add_argument("--tf32", choices=("default", "on", "off"), default="default",
                    help="on a GPU: TF32 for convolutions and matmuls, torch's global flags "
                         "and imaml_fast's IMAMLConfig.tf32 (default: torch's own defaults, "
                         "cuDNN convolutions in TF32, and imaml_fast's, TF32 off)")
    ap.add_argument("--malloc", default="default", choices=MALLOC_CHOICES,
                    help="every timed process's CPU allocator: glibc's default, or keep "
                         "(keep_freed_cpu_memory(), as imaml-fast train runs; benchmarks/timing.py)")
    args = ap.parse_args(argv)
    args.out = args.out or results_dir(args.device)
    os.environ["IMAML_FAST_BENCH_TF32"] = args.tf32
    _apply_tf32()
    global ONLY
    ONLY = args.only
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_peers()
    t0 = time.perf_counter()
    results = [run_setting(name, args.tasks, args.repeats, args.only, check_tasks=args.check_tasks,
                           device=args.device, malloc=args.malloc)
               for name in args.settings]
    meta = run_meta("benchmarks/compare.py speed", {
        "tasks": args.tasks, "repeats": args.repeats, "settings": args.settings,
        "check_tasks": args.check_tasks, "threads_requested": args.threads,
        "malloc": args.malloc, "name": args.name,
        "tf32": {"requested": args.tf32, "cudnn": torch.backends.cudnn.allow_tf32,
                 "matmul": torch.backends.cuda.matmul.allow_tf32,
                 "imaml_fast": args.tf32 == "on"},
        "per_setting": {n: {"n_way": SETTINGS[n][0], "inner_steps": SETTINGS[n][1],
                            "shots": 1, "queries": 1, "cg_steps": 5, "lam": 2.0,
                            "inner_lr": 0.1} for n in args.settings},
        "timing": "time.perf_counter around one meta-gradient call; each implementation "
                  "in its own process, warm-up call first; interleaved rounds; median"},
        device=args.device)
    meta["wall_s"] = time.perf_counter() - t0
    payload = {"meta": meta, "results": results}
    print("\nwrote", write_json(f"{args.name}.json", payload, args.out))
    print("wrote", write_text(f"{args.name}.md", speed_markdown(payload), args.out))
    png = speed_plot(payload, os.path.join(args.out, f"{args.name}.png"))
    if png:
        print("wrote", png)
    return payload


def combined_markdown(out_dir=RESULTS_DIR):
    parts = ["## imaml_fast vs reference vs peers (generated by benchmarks/compare.py)\n"]
    for name in ("compare_speed.md", "compare_speed_2threads.md", "memory_vs_steps.md",
                 "grad_accuracy.md"):
        path = os.path.join(out_dir, name)
        if name == "compare_speed_2threads.md" and not os.path.exists(path):
            continue
        if os.path.exists(path):
            with open(path) as f:
                parts.append(f.read())
        else:
            parts.append(f"({name} not generated yet)\n")
    return write_text("compare.md", "\n".join(parts), out_dir)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and not argv[0].startswith("-") else "speed"
    if cmd == "speed":
        speed_main(argv)
    elif cmd == "memory":
        import memory_vs_steps

        memory_vs_steps.main(argv)
    elif cmd == "accuracy":
        import grad_accuracy

        grad_accuracy.main(argv)
    elif cmd == "all":
        import grad_accuracy
        import memory_vs_steps

        threads = []  # --threads N applies to all three figures
        if "--threads" in argv:
            i = argv.index("--threads")
            threads = argv[i:i + 2]
        for name, fn, args in (("speed", speed_main, argv),
                               ("memory", memory_vs_steps.main, threads),
                               ("accuracy", grad_accuracy.main, threads)):
            t0 = time.perf_counter()
            fn(args)
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]")
    elif cmd != "table":
        sys.exit(f"unknown command {cmd!r}: expected speed, memory, accuracy, all or table")
    if cmd in ("all", "table"):
        print("wrote", combined_markdown())


if __name__ == "__main__":
    main()

"""Seconds per iMAML meta-step: the batched default against the sequential reference path.

The paper's Omniglot setting on random data: the authors' network (4 x [3x3 conv, stride 2,
BatchNorm with batch statistics, ReLU], linear head; 28x28 inputs), 5-way 1-shot with 1 query
example per class, T = 32 tasks, 16 inner steps, lam = 2, 5 CG steps, inner lr 0.1. Prints the
median of several repeats after a warm-up (the variants interleaved: one call of each per
round), tasks per second, and the ratio measured in this one run; --json writes the raw
numbers.

    python benchmarks/bench_meta_step.py [--tasks 32] [--repeats 5] [--device cpu] [--json out.json]
                                         [--malloc default|keep] [--malloc-ab]
Every variant runs with glibc's allocator defaults unless --malloc keep (the setting
`imaml-fast train` uses, benchmarks/timing.py); --malloc-ab adds the reference and the default
under the other setting as rows of their own, timed in the same rounds.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import imaml_fast
from imaml_fast import FunctionalModel, IMAMLConfig, meta_gradient
from imaml_fast.models import omniglot_conv
from timing import MALLOC_CHOICES, sync, time_in_processes  # benchmarks/timing.py


def episode(T, n_way, shots, queries, device):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(T, n_way * shots, 1, 28, 28, generator=g).to(device)
    xq = torch.randn(T, n_way * queries, 1, 28, 28, generator=g).to(device)
    ys = torch.arange(n_way).repeat_interleave(shots).expand(T, -1).contiguous().to(device)
    yq = torch.arange(n_way).repeat_interleave(queries).expand(T, -1).contiguous().to(device)
    return xs, ys, xq, yq


def support_problem(T, device):
    """The HVP benchmarks' setting: the authors' Omniglot network (5-way), the support sets of
    T random 5-way 1-shot tasks, and per-task parameters phi [T, P] near theta, as after an
    inner loop. Returns (fm, x_support, y_support, phi)."""
    torch.manual_seed(0)
    fm = FunctionalModel(omniglot_conv(5).to(device), F.cross_entropy)
    xs, ys, _, _ = episode(T, 5, 1, 1, device)
    phi = fm.theta + 0.01 * torch.randn(T, fm.num_params, device=device)
    return fm, xs, ys, phi


def time_it(fn, repeats, device):
    fn()  # warm-up (and, for task_batching="auto", the one-off strategy measurement)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


ATEN_IGRAD = "ATen convolution input gradient"
ATEN_BN_RELU = "ATen BatchNorm + ReLU"


def _variant(settings: dict, name: str, cfg):
    """One row's meta-step as a zero-argument callable (built in its own process); each call
    returns what ran."""
    if name.endswith(ATEN_IGRAD):  # this process's cpp backend without its conv_input_grad
        from imaml_fast.backends import resolve_backend
        resolve_backend("cpp", torch.device("cpu"), torch.float32).ops().pop("conv_input_grad")
    if name.endswith(ATEN_BN_RELU):  # ... without its fused BatchNorm + ReLU
        from imaml_fast.backends import resolve_backend
        ops = resolve_backend("cpp", torch.device("cpu"), torch.float32).ops()
        ops.pop("bn_relu_forward")
        ops.pop("bn_relu_backward")
    torch.manual_seed(0)
    model = omniglot_conv(settings["n_way"]).to(settings["device"])
    ep = episode(settings["tasks"], settings["n_way"], settings["shots"], settings["queries"],
                 settings["device"])
    if name.endswith("CUDA graphs"):
        from imaml_fast.graphs import CapturedMetaGradient

        fm = FunctionalModel(model, F.cross_entropy)
        graphed = CapturedMetaGradient(fm, cfg)

        def step():  # the warm-up call captures; later calls replay
            return graphed(fm.theta, *ep)
    else:
        def step():
            return meta_gradient(model, F.cross_entropy, *ep, cfg)

    def run():
        r = step()
        return {"backend": r.backend, "hvp": r.hvp, "task_batching": str(r.task_batching),
                "task_threads": r.task_threads}
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--cg-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                    help="also time the default with this autocast dtype")
    ap.add_argument("--skip-reference", action="store_true",
                    help="leave out the sequential reference (ratios then use the first row)")
    ap.add_argument("--malloc", default="default", choices=MALLOC_CHOICES,
                    help="every variant's CPU allocator: glibc's default, or keep "
                         "(keep_freed_cpu_memory(), as imaml-fast train runs; benchmarks/timing.py)")
    ap.add_argument("--malloc-ab", action="store_true",
                    help="also time the reference and the default under the other --malloc "
                         "setting, in the same rounds")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = omniglot_conv(args.n_way).to(args.device)
    ep = episode(args.tasks, args.n_way, args.shots, args.queries, args.device)
    base = IMAMLConfig(inner_steps=args.inner_steps, cg_steps=args.cg_steps, lam=2.0, inner_lr=0.1)
    variants = [
        ("reference", base.replace(backend="reference")),
        ("default (auto)", base),
        # all tasks in one call on the calling thread's intra-op threads, against the
        # default's groups of tasks on worker threads (imaml_fast.threads) where measured faster
        ("default, one group of tasks", base.replace(task_threads=1)),
        ("default, autograd layers", base.replace(layer_derivatives="autograd")),
        ("torch, hvp=fwdrev", base.replace(backend="torch", hvp="fwdrev")),
        ("torch, vmap all tasks", base.replace(backend="torch", task_batching="vmap")),
        ("torch, loop over tasks", base.replace(backend="torch", task_batching="loop")),
        # the line-search inner solver (one more gradient evaluation and a few [T, P] passes)
        # against the fixed step, both with the task batching pinned: "auto" can pick
        # differently in each process, which would hide the solvers' own difference
        ("default, vmap all tasks", base.replace(task_batching="vmap")),
        ("default, gd_armijo, vmap all tasks", base.replace(inner_solver="gd_armijo",
                                                            task_batching="vmap")),
        # the hand-batched layers (the default for this network, imaml_fast.stacked) against
        # the model under torch.func.vmap, all tasks in one call
        ("default, vmap all tasks, layers under vmap", base.replace(task_batching="vmap",
                                                                    layer_batching="vmap")),
    ]
    # every other batched backend that runs here (cpp on a CPU; cuda and triton on a GPU)
    for info in imaml_fast.backend_info(args.device):
        if info["available"] and info["name"] not in ("reference", "torch"):
            variants.append((info["name"], base.replace(backend=info["name"])))
            if info["name"] == "cpp":
                # its convolution input-gradient kernel against ATen's, all tasks in one call
                variants.append((f"default, vmap all tasks, {ATEN_IGRAD}",
                                 base.replace(backend="cpp", task_batching="vmap")))
                # and its BatchNorm + ReLU layer against ATen's two
                variants.append((f"default, vmap all tasks, {ATEN_BN_RELU}",
                                 base.replace(backend="cpp", task_batching="vmap")))
    if args.amp != "none":
        variants.append((f"default, amp={args.amp}", base.replace(amp=args.amp)))
    if torch.device(args.device).type == "cuda":
        # what IMAML runs on a CUDA model; with the presets' line-search solver, with TF32
        # convolutions (IMAMLConfig.tf32), and in bf16
        variants.append(("default, CUDA graphs", base))
        variants.append(("default, gd_armijo, CUDA graphs", base.replace(inner_solver="gd_armijo")))
        variants.append(("default, tf32", base.replace(tf32=True)))
        variants.append(("default, tf32, CUDA graphs", base.replace(tf32=True)))
        if args.amp != "none":
            variants.append((f"default, amp={args.amp}, CUDA graphs", base.replace(amp=args.amp)))
    if args.skip_reference:
        variants = variants[1:]
    # row name -> (the variant it runs, its CPU allocator setting)
    rows_of = {name: (name, cfg, args.malloc) for name, cfg in variants}
    if args.malloc_ab:
        other = next(m for m in MALLOC_CHOICES if m != args.malloc)
        for name in ("reference", "default (auto)"):
            if name in rows_of:
                rows_of[f"{name}, malloc {other}"] = (name, rows_of[name][1], other)
    malloc = {row: m for row, (_, _, m) in rows_of.items()}
    # Every variant in a process of its own, timed in interleaved rounds (benchmarks/timing.py:
    # variants sharing a process slowed each other down).
    factories = {row: (_variant, (vars(args), name, cfg)) for row, (name, cfg, _) in rows_of.items()}
    times, infos = time_in_processes(factories, args.repeats,
                                     threads=torch.get_num_threads(), device=args.device,
                                     log=lambda m: None, malloc=malloc)
    rows = []
    for name in times:
        med = statistics.median(times[name])
        r = infos[name]
        rows.append({"variant": name, "malloc": malloc[name], "median_s": med,
                     "times_s": times[name],
                     "tasks_per_s": args.tasks / med, **r})
        print(f"{name:34s} {med:8.3f} s/step  {args.tasks / med:7.1f} tasks/s  "
              f"(backend={r['backend']}, hvp={r['hvp']}, task_batching={r['task_batching']}, "
              f"task_threads={r.get('task_threads', 1)})", flush=True)
    ref = rows[0]["median_s"]  # the reference unless --skip-reference
    print()
    for row in rows:
        row["speedup_vs_first"] = ref / row["median_s"]
        print(f"{row['variant']:34s} {row['speedup_vs_first']:6.2f}x vs {rows[0]['variant']}")
    meta = {"device": str(args.device), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "imaml_fast": imaml_fast.__version__, "settings": vars(args),
            "date": time.strftime("%Y-%m-%d")}
    if torch.device(args.device).type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        with open(args.json.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(markdown_table(meta, rows))
    return rows


def markdown_table(meta, rows):
    s = meta["settings"]
    where = meta.get("gpu") or f"{meta['cpu']} CPU, {meta['threads']} threads"
    head = (f"{where}, torch {meta['torch']}, {meta['date']}: omniglot network, "
            f"{s['n_way']}-way {s['shots']}-shot, T = {s['tasks']}, {s['inner_steps']} inner steps, "
            f"{s['cg_steps']} CG steps, median of {s['repeats']} interleaved rounds after warm-up, "
            f"CPU allocator: {s.get('malloc', 'default')} unless the row says otherwise\n\n")
    lines = [f"| variant | s / meta-step | tasks / s | vs {rows[0]['variant']} | ran as |",
             "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_s']:.3f} | {r['tasks_per_s']:.1f} | "
                     f"{r['speedup_vs_first']:.2f}x | {r['backend']}, hvp={r['hvp']}, "
                     f"task_batching={r['task_batching']}, "
                     f"task_threads={r.get('task_threads', 1)} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

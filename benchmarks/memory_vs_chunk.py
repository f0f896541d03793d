"""Peak memory and time of a meta-step against IMAMLConfig.task_chunk.

The batched engine runs every task of a meta-batch at once: it keeps about ten [T, P]
buffers (adapted parameters, gradients, CG's vectors, the results) and every task's product
graph for the whole CG solve. task_chunk=c runs the meta-batch as consecutive chunks of at
most c tasks, each solved whole before the next, so a step needs one chunk's working memory
plus the [T, P] results. This script measures what that trades: for each chunk size, a FRESH
SUBPROCESS builds the authors' Omniglot network and one meta-batch (T = 32, 5-way 1-shot,
16 inner steps, 5 CG steps, lam 2, inner lr 0.1, float32, random data), runs IMAML's
meta-gradient `--repeats` times, and records the peak memory over those calls above what was
in use after set-up, and each call's seconds. The first call includes "auto"'s one-time
measurements (task batching, task threads); the times reported are the later calls'.

Memory on the CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs after set-up) minus
the RSS after set-up. glibc keeps freed heap memory in its arenas, so that peak also counts
memory the step freed and reused; each CPU point therefore runs a second time with
MALLOC_MMAP_THRESHOLD_=131072 (every block of 128 KiB or more mapped on its own and returned
when freed), whose peak is close to the most the step holds at once (that run is slower: its
times are not reported). On a GPU (--device cuda): torch.cuda.max_memory_allocated over the
calls minus torch.cuda.memory_allocated after set-up.

    python benchmarks/memory_vs_chunk.py [--chunks 0 16 8 4 2 1] [--tasks 32] [--threads 2]
                                         [--device cuda] [--out DIR]

(0: no chunks, every task at once, the default.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory_vs_steps import proc_status_kb, reset_peak  # noqa: E402

CHUNKS = [0, 16, 8, 4, 2, 1]
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def child(chunk: int, T: int, n_way: int, K: int, repeats: int, threads: int,
          device: str) -> dict:
    """One point, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    from imaml_fast import IMAML, IMAMLConfig
    from imaml_fast.models import omniglot_conv
    from peers.common import omniglot_episode

    torch.manual_seed(0)
    model = omniglot_conv(n_way).to(device)
    ep = tuple(t.to(device) for t in omniglot_episode(T, n_way, seed=0))
    cfg = IMAMLConfig(inner_solver="gd", inner_steps=K, inner_lr=0.1, lam=2.0, cg_steps=5,
                      task_chunk=chunk or None)
    learner = IMAML(model, F.cross_entropy, cfg)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        setup = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        setup = proc_status_kb("VmRSS") * 1024
        reset_peak()
    calls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = learner.meta_gradient(*ep)
        if cuda:
            torch.cuda.synchronize(device)
        calls.append(time.perf_counter() - t0)
        ran = {"task_chunks": r.task_chunks, "task_threads": r.task_threads,
               "task_batching": str(r.task_batching)}
        del r
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else proc_status_kb("VmHWM") * 1024)
    return {"chunk": chunk, "seconds": calls, "peak_above_setup_mb": (peak - setup) / 2**20,
            **ran, "threads": torch.get_num_threads()}


def measure(chunk, args, env=None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(chunk), str(args.tasks),
           str(args.n_way), str(args.inner_steps), str(args.repeats), str(args.threads or 0),
           args.device]
    from peers.common import child_json

    r = child_json(cmd, 1200, env)
    return {"chunk": chunk, **r} if "error" in r else r


def _seconds(r: dict) -> float:
    """Median seconds of the calls after the first (which includes "auto"'s measurements)."""
    from peers.common import median

    return median(r["seconds"][1:] or r["seconds"])


def _ok(r) -> bool:
    return bool(r) and "peak_above_setup_mb" in r


def markdown(payload) -> str:
    from peers.common import meta_line

    meta, rows = payload["meta"], payload["rows"]
    st = meta["settings"]
    gpu = meta.get("gpu")
    what = ("the peak of torch.cuda.max_memory_allocated minus the memory allocated after "
            "set-up" if gpu else "peak RSS minus the RSS after set-up")
    out = [f"### Peak memory and time against task_chunk\n\n{meta_line(meta)}; authors' "
           f"Omniglot network, {st['n_way']}-way 1-shot, T = {st['tasks']}, "
           f"{st['inner_steps']} inner steps, 5 CG steps, float32; a fresh process per chunk "
           f"size, {st['repeats']} calls of IMAML.meta_gradient each (the first with "
           f"\"auto\"'s one-time measurements). Memory: {what}, over all the calls, MiB"
           + ("" if gpu else "; \"freed returned\": the same in a second process in which "
              "glibc returns every freed block of 128 KiB or more at once "
              "(MALLOC_MMAP_THRESHOLD_=131072), close to the most the step holds at once "
              "(without it glibc keeps freed memory in its arenas, and the peak RSS counts it)")
           + ". Seconds: median of the calls after the first.\n"]
    head, rule = "| task_chunk | chunks | peak memory |", "| --- | ---: | ---: |"
    if not gpu:
        head += " peak, freed returned |"
        rule += " ---: |"
    out += [head + " s / step | time vs all at once |", rule + " ---: | ---: |"]
    base = next((r for r in rows if r["chunk"] == 0 and _ok(r)), None)
    for r in rows:
        name = "all at once (default)" if r["chunk"] == 0 else str(r["chunk"])
        if not _ok(r):
            out.append(f"| {name} | error | | |" + ("" if gpu else " |") + " |")
            continue
        cells = [name, str(r["task_chunks"]), f"{r['peak_above_setup_mb']:.0f}"]
        if not gpu:
            live = r.get("freed_returned")
            cells.append(f"{live['peak_above_setup_mb']:.0f}" if _ok(live) else "-")
        cells += [f"{_seconds(r):.3f}",
                  f"{_seconds(r) / _seconds(base):.2f}x" if base else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(payload, path):
    from peers.common import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    rows = [r for r in payload["rows"] if _ok(r)]
    T = payload["meta"]["settings"]["tasks"]
    x = [r["chunk"] or T for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(x, [r["peak_above_setup_mb"] for r in rows], marker="o", label="peak")
    live = [(xi, r["freed_returned"]["peak_above_setup_mb"]) for xi, r in zip(x, rows)
            if _ok(r.get("freed_returned"))]
    if live:
        a.plot(*zip(*live), marker="s", linestyle="--", label="freed blocks returned")
    a.set_xscale("log", base=2)
    a.set_xticks(x, [str(v) for v in x])
    a.set_xlabel("tasks in flight (task_chunk; T: all at once)")
    a.set_ylabel("peak memory above set-up (MiB)")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    b.plot(x, [_seconds(r) for r in rows], marker="o")
    b.set_xscale("log", base=2)
    b.set_xticks(x, [str(v) for v in x])
    b.set_xlabel("tasks in flight (task_chunk; T: all at once)")
    b.set_ylabel("seconds per meta-gradient")
    b.set_ylim(bottom=0)
    fig.suptitle(f"Omniglot 5-way 1-shot, T = {T}", fontsize=10)
    return save_figure(fig, path, payload["meta"])


def main(argv=None):
    ap = argparse.ArgumentParser(description="peak memory and time against task_chunk")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    ap.add_argument("--chunks", type=int, nargs="+", default=CHUNKS,
                    help="chunk sizes; 0: every task at once (the default)")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--replot", action="store_true",
                    help="only rewrite the markdown and the plot from the saved JSON")
    args = ap.parse_args(argv)
    if args.child:
        c, T, n_way, K, repeats, threads, device = args.child
        print(json.dumps(child(int(c), int(T), int(n_way), int(K), int(repeats), int(threads),
                               device)))
        return None

    import torch

    from peers.common import results_dir, run_meta, write_figure_files

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out or results_dir(args.device)
    if args.replot:
        with open(os.path.join(out_dir, "memory_vs_chunk.json")) as f:
            payload = json.load(f)
    else:
        cpu = torch.device(args.device).type == "cpu"
        t0 = time.perf_counter()
        rows = []
        for c in args.chunks:
            r = measure(c, args)
            if cpu and _ok(r):
                r["freed_returned"] = measure(c, args, env=LIVE_ENV)
            rows.append(r)
            if not _ok(r):
                print(f"task_chunk={c}: FAILED\n{r['error']}", flush=True)
                continue
            live = (f", freed returned {r['freed_returned']['peak_above_setup_mb']:.0f} MiB"
                    if _ok(r.get("freed_returned")) else "")
            print(f"task_chunk={c or 'all':>3}: {r['task_chunks']:2d} chunks, peak "
                  f"{r['peak_above_setup_mb']:6.0f} MiB{live}, {_seconds(r):.3f} s "
                  f"(task_threads {r['task_threads']}, task_batching {r['task_batching']})",
                  flush=True)
        meta = run_meta("benchmarks/memory_vs_chunk.py", {
            "chunks": args.chunks, "tasks": args.tasks, "n_way": args.n_way,
            "inner_steps": args.inner_steps, "repeats": args.repeats, "threads": args.threads,
            "method": "fresh subprocess per chunk size; " + (
                "torch.cuda.max_memory_allocated over the calls minus memory_allocated after "
                "set-up" if not cpu else
                "VmHWM over the calls (reset through /proc/self/clear_refs after set-up) minus "
                "VmRSS after set-up; each point again with MALLOC_MMAP_THRESHOLD_=131072")},
            device=args.device)
        meta["wall_s"] = time.perf_counter() - t0
        payload = {"meta": meta, "rows": rows}
    write_figure_files("memory_vs_chunk", payload, markdown, plot, out_dir, raw=not args.replot)
    return payload


if __name__ == "__main__":
    main()

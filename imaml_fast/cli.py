"""The `imaml-fast` command (also `python -m imaml_fast`).

    imaml-fast train [PRESET] [--steps N] [--lam 2] ... [--out DIR] [--eval-every N]
    imaml-fast train --out DIR --resume [--steps N]   (the run's own settings)
    imaml-fast eval CHECKPOINT [--tasks 600] [--data-root DIR] [--out FILE]
    imaml-fast download --data-root DIR
    imaml-fast backends

A user error (bad flag value, missing or corrupt data, a checkpoint from another
configuration) prints one line naming the problem and the fix, and exits with status 2,
without a traceback and without leaving half-written files.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import List, Optional

from .config import HVP_MODES, INNER_SOLVERS, LAYER_DERIVATIVES
from .presets import PRESETS


def _word_or_count(words, use: str, count: str):
    """An argparse type: one of `words`, or an int >= 1 (`use` lists what is allowed, `count`
    names the number in the error)."""
    def parse(value: str):
        if value in words:
            return value
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: use {use}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{value!r}: {count} must be >= 1")
        return n
    return parse


_task_batching = _word_or_count(("auto", "vmap", "loop"), "auto, vmap, loop or a chunk size",
                                "a chunk size")
_task_threads = _word_or_count(("auto",), "auto or a number of threads", "a number of threads")
_task_chunk = _word_or_count(("all",), "all or a number of tasks", "a chunk of tasks")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imaml-fast", description="Meta-train and evaluate iMAML.")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,download,backends}")

    t = sub.add_parser("train", help="meta-train (default preset: sinusoid, under a minute on a CPU)")
    t.add_argument("preset", nargs="?", choices=sorted(PRESETS),
                   help="settings to start from (default: sinusoid; with --resume, the run's)")
    # Flags left out are None: a new run takes the preset's value (or RunSettings' default),
    # a resumed one the value its checkpoint saved.
    g = t.add_argument_group("settings (override the preset)")
    g.add_argument("--steps", type=_positive_int, help="meta-steps in total")
    g.add_argument("--tasks", type=_positive_int, help="tasks per meta-batch")
    g.add_argument("--n-way", type=_positive_int)
    g.add_argument("--k-shot", type=_positive_int, help="support examples per class")
    g.add_argument("--q-query", type=_positive_int, help="query examples per class")
    g.add_argument("--inner-solver", choices=INNER_SOLVERS,
                   help="gd: the paper's fixed step; gd_armijo: each step kept only where it "
                        "lowers the task's loss (the Omniglot presets); agd: the same with "
                        "Nesterov momentum (closer to the minimiser in the same steps); hf: "
                        "Newton-CG")
    g.add_argument("--inner-steps", type=_positive_int)
    g.add_argument("--inner-lr", type=float)
    g.add_argument("--inner-tol", type=float,
                   help="gd_armijo: stop a task's inner loop once ||grad F(phi)|| <= this times "
                        "||grad F(theta)||; --inner-steps is then the most it takes (default: 0, "
                        "every task takes --inner-steps)")
    g.add_argument("--lam", type=float, help="proximal regularisation strength")
    g.add_argument("--cg-steps", type=_positive_int)
    g.add_argument("--cg-tol", type=float)
    g.add_argument("--cg-damping", type=float)
    g.add_argument("--cg-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="scale each task's CG solution down to ||grad L_query|| lam / cg_damping, "
                        "the longest it can be at a minimiser of the inner problem")
    g.add_argument("--hvp", choices=HVP_MODES)
    g.add_argument("--backend", help="auto, reference, torch, triton, cpp, cuda")
    g.add_argument("--task-batching", type=_task_batching, help="auto, vmap, loop or a chunk size")
    g.add_argument("--task-threads", type=_task_threads,
                   help="on the CPU, groups of tasks run concurrently, one per worker thread: "
                        "auto (default: two groups on two or more torch threads where one "
                        "batched gradient takes 5 ms or more, else one call) or a number")
    g.add_argument("--task-chunk", type=_task_chunk,
                   help="at most this many tasks in flight: the meta-batch runs as consecutive "
                        "chunks, each solved whole before the next (less memory, smaller "
                        "batched calls; default: all, every task at once)")
    g.add_argument("--layer-derivatives", choices=LAYER_DERIVATIVES,
                   help="closed_form (default: imaml_fast.layers' second derivatives of "
                        "convolution and BatchNorm) or autograd (ATen's own)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="on a GPU, run the model's float32 convolutions in TF32: about 2x "
                        "faster steps, meta-gradients far less exact (default: off; "
                        "--no-tf32 turns it off again on --resume)")
    g.add_argument("--outer-lr", type=float, help="Adam learning rate of the meta-parameters")
    t.add_argument("--seed", type=int, help="default: 0")
    t.add_argument("--device", help="default: cpu")
    t.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each meta-step as a captured CUDA graph (default: on for a "
                        "CUDA device, falling back to uncaptured if a capture fails; on an H100 "
                        "the Omniglot 5-way step ran 8x faster); --cuda-graphs insists, "
                        "--no-cuda-graphs turns it off")
    t.add_argument("--data-root", help="folder with the Omniglot zips (omniglot presets)")
    t.add_argument("--out", help="run folder (default: runs/<preset>-<date>-<time>)")
    t.add_argument("--checkpoint-every", type=_positive_int, help="default: 100 steps")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings it saved (flags given "
                        "override them: --steps, --device, --data-root, --nproc, ... may change)")
    t.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop, with a checkpoint, at the first step that ends after this many "
                        "minutes of training; --resume continues")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--eval-every", type=_positive_int, metavar="STEPS",
                   help="evaluate on meta-test tasks every STEPS meta-steps and at the last, "
                        "into evals.jsonl and curve.png (the tasks of imaml-fast eval; "
                        "default: 0, none)")
    t.add_argument("--eval-tasks", type=_positive_int,
                   help="meta-test tasks per evaluation (default: 600, as the paper's tables)")
    t.add_argument("--nproc", type=_positive_int,
                   help="processes that share each meta-batch (torch.distributed: gloo on CPU, "
                        "NCCL on GPUs; default: 1)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on meta-test tasks")
    e.add_argument("checkpoint")
    e.add_argument("--tasks", type=_positive_int, default=600)
    e.add_argument("--data-root")
    e.add_argument("--device")
    e.add_argument("--out", help="result JSON (default: eval.json beside the checkpoint)")

    d = sub.add_parser("download", help="fetch and verify the Omniglot zips")
    d.add_argument("--data-root", required=True)

    sub.add_parser("backends", help="list the backends and whether they run here")
    return p


def _train(args) -> int:
    from .train import RunSettings, train_multiprocess

    fields = {k: getattr(args, k) for k in (
        "steps", "tasks", "n_way", "k_shot", "q_query", "inner_solver", "inner_steps", "inner_lr",
        "inner_tol", "lam", "cg_steps", "cg_tol", "cg_damping", "cg_clip", "hvp", "backend",
        "task_batching", "task_threads", "task_chunk", "layer_derivatives", "tf32", "outer_lr")}
    fields.update(seed=args.seed, device=args.device, data_root=args.data_root,
                  checkpoint_every=args.checkpoint_every, nproc=args.nproc,
                  cuda_graphs=args.cuda_graphs, progress=not args.no_progress,
                  eval_every=args.eval_every, eval_tasks=args.eval_tasks)
    out = args.out
    if args.resume:
        if out is None:
            raise ValueError("--resume needs --out: the folder of the run to continue")
        s = RunSettings.resumed(out, preset=args.preset, **fields)
    else:
        preset = args.preset or "sinusoid"
        if out is None:
            out = f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        s = RunSettings.from_preset(preset, **fields, out=out)
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit {args.time_limit:g} is invalid: give minutes > 0")
    summary = train_multiprocess(s, resume=args.resume,
                                 max_seconds=None if args.time_limit is None else 60 * args.time_limit)
    last = summary["last"]
    metric = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("query_loss", "accuracy", "mse"))
    ev = summary.get("eval")
    if ev is not None:
        metric += (f"; meta-test {ev['metric']} {ev['mean']:.2f} ± {ev['ci95']:.2f}{ev['unit']} "
                   f"at step {ev['step']}")
    print(f"trained {summary['steps']} meta-steps in {summary['seconds']:.1f} s"
          + (f" ({metric})" if metric else " (nothing left to train)") + "; "
          f"run folder {out}" + ("" if summary["curve"] else " (pip install matplotlib for curve.png)")
          + (f"; stopped at the time limit before step {s.steps}: --resume continues"
             if summary.get("stopped") == "time limit" else ""))
    return 0


def _eval(args) -> int:
    from .train import evaluate

    r = evaluate(args.checkpoint, tasks=args.tasks, data_root=args.data_root, device=args.device,
                 out=args.out)
    print(f"{r['preset']} step {r['step']}: {r['metric']} {r['mean']:.2f} ± {r['ci95']:.2f}{r['unit']} "
          f"(95% CI) over {r['tasks']} {r['split']}")
    return 0


def _download(args) -> int:
    from .data import download_omniglot

    path = download_omniglot(args.data_root)
    print(f"Omniglot zips verified in {path}")
    return 0


def _backends(args) -> int:
    from . import backend_info

    for b in backend_info():
        state = "available" if b["available"] else "unavailable: " + "; ".join(b["reasons"])
        print(f"{b['name']:10s} {state}\n           {b['summary']}")
    return 0


def _command_warning(message, category, filename, lineno, line=None) -> str:
    return f"imaml-fast: warning: {message}\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train"] + list(argv if argv is not None else sys.argv[1:]))
    run = {"train": _train, "eval": _eval, "download": _download, "backends": _backends}[args.command]
    if args.command in ("train", "eval"):
        from .cpu_memory import keep_freed_cpu_memory

        keep_freed_cpu_memory()  # this process is ours: 4-10% faster CPU steps (see the module)
    # while the command runs, warnings read as its own lines, without the library's file and
    # source line (library users keep Python's format)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _command_warning
    try:
        return run(args)
    except (ValueError, OSError) as e:  # user errors: DataError, CheckpointError, bad values
        print(f"imaml-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged: the last checkpoint is intact
        print(f"imaml-fast {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imaml-fast: interrupted; the last checkpoint is intact (resume with --resume)",
              file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())

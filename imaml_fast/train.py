"""Meta-training and evaluation runs: what `imaml-fast train` and `imaml-fast eval` do.

A run folder holds settings.json, metrics.jsonl (one line per meta-step), checkpoint.pt
(model, outer optimizer, episode sampler and RNG states, written atomically every
`checkpoint_every` steps and at the end), evals.jsonl (with `eval_every`: the meta-test
accuracy or MSE every that many steps and at the last) and curve.png (when matplotlib is
installed).
A resumed run continues from checkpoint.pt and ends with parameters bit-identical to an
uninterrupted run: the episode stream, the optimizer state, the RNG state and the
task-batching strategy (which changes floating-point summation order) all come back.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import distributed as dist_mod
from .backends import resolve_backend
from .batching import choose_strategy, step_counts
from .cg import CG_NEGATIVE_CURVATURE
from .checkpoint import (FORMAT, CheckpointError, load_checkpoint, save_atomic,
                         write_json_atomic)
from .config import IMAMLConfig
from .functional import FunctionalModel
from .models import omniglot_conv, sinusoid_mlp
from .presets import PRESETS
from .trainer import IMAML

# Settings a resumed run may change; every other field must match the checkpoint.
RESUMABLE_CHANGES = ("steps", "device", "data_root", "out", "checkpoint_every", "progress",
                     "nproc", "cuda_graphs", "eval_every", "eval_tasks", "tf32",
                     "task_threads", "task_chunk")
_NO_CHECKPOINT = ("--resume but {path} does not exist: start the run without --resume, or "
                  "point --out at the run folder")
EVAL_SEED = 2019
# Warn once when, over this many consecutive meta-steps, more than half of the tasks' CG
# stopped on negative curvature (presets.py: a 20-way run that stalled so).
CURVATURE_WINDOW = 20
# ... and when, over as many meta-steps, the mean inner residual ||grad F(phi)|| / ||grad F(theta)||
# exceeds this: the inner loops end far from their minimisers, where the implicit gradient
# does not hold (20-way 1-shot with the fixed step, median over tasks: 0.4 at the start, 0.53
# at step 11 and above 1 from step 41 while training stalled; the line search kept it at
# 0.08-0.24; the sinusoid preset with the line search: 0.1-0.3; 5-way 1-shot checkpoints that
# trained well: 0.02-0.04, the inner-lr-0.1 one that stalled: 1.3)
INNER_RESIDUAL_WARN = 0.5
# A meta-batch whose meta-gradient is not finite is skipped (nothing changes); this many in a
# row end the run with the error.
MAX_CONSECUTIVE_SKIPS = 10  # meta-test episodes come from their own stream, the same for every run


@dataclass
class RunSettings:
    preset: str = "sinusoid"
    task: str = "sinusoid"
    n_way: int = 1
    k_shot: int = 10
    q_query: int = 10
    tasks: int = 10
    steps: int = 1000
    inner_solver: str = "gd"
    inner_steps: int = 10
    inner_lr: float = 0.02
    inner_tol: float = 0.0
    lam: float = 2.0
    cg_steps: int = 5
    cg_tol: float = 1e-10
    cg_damping: float = 10.0
    cg_clip: bool = False
    hvp: str = "auto"
    backend: str = "auto"
    task_batching: object = "auto"
    task_threads: object = "auto"   # as IMAMLConfig's: speed only, so a resume may change it
    # as IMAMLConfig's (None or "all": every task at once): memory only, so a resume may
    # change it
    task_chunk: object = None
    layer_derivatives: str = "closed_form"
    tf32: bool = False              # as IMAMLConfig's: rounding only, so a resume may change it
    outer_lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    cuda_graphs: object = "auto"    # "auto" | True | False, as IMAML's
    data_root: Optional[str] = None
    out: Optional[str] = None
    checkpoint_every: int = 100
    progress: bool = True
    nproc: int = 1
    # Meta-test evaluation during training: every eval_every steps and at the last one (0:
    # none), on eval_tasks tasks, the same tasks as `imaml-fast eval` with as many. It reads
    # no training randomness and changes nothing the run computes: only a report.
    eval_every: int = 0
    eval_tasks: int = 600

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "RunSettings":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(preset=preset, **fields)

    @staticmethod
    def saved_fields(saved: dict, path) -> dict:
        """A checkpoint's settings as RunSettings fields. A field the checkpoint lacks (from an
        earlier version) takes its default; one this version does not know (from a later
        version) is an error, since dropping it could change what the run computes."""
        names = {f.name for f in dataclasses.fields(RunSettings)}
        unknown = sorted(set(saved) - names)
        if unknown:
            raise CheckpointError(f"{path} has settings this version of imaml_fast does not know "
                                  f"({', '.join(unknown)}): it was written by a later version; "
                                  f"upgrade imaml_fast to resume or evaluate it")
        return dict(saved)

    @classmethod
    def resumed(cls, out, preset: Optional[str] = None, **overrides) -> "RunSettings":
        """The settings of the run in folder `out`, as its checkpoint saved them, with the
        `overrides` that are not None on top: `imaml-fast train --out DIR --resume --steps N`
        continues a run without repeating its preset and flags. A preset or override that
        changes more than RESUMABLE_CHANGES is refused by train(), naming the fields."""
        ckpt_path = Path(out) / "checkpoint.pt"
        if not ckpt_path.exists():
            raise CheckpointError(_NO_CHECKPOINT.format(path=ckpt_path))
        fields = cls.saved_fields(load_checkpoint(ckpt_path)["settings"], ckpt_path)
        if preset is not None:
            fields["preset"] = preset
        fields.update({k: v for k, v in overrides.items() if v is not None})
        fields["out"] = str(out)
        return cls(**fields)

    def imaml_config(self) -> IMAMLConfig:
        return IMAMLConfig(inner_solver=self.inner_solver, inner_steps=self.inner_steps,
                           inner_lr=self.inner_lr, inner_tol=self.inner_tol, lam=self.lam,
                           cg_steps=self.cg_steps,
                           cg_tol=self.cg_tol, cg_damping=self.cg_damping, cg_clip=self.cg_clip,
                           hvp=self.hvp,
                           backend=self.backend, task_batching=self.task_batching,
                           layer_derivatives=self.layer_derivatives, tf32=self.tf32,
                           task_threads=self.task_threads,
                           task_chunk=None if self.task_chunk == "all" else self.task_chunk)

    def validate(self) -> None:
        for name in ("k_shot", "q_query", "tasks", "n_way", "checkpoint_every", "nproc"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} is invalid: expected an int >= 1")
        for name in ("steps", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} is invalid: expected an int >= 0")
        if isinstance(self.eval_tasks, bool) or not isinstance(self.eval_tasks, int) \
                or self.eval_tasks < 2:
            raise ValueError(f"eval_tasks={self.eval_tasks!r} is invalid: expected an int >= 2 "
                             f"(a confidence interval needs two tasks; the paper's tables use 600)")
        if not (isinstance(self.outer_lr, (int, float)) and self.outer_lr > 0):
            raise ValueError(f"outer_lr={self.outer_lr!r} is invalid: expected a number > 0")
        if self.nproc > self.tasks:
            raise ValueError(f"nproc={self.nproc} is more than tasks={self.tasks}: every process "
                             f"needs at least one task of the meta-batch")
        if self.eval_every and self.nproc > self.eval_tasks:
            raise ValueError(f"nproc={self.nproc} is more than eval_tasks={self.eval_tasks}: every "
                             f"process adapts a share of the evaluation tasks; give --eval-tasks "
                             f">= {self.nproc}")
        if self.task == "omniglot" and self.n_way < 2:
            raise ValueError(f"n_way={self.n_way} is invalid for classification: use 2 or more")
        self.imaml_config()  # validates the engine's fields with their own messages
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device={self.device!r} is invalid: {e}") from None
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available: use --device cpu")
        if self.cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs={self.cuda_graphs!r} is invalid: use 'auto', True or "
                             f"False")
        if self.cuda_graphs is True and self.backend == "reference":
            raise ValueError("cuda_graphs=True cannot capture backend='reference' (it decides on "
                             "the host every iteration): use another backend, or leave out "
                             "--cuda-graphs")
        if self.cuda_graphs is True and torch.device(self.device).type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, but device={self.device!r}: "
                             f"use --device cuda, or leave out --cuda-graphs")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- building blocks --------------------------------------------------------------------
def build_model(s: RunSettings) -> torch.nn.Module:
    return sinusoid_mlp() if s.task == "sinusoid" else omniglot_conv(s.n_way)


def loss_fn_for(s: RunSettings):
    return F.mse_loss if s.task == "sinusoid" else F.cross_entropy


def build_sampler(s: RunSettings, split: str, tasks: int, seed: int):
    if s.task == "sinusoid":
        from .data import SinusoidSampler

        return SinusoidSampler(s.k_shot, s.q_query, tasks, device=s.device, seed=seed)
    from .data import load_omniglot

    if not s.data_root:
        raise ValueError("omniglot needs --data-root: the folder with images_background.zip and "
                         "images_evaluation.zip (imaml-fast download --data-root DIR fetches them)")
    data = load_omniglot(s.data_root)
    return data.sampler(split, s.n_way, s.k_shot, s.q_query, tasks, device=s.device, seed=seed)


def task_metric(s: RunSettings, learner: IMAML, adapted, xq, yq, out=None) -> torch.Tensor:
    """Per-task query accuracy (classification) or mean squared error (sinusoid), [T]. out:
    the adapted models' outputs on xq where already computed (a meta-gradient's
    query_outputs), else they are predicted here."""
    if out is None:
        out = learner.predict(adapted, xq)
    if s.task == "sinusoid":
        return ((out - yq) ** 2).mean(dim=(1, 2))
    return (out.argmax(-1) == yq).float().mean(1)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_resumable(saved: dict, now: RunSettings, path: Path) -> None:
    # a field the checkpoint's version did not have yet ran with its default; one this
    # version does not know is refused
    saved = {**{f.name: f.default for f in dataclasses.fields(RunSettings)},
             **RunSettings.saved_fields(saved, path)}
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.to_dict().items()
             if k not in RESUMABLE_CHANGES and k != "task_batching" and saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} is from another configuration ({'; '.join(diffs)}): resume "
                              f"with the same settings, or start a new run with another --out")


# ---- train -------------------------------------------------------------------------------
def train(s: RunSettings, resume: bool = False, stop_after: Optional[int] = None,
          max_seconds: Optional[float] = None) -> dict:
    """Meta-train with settings `s` into the run folder s.out. Returns a summary dict.
    stop_after: end (with a checkpoint) after this many steps of this call, as if killed
    right after a checkpoint; used to test resuming.
    max_seconds: end (with a checkpoint, summary["stopped"] = "time limit") at the first
    step that finishes this many seconds after training started; every rank of a
    distributed run stops at the same step. resume=True continues the run later."""
    s.validate()
    if max_seconds is not None and not (isinstance(max_seconds, (int, float))
                                        and not isinstance(max_seconds, bool) and max_seconds > 0):
        raise ValueError(f"max_seconds={max_seconds!r} is invalid: expected a number > 0 "
                         f"(or None for no time limit)")
    if not s.out:
        raise ValueError("out is required: the run folder for checkpoints and logs")
    rank, world = dist_mod.rank_and_world()
    out = Path(s.out)
    _check_run_folder(out, resume)
    # One training process per run folder: a second (a resume started while the run goes
    # on) would cut the metrics back to the checkpoint and interleave its own checkpoints.
    created = not out.exists()
    lock = _lock_run_folder(out) if rank == 0 else None
    try:
        _check_run_folder(out, resume)  # again: another process may have started it meanwhile
        return _train(s, resume, stop_after, max_seconds, rank, world, out)
    finally:
        if lock is not None:
            lock.close()  # releases the lock
            if created and os.listdir(out) == [LOCK_FILE]:  # failed before writing anything
                (out / LOCK_FILE).unlink()
                out.rmdir()


LOCK_FILE = ".lock"


def _check_run_folder(out: Path, resume: bool) -> None:
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise ValueError(f"{out} already holds a run (checkpoint.pt): pass --resume to continue "
                         f"it, or choose another --out")
    if resume and not ckpt_path.exists():
        raise CheckpointError(_NO_CHECKPOINT.format(path=ckpt_path))


def _lock_run_folder(out: Path):
    """An exclusive lock on the run folder (flock on out/.lock, released when the returned
    file is closed or the process ends), or a ValueError naming the process that holds it.
    None where the platform has no flock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{out} is in use by another training process ({holder}): let it "
                         f"finish or stop it before resuming, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def _train(s: RunSettings, resume: bool, stop_after, max_seconds, rank: int, world: int,
           out: Path) -> dict:
    main_rank = rank == 0
    ckpt_path = out / "checkpoint.pt"
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_resumable(ckpt["settings"], s, ckpt_path)
        s.task_batching = ckpt["settings"]["task_batching"]
    torch.manual_seed(s.seed)
    model = build_model(s).to(s.device)
    loss_fn = loss_fn_for(s)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.outer_lr)
    sampler = build_sampler(s, "train", s.tasks, seed=s.seed)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        _set_rng_state(ckpt["rng"])
        start = ckpt["step"]
    elif s.task_batching == "auto":
        # Fix the strategy once, on a sample the sampler does not hand out, and keep it in
        # the checkpoint: it decides the floating-point summation order of every step.
        probe = build_sampler(s, "train", s.tasks, seed=s.seed + 1).sample()
        fm = FunctionalModel(model, loss_fn)
        cfg = s.imaml_config()
        backend = resolve_backend(cfg.backend, fm.device, fm.dtype)
        # timed the way a meta-step runs: its backend's ops in the products' graph
        with fm.engine_mode(cfg, backend):
            s.task_batching = choose_strategy("auto", fm, fm.theta, probe.x_support,
                                              probe.y_support, **step_counts(cfg))
    learner = IMAML(model, loss_fn, s.imaml_config(), optimizer, distributed=world > 1,
                    cuda_graphs=s.cuda_graphs)
    metrics_path = out / "metrics.jsonl"
    evals_path = out / "evals.jsonl"
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(s.to_dict(), out / "settings.json")
        _truncate_metrics(metrics_path, start)
        _truncate_metrics(evals_path, start)
    # Every rank draws the whole meta-batch from the same sampler state and keeps its share,
    # so the stream of tasks (and a checkpoint's sampler state) does not depend on the
    # number of processes: a run can resume with another --nproc.
    mine = dist_mod.shard(s.tasks, rank, world)

    def checkpoint(step):
        if not main_rank:  # every rank holds the same state; rank 0 writes it
            return
        save_atomic({"format": FORMAT, "step": step, "settings": s.to_dict(),
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "sampler": sampler.state_dict(), "rng": _rng_state()}, ckpt_path)

    bar = _progress(s, start) if main_rank else None

    def evaluate_now(step):
        # every rank takes part (meta_test shards the tasks); the RNG state is put back so
        # that a run with evaluations computes exactly what one without does
        rng = _rng_state()
        t = time.perf_counter()
        values = meta_test(s, learner, s.eval_tasks, EVAL_SEED, rank, world)
        _set_rng_state(rng)
        r = _eval_summary(s, values, time.perf_counter() - t, step, EVAL_SEED)
        if main_rank:
            with open(evals_path, "a") as f:
                f.write(json.dumps(r) + "\n")
            msg = (f"step {step}: meta-test {r['metric']} {r['mean']:.2f} ± {r['ci95']:.2f}"
                   f"{r['unit']} (95% CI, {r['tasks']} tasks, {r['seconds']:.0f} s)")
            if bar is not None:
                bar.write(msg)
            elif s.progress:
                print(msg, flush=True)
        return r

    t0 = time.perf_counter()
    last_eval = None
    if s.eval_every and start and start % s.eval_every == 0 and start not in _logged_steps(evals_path):
        # killed between the checkpoint and the evaluation of a step, or evaluations asked
        # for only now: the checkpoint's step gets its evaluation (every rank reads the log)
        last_eval = evaluate_now(start)
    step = start
    last = {}
    skipped = consecutive = 0
    timed_out = False
    recent = collections.deque(maxlen=CURVATURE_WINDOW)  # (negative curvature, inner residual)
    warned = set()
    with open(metrics_path, "a") if main_rank else open(os.devnull, "w") as log:
        while step < s.steps:
            xs, ys, xq, yq = (t[mine] for t in sampler.sample())
            t_step = time.perf_counter()
            try:
                stats = learner.meta_step(xs, ys, xq, yq)
            except FloatingPointError:
                # meta_step changed nothing; a rare divergent task should not end a long run,
                # a run that keeps diverging should (every rank agrees: the check is reduced).
                skipped += 1
                consecutive += 1
                if consecutive >= MAX_CONSECUTIVE_SKIPS:
                    raise
                continue
            consecutive = 0
            r = stats.result
            ftype = r.query_loss.dtype
            parts = [r.inner_loss.sum(), r.query_loss.sum(), r.cg_iters.sum().to(ftype),
                     (r.cg_status == CG_NEGATIVE_CURVATURE).sum().to(ftype),
                     r.inner_residual.sum().to(ftype), r.cg_clipped.sum().to(ftype),
                     r.inner_steps.sum().to(ftype), r.first_order_cosine.sum().to(ftype)]
            if s.task != "sinusoid":  # the query MSE is the query loss itself
                # the query outputs of the meta-gradient's own forward pass: no second one
                parts.append(task_metric(s, learner, r.adapted, xq, yq, r.query_outputs)
                             .sum().to(ftype))
            late = max_seconds is not None and time.perf_counter() - t0 >= max_seconds
            sums = torch.stack(parts).double()
            if world > 1:  # the time limit's vote rides on the metrics' all-reduce
                sums = torch.cat([sums, sums.new_tensor([float(late)])])
                torch.distributed.all_reduce(sums)
            sums = sums.tolist()  # the one host sync of the step's metrics
            timed_out = sums.pop() > 0 if world > 1 else late
            sums = [v / s.tasks for v in sums]
            step += 1
            dt = time.perf_counter() - t_step
            # cg_negative_curvature: the share of tasks whose CG stopped on p'Ap <= 0 (an
            # inner solution far from a minimum of the proximal problem; the meta-gradient of
            # such a task is its last CG iterate, a cruder solve)
            # inner_residual: the mean over tasks of ||grad F(phi)|| / ||grad F(theta)||;
            # inner_steps: the mean steps the inner loops ran (below inner_steps only where
            # inner_tol stopped them); first_order_cosine: the mean over tasks of the cosine
            # between each task's meta-gradient and its query gradient at phi (1: the
            # implicit term only rescales)
            last = {"step": step, "inner_loss": sums[0], "inner_residual": sums[4],
                    "inner_steps": sums[6], "first_order_cosine": sums[7],
                    "query_loss": sums[1], "cg_iters": sums[2],
                    "cg_negative_curvature": sums[3], "cg_clipped": sums[5],
                    "tasks_per_s": s.tasks / dt, "seconds": dt, "skipped": skipped}
            if s.task != "sinusoid":
                last["accuracy"] = sums[8]
            recent.append((sums[3], sums[4]))
            if main_rank and len(recent) == CURVATURE_WINDOW:
                _warn_once(warned, recent, bar, s)
            log.write(json.dumps(last) + "\n")
            log.flush()  # a line per step, readable while the run goes on
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k not in (
                    "step", "seconds", "cg_iters", "cg_negative_curvature", "inner_residual",
                    "inner_steps", "cg_clipped", "first_order_cosine")})
            stopping = (stop_after is not None and step - start >= stop_after) or timed_out
            if step % s.checkpoint_every == 0 or step == s.steps or stopping:
                checkpoint(step)
            if s.eval_every and (step % s.eval_every == 0 or step == s.steps):
                last_eval = evaluate_now(step)
            if stopping:
                break
    if bar is not None:
        bar.close()
    if step == start and not ckpt_path.exists():
        checkpoint(step)
    curve = _plot_curve(metrics_path, out / "curve.png", s, evals_path) if main_rank else None
    stopped = "time limit" if step < s.steps and timed_out else (
        "stop_after" if step < s.steps else None)
    return {"steps": step, "seconds": time.perf_counter() - t0, "last": last,
            "checkpoint": str(ckpt_path), "curve": curve, "stopped": stopped,
            "eval": last_eval}


def _fixes(s: RunSettings, damping: bool = False) -> str:
    """What the training warnings suggest for run settings s: only what the run does not do
    already (the line search where it runs the fixed step, first-order meta-gradients where
    it solves the implicit system), with the current values named. damping: suggest a
    larger cg_damping too."""
    fixes = []
    if s.inner_solver == "gd":
        fixes.append("--inner-solver gd_armijo (a line search that keeps the inner loop "
                     "convergent)")
    if damping:
        fixes.append(f"a larger --cg-damping (now {s.cg_damping:g})")
    fixes.append(f"a smaller --inner-lr (now {s.inner_lr:g}) with more --inner-steps "
                 f"(now {s.inner_steps})")
    if s.cg_steps > 0:
        fixes.append("--cg-steps 0 (first-order)")
    return ", ".join(fixes[:-1]) + (", or " if len(fixes) > 1 else "") + fixes[-1]


def _warn_once(warned: set, recent, bar, s: RunSettings) -> None:
    """Warn (once per kind and run) when, over the last CURVATURE_WINDOW meta-steps, the inner
    loops ended far from their minimisers, or most tasks' CG stopped on negative curvature;
    on a line of its own beside the progress bar (if any)."""
    share = sum(n for n, _ in recent) / len(recent)
    residual = sum(r for _, r in recent) / len(recent)
    messages = []
    if "residual" not in warned and not residual <= INNER_RESIDUAL_WARN:  # NaN warns too
        warned.add("residual")
        messages.append(
            f"in the last {len(recent)} meta-steps the inner loop ended with a gradient "
            f"{residual:.3g} times the size of its first on average (metrics.jsonl: "
            f"inner_residual): the inner problems are far from solved, and the implicit "
            f"gradient, which assumes they are, misleads; try " + _fixes(s))
    if "curvature" not in warned and share > 0.5:
        warned.add("curvature")
        messages.append(
            f"in the last {len(recent)} meta-steps {share:.1%} of the tasks' CG stopped on "
            f"negative curvature (metrics.jsonl: cg_negative_curvature): their inner loops end "
            f"far from a minimum, and their meta-gradients, CG iterates that grew before the "
            f"stop, can dominate the mean and stall training; try "
            + _fixes(s, damping=True))
    if not messages:
        return
    if bar is not None:
        bar.clear()
    for m in messages:
        warnings.warn(m, RuntimeWarning, stacklevel=3)
    if bar is not None:
        bar.refresh()


def _worker(rank: int, world: int, rendezvous: str, s: RunSettings, resume: bool, queue,
            max_seconds: Optional[float] = None) -> None:
    dist_mod.init_local(rank, world, rendezvous, s.device)
    try:
        summary = train(s, resume=resume, max_seconds=max_seconds)
        if rank == 0:
            queue.put(("ok", summary))
    except BaseException as e:  # reported by the parent, which exits 2 for user errors
        queue.put(("error", f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)))
        torch.distributed.destroy_process_group()
        raise
    dist_mod.end_worker()


def train_multiprocess(s: RunSettings, resume: bool = False,
                       max_seconds: Optional[float] = None) -> dict:
    """train() in s.nproc local processes joined by torch.distributed (gloo on CPU, NCCL on
    GPUs), each taking a share of every meta-batch."""
    s.validate()
    if s.nproc == 1:
        return train(s, resume=resume, max_seconds=max_seconds)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    try:
        with dist_mod.local_rendezvous() as rendezvous:
            mp.start_processes(_worker, args=(s.nproc, rendezvous, s, resume, queue, max_seconds),
                               nprocs=s.nproc, join=True, start_method="spawn")
    except mp.ProcessRaisedException:
        pass  # the message is on the queue
    while not queue.empty():
        kind, payload = queue.get()
        if kind == "error":
            raise ValueError(payload)
        return payload
    raise RuntimeError("the training processes ended without a result")


def _complete_lines(path: Path) -> list:
    """(step, line) for the lines of a metrics or evals log up to the first that does not
    parse: a line cut short by a kill, which is dropped with what follows."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append((json.loads(line)["step"], line))
        except (ValueError, KeyError):
            break
    return lines


def _logged_steps(path: Path) -> set:
    """The steps of a metrics or evals log's complete lines."""
    return {step for step, _ in _complete_lines(path)}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines of steps <= `step` (a resumed run rewrites the rest)."""
    if path.exists():
        path.write_text("".join(l + "\n" for k, l in _complete_lines(path) if k <= step))


def _progress(s: RunSettings, start: int):
    if not s.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=s.steps, initial=start, desc=f"{s.preset} meta-step", unit="step",
                dynamic_ncols=True)


def _plot_curve(metrics_path: Path, png: Path, s: RunSettings,
                evals_path: Optional[Path] = None) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None  # optional extra: pip install "imaml_fast[plot]"
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    if not rows:
        return None
    keys = ("inner_loss", "query_loss") if s.task == "sinusoid" else ("query_loss", "accuracy")
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, k in zip(axes, keys):
        ys = [r[k] for r in rows]
        w = max(1, len(ys) // 50)
        smooth = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(steps, ys, alpha=0.3)
        ax.plot(steps, smooth)
        ax.set_xlabel("meta-step")
        ax.set_ylabel(k.replace("_", " ") + " after adaptation (train tasks)")
    evals = ([json.loads(l) for l in evals_path.read_text().splitlines() if l.strip()]
             if evals_path is not None and evals_path.exists() else [])
    if evals:  # the meta-test figures on the panel of the same quantity
        scale = 1.0 if s.task == "sinusoid" else 0.01
        axes[1].errorbar([e["step"] for e in evals], [e["mean"] * scale for e in evals],
                         yerr=[e["ci95"] * scale for e in evals], fmt="o", capsize=3,
                         label=f"meta-test ({evals[-1]['tasks']} tasks)")
        axes[1].legend()
    fig.suptitle(f"{s.preset}: {s.tasks} tasks per step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return str(png)


# ---- evaluate ----------------------------------------------------------------------------
def load_run(checkpoint_path, data_root: Optional[str] = None, device: Optional[str] = None):
    """(checkpoint, RunSettings, model with the saved parameters) of a run's checkpoint;
    data_root and device, when given, replace the saved ones."""
    path = Path(checkpoint_path)
    ckpt = load_checkpoint(path)
    s = RunSettings(**RunSettings.saved_fields(ckpt["settings"], path))
    if data_root:
        s.data_root = data_root
    if device:
        s.device = device
    s.validate()
    model = build_model(s).to(s.device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the saved parameters do not fit the {s.preset} network: "
                              f"{str(e)[:200]}") from None
    return ckpt, s, model


def meta_test(s: RunSettings, learner: IMAML, tasks: int, seed: int = EVAL_SEED,
              rank: int = 0, world: int = 1) -> torch.Tensor:
    """Per-task query accuracy (or MSE for sinusoid) of `tasks` meta-test tasks adapted from
    the learner's current parameters: [tasks] float64 on the CPU. The tasks are the first
    `tasks` of the meta-test stream `seed` drawn in meta-batches of min(s.tasks, tasks), so
    they do not depend on the number of processes: with world > 1 each rank adapts its share
    of every meta-batch (as in training) and one all-reduce gives every rank all values."""
    batch = min(s.tasks, tasks)
    n_batches = -(-tasks // batch)
    sampler = build_sampler(s, "test", batch, seed=seed)
    mine = dist_mod.shard(batch, rank, world)
    values = torch.zeros(n_batches * batch, dtype=torch.float64, device=s.device)
    for b in range(n_batches):
        xs, ys, xq, yq = (t[mine] for t in sampler.sample())
        adapted = learner.adapt(xs, ys)
        values[b * batch + mine.start:b * batch + mine.stop] = \
            task_metric(s, learner, adapted, xq, yq).double()
    if world > 1:  # the other ranks' entries are zero here
        torch.distributed.all_reduce(values)
    return values[:tasks].cpu()


def _eval_summary(s: RunSettings, values: torch.Tensor, seconds: float, step: int,
                  seed: int) -> dict:
    """Mean and 95% confidence interval (1.96 std / sqrt(n)) of meta_test's values, in %
    for accuracy."""
    n = values.numel()
    mean, ci = values.mean().item(), 1.96 * values.std().item() / math.sqrt(n)
    scale = 1.0 if s.task == "sinusoid" else 100.0
    return {"step": step, "preset": s.preset,
            "metric": "mse" if s.task == "sinusoid" else "accuracy", "tasks": n,
            "mean": mean * scale, "ci95": ci * scale,
            "unit": "" if s.task == "sinusoid" else "%", "seconds": seconds, "eval_seed": seed,
            "split": "meta-test tasks" if s.task == "sinusoid" else "meta-test characters (423)"}


def evaluate(checkpoint_path, tasks: int = 600, data_root: Optional[str] = None,
             device: Optional[str] = None, out: Optional[str] = None, seed: int = EVAL_SEED) -> dict:
    """Adapt to `tasks` meta-test tasks from the checkpoint's parameters and report the mean
    query accuracy (or MSE for sinusoid) with a 95% confidence interval, 1.96 std / sqrt(n).
    Writes the result as JSON to `out` (default: eval.json beside the checkpoint)."""
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 2:
        raise ValueError(f"tasks={tasks!r} is invalid: expected an int >= 2")
    path = Path(checkpoint_path)
    ckpt, s, model = load_run(path, data_root, device)
    learner = IMAML(model, loss_fn_for(s), s.imaml_config())
    t0 = time.perf_counter()
    values = meta_test(s, learner, tasks, seed)
    summary = _eval_summary(s, values, time.perf_counter() - t0, ckpt["step"], seed)
    result = {"checkpoint": str(path), **summary, "settings": s.to_dict()}
    write_json_atomic(result, Path(out) if out else path.parent / "eval.json")
    return result

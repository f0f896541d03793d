"""imaml_fast itself, as one implementation per backend, each through IMAML as a user runs it:
the default (backend="auto"; on a GPU IMAML captures each meta-gradient as a CUDA graph) and
every other backend that imaml_fast.backend_info() says can run here (on the CPU:
"reference", the sequential per-task path with the structure of the authors' code and the
paper's math); on a GPU also the default uncaptured (cuda_graphs=False)."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch

from .common import Result, Settings

DEFAULT = "imaml_fast default"
UNCAPTURED = "imaml_fast uncaptured"


def config(s: Settings, **overrides):
    """The engine's config for settings s; compare.py --tf32 on also lets the engine use TF32
    (IMAMLConfig.tf32, off by default whatever torch's global flags say)."""
    from imaml_fast import IMAMLConfig

    if os.environ.get("IMAML_FAST_BENCH_TF32") == "on":
        overrides.setdefault("tf32", True)
    return IMAMLConfig(inner_solver="gd", inner_steps=s.inner_steps, inner_lr=s.inner_lr,
                       lam=s.lam, cg_steps=s.cg_steps, cg_tol=s.cg_tol, **overrides)


def build(model: torch.nn.Module, loss_fn, s: Settings, cuda_graphs="auto", **overrides):
    """IMAML(model, loss_fn, config, cuda_graphs=...).meta_gradient: "auto" captures on a GPU."""
    from imaml_fast import IMAML

    learner = IMAML(model, loss_fn, config(s, **overrides), cuda_graphs=cuda_graphs)

    def step(xs, ys, xq, yq):
        return learner.meta_gradient(xs, ys, xq, yq)

    def run(xs, ys, xq, yq) -> Result:
        r = step(xs, ys, xq, yq)
        return Result(grad=r.grads_flat, phi=r.adapted_flat,
                      info={"backend": r.backend, "hvp": r.hvp,
                            "task_batching": r.task_batching, "task_threads": r.task_threads,
                            "cg_iters_mean": float(r.cg_iters.float().mean())})

    return run


def variants(device="cpu", dtype=torch.float32) -> Tuple[List[Tuple[str, Dict]], List[str]]:
    """[(name, config overrides)] for the default and every other backend that runs here,
    and messages for those that cannot."""
    from imaml_fast import backend_info
    from imaml_fast.backends import resolve_backend

    auto = resolve_backend("auto", torch.device(device), dtype).name
    out = [(DEFAULT, {})]
    skipped = []
    for b in backend_info(device, dtype):
        if not b["available"]:
            skipped.append(f"imaml_fast backend '{b['name']}' skipped: " + "; ".join(b["reasons"]))
        elif (b["name"] == "triton" and torch.device(device).type == "cpu"
              and os.environ.get("TRITON_INTERPRET") == "1"):
            skipped.append("imaml_fast backend 'triton' skipped: TRITON_INTERPRET=1 runs its "
                           "kernels in the interpreter, a test mode, not a speed to compare")
        elif b["name"] != auto:  # the default already runs `auto`'s backend
            out.append((f"imaml_fast {b['name']}", {"backend": b["name"]}))
    from imaml_fast.graphs import graphs_why_not

    if not graphs_why_not(device):  # the default captures here: time it uncaptured too
        out.append((UNCAPTURED, {"cuda_graphs": False}))
    return out, skipped

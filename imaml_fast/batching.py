"""How the batched backends push T tasks through the model: one vmap over all tasks, vmap
over chunks of tasks, or a plain loop of functional calls.

The best choice depends on the model and the device. On a 2-core CPU, for the paper's
stride-2 Omniglot network, 5-way 1-shot with T = 32, one vmap over all tasks makes a meta-step
1.6x faster than a loop (two threads; with one thread and 20-way tasks the loop and vmap are
level); for MAML's max-pooling conv4 on 84x84 images a plain loop wins and vmap is up to 2x
slower (vmap turns the per-task convolutions into one grouped convolution,
which the CPU runs badly for wide images). So "auto" measures the candidates on the first call
for a given model structure, input shape, dtype and device, and caches the winner; vmap stays
unless another candidate is at least 10% faster (vmap is timed first and again last, and its
best counts). What is timed is what a meta-step repeats:
a batched gradient and, when the caller says the solve will need them, one Hessian-vector
product through a kept graph (best of three each), weighted by how many of each a meta-step
makes (inner steps, CG steps). Timing gradients alone picked chunks of 16 tasks for the
Omniglot network, 10% slower end to end than one vmap whose products are cheaper.

Every strategy computes the same numbers up to floating-point summation order.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, Tuple, Union

import torch

from .functional import FunctionalModel

Strategy = Union[str, int]
_CACHE: Dict[Tuple, Strategy] = {}
# One measurement at a time: groups of tasks on worker threads (imaml_fast.threads) ask for
# the same key at once; the first measures, the others then find its choice.
_TUNE_LOCK = threading.Lock()
# Below this time for one batched gradient with vmap over all tasks, overheads are not worth
# measuring: vmap is taken as it is.
_TUNE_MIN_SECONDS = 0.01
# Another strategy replaces vmap only when it is at least this much faster (best of three
# timings each): on a shared machine near-ties otherwise flip from run to run, and with them
# the memory footprint and the rounding of every figure.
_TUNE_MARGIN = 0.9


def _key(fm: FunctionalModel, x: torch.Tensor):
    return (type(fm.model).__qualname__, tuple(map(tuple, fm.shapes)), repr(fm.model),
            tuple(x.shape), x.dtype, fm.dtype, x.device.type, fm.hand_batched(x))


def candidates(T: int):
    cands = ["vmap", "loop"]
    for c in (4, 8, 16):
        if c < T:
            cands.append(c)
    return cands


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn, device, repeats):
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _time_strategy(fm, theta, x, y, strategy, repeats=3, weights=(1.0, 0.0)):
    """weights[0] x (one batched gradient) + weights[1] x (one batched HVP through a kept
    graph), each the best of `repeats`."""
    from .hvp import BatchedHVP

    phi = theta.expand(x.shape[0], -1)
    t = weights[0] * _best_of(lambda: fm.grad_and_losses(phi, x, y, strategy), x.device, repeats)
    if weights[1]:
        hvp = BatchedHVP(fm, phi, x, y, "revrev", strategy)
        v = torch.ones_like(phi)
        t += weights[1] * _best_of(lambda: hvp(v), x.device, repeats)
        hvp.release()
    return t


def choose_strategy(requested: Strategy, fm: FunctionalModel, theta, x, y,
                    inner_steps: int = 1, hvps: int = 0) -> Strategy:
    """The strategy to use: `requested` unless it is "auto". inner_steps and hvps weigh a
    batched gradient against a Hessian-vector product as the caller's meta-step will use
    them (default: gradients only)."""
    if requested != "auto":
        return requested
    T = x.shape[0]
    if T == 1:
        return "loop"
    weights = (float(max(inner_steps, 1)), float(hvps))
    key = _key(fm, x) + (weights,)
    with _TUNE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _measure(fm, theta, x, y, weights)
        return _CACHE[key]


def _measure(fm, theta, x, y, weights) -> Strategy:
    T = x.shape[0]
    _time_strategy(fm, theta, x, y, "vmap", repeats=1)  # warm-up
    timings = {"vmap": _time_strategy(fm, theta, x, y, "vmap", weights=weights)}
    if timings["vmap"] / weights[0] >= _TUNE_MIN_SECONDS:
        for cand in candidates(T)[1:]:
            timings[cand] = _time_strategy(fm, theta, x, y, cand, weights=weights)
        # vmap again, last: timed first, in a fresh process it still pays one-off costs the
        # others do not (a 5-way Omniglot step: 1.55 s first, 1.19-1.38 s later, against
        # 1.33-1.41 s for chunks of 16), which tipped near-ties away from it
        timings["vmap"] = min(timings["vmap"],
                              _time_strategy(fm, theta, x, y, "vmap", weights=weights))
    best = min(timings, key=timings.get)
    if timings[best] > _TUNE_MARGIN * timings["vmap"]:
        best = "vmap"
    return best


def step_counts(config, inner_only: bool = False) -> dict:
    """{"inner_steps": batched gradients, "hvps": batched HVPs} one meta-step (or, with
    inner_only, one inner solve) of `config` makes: choose_strategy's weights."""
    if config.inner_solver == "hf":
        grads, hvps = config.inner_steps, config.inner_steps * config.hf_cg_steps
    else:  # gd_armijo also evaluates the gradient at the start point; agd a loss per step
        start = config.inner_solver == "gd_armijo" and config.inner_steps > 0
        grads, hvps = config.inner_steps + start, 0
        if config.inner_solver == "agd":
            grads += config.inner_steps / 3  # a loss: a forward pass, about a third of a gradient
    if not inner_only:
        grads += 2  # the query gradient and the support gradient kept for the products
        hvps += config.cg_steps
    return {"inner_steps": grads, "hvps": hvps}


def clear_cache() -> None:
    _CACHE.clear()

"""Checks on a meta-batch before any work starts: each failure is a ValueError that names
the argument, what was wrong and how to fix it."""
from __future__ import annotations

import torch

from .functional import FunctionalModel

_NAMES = ("x_support", "y_support", "x_query", "y_query")


def validate_episode(fm: FunctionalModel, theta, xs, ys, xq, yq, values: bool = True) -> None:
    """Structure (types, shapes, devices, dtypes) always; with values=True also finiteness
    (one host sync) and one probe call of the loss. CUDA-graph replays check structure only:
    their data was checked when the graph was captured, and a replay must not synchronise."""
    tensors = dict(zip(_NAMES, (xs, ys, xq, yq)))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor with a leading task dimension, "
                             f"got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected [T, N, ...] "
                             f"(tasks, examples per task, ...); add the task dimension with "
                             f"{name}.unsqueeze(0) for a single task")
        if t.device != fm.device:
            raise ValueError(f"{name} is on {t.device} but the parameters are on {fm.device}: "
                             f"move it with {name}.to('{fm.device}')")
    T = xs.shape[0]
    for name, t in tensors.items():
        if t.shape[0] != T:
            raise ValueError(f"mismatched number of tasks: x_support has T={T} but {name} has "
                             f"T={t.shape[0]}; every input needs the same leading task dimension")
    if T == 0:
        raise ValueError("the meta-batch is empty (T=0): pass at least one task")
    for xn, yn in (("x_support", "y_support"), ("x_query", "y_query")):
        x, y = tensors[xn], tensors[yn]
        if x.shape[1] == 0:
            raise ValueError(f"{xn} is empty (shape {tuple(x.shape)}): every task needs at least "
                             f"one {xn.split('_')[1]} example")
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"{xn} has {x.shape[1]} examples per task but {yn} has "
                             f"{y.shape[1]}: they must match")
        if not x.is_floating_point():
            raise ValueError(f"{xn} has dtype {x.dtype}: inputs must be floating point "
                             f"({fm.dtype}, like the parameters); convert with {xn}.to({fm.dtype})")
        if x.dtype != fm.dtype:
            raise ValueError(f"{xn} has dtype {x.dtype} but the parameters are {fm.dtype}: "
                             f"convert with {xn}.to({fm.dtype}) (or the model with .to({x.dtype}))")
        if y.dtype == torch.bool or (not y.is_floating_point() and y.dtype != torch.long):
            raise ValueError(f"{yn} has dtype {y.dtype}: class labels must be torch.long "
                             f"({yn}.long()); regression targets floating point like the "
                             f"parameters ({fm.dtype})")
        if y.is_floating_point() and y.dtype != fm.dtype:
            raise ValueError(f"{yn} has dtype {y.dtype} but the parameters are {fm.dtype}: "
                             f"convert with {yn}.to({fm.dtype})")
    if ys.dtype != yq.dtype:
        raise ValueError(f"y_support is {ys.dtype} but y_query is {yq.dtype}: use one label dtype")
    if not values:
        return
    # One host sync for all finiteness checks together.
    checks = [torch.isfinite(t).all() for t in (xs, xq) + tuple(
        y for y in (ys, yq) if y.is_floating_point())]
    checks.append(torch.isfinite(theta).all())
    ok = torch.stack(checks).cpu().tolist()
    labels = ["x_support", "x_query"] + [n for n, y in (("y_support", ys), ("y_query", yq))
                                           if y.is_floating_point()] + ["the parameters"]
    for name, good in zip(labels, ok):
        if not good:
            raise ValueError(f"{name} contains NaN or infinite values: clean the data (or, for "
                             f"the parameters, restore them from a checkpoint)")
    _probe_loss(fm, theta, xs, ys)


def _probe_loss(fm, theta, xs, ys) -> None:
    """Run the loss once on task 0 so that a wrong label format fails here, clearly."""
    try:
        with torch.no_grad():
            loss = fm.loss_one(theta, xs[0], ys[0])
    except Exception as e:  # re-raised with the context of what was being called
        raise ValueError(
            f"loss_fn(model(x_support[0]), y_support[0]) failed with x_support[0] of shape "
            f"{tuple(xs[0].shape)} and y_support[0] of shape {tuple(ys[0].shape)}, dtype "
            f"{ys.dtype}: {type(e).__name__}: {e}. Check the label dtype and shape the loss "
            f"expects (class indices as torch.long for F.cross_entropy)") from e
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(f"loss_fn must return a scalar floating-point tensor per task (use a "
                         f"mean or sum reduction), got {loss!r:.80}")

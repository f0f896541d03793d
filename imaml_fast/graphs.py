"""CUDA graphs: a whole meta-gradient captured once per input signature, then replayed.

A meta-step launches thousands of small kernels (16 inner steps of forward and backward
passes, the HVP graph, every CG iteration); on a GPU their launch overhead can cost more
than their arithmetic at T = 32. The engine was written for capture: the batched CG runs a
fixed number of iterations with per-task masks, the HF line search skips its early exit
while capturing, the CUDA kernels take the current stream and allocate from torch's caching
allocator, and nothing asks the host whether to go on. So the whole meta_gradient_flat call,
inner loop, query gradient, HVP graph and CG solve, is captured as one CUDA graph per
(shapes, dtypes, device) and replayed with the new meta-batch copied into its static inputs.

    graphed = CapturedMetaGradient(fm, config)        # or IMAML(..., cuda_graphs=True)
    result = graphed(theta, x_support, y_support, x_query, y_query)

What a replay does not do: check that the data is finite, or probe the loss (both synchronise
with the host; they run once, at capture). Non-finite data still cannot slip through
unnoticed: CG flags the task CG_NONFINITE and IMAML's check_finite refuses the step.
Task batching is chosen before capture ("auto" measures outside the graph) and fixed after.
The result's tensors are copies, so a later replay does not overwrite them.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from .config import IMAMLConfig
from .functional import FunctionalModel
from .implicit import MetaGradient, meta_gradient_flat
from .validation import validate_episode


class CaptureFailed(RuntimeError):
    """Capturing the meta-gradient as a CUDA graph failed, after the same computation had run
    uncaptured without error (so the model and data are fine: the model does something a
    capture refuses, such as reading a device value on the host)."""


def graphs_why_not(device: torch.device) -> list:
    """Why CUDA graphs cannot run on this device; empty when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return [f"tensors are on {device.type}: CUDA graphs need CUDA tensors"]
    if not torch.cuda.is_available():
        return ["no CUDA GPU is available (torch.cuda.is_available() is False)"]
    return []


def config_why_not(config: IMAMLConfig) -> list:
    """Why a meta-gradient with these settings cannot be captured; empty when it can."""
    reasons = []
    if config.backend == "reference":
        reasons.append("cuda_graphs cannot capture the reference backend (it decides on the "
                       "host after every CG iteration); use backend='auto'")
    if config.inner_tol > 0:
        reasons.append("cuda_graphs cannot capture inner_tol > 0 (how many inner steps run is "
                       "decided on the host); use inner_tol=0 or cuda_graphs=False")
    return reasons


def _copy_result(r: MetaGradient, fm: FunctionalModel) -> MetaGradient:
    clone = {f.name: (getattr(r, f.name).clone() if isinstance(getattr(r, f.name), torch.Tensor)
                      else getattr(r, f.name)) for f in dataclasses.fields(r)}
    clone["grads"] = fm.unflatten(clone["grads_flat"])
    clone["task_grads"] = fm.unflatten(clone["task_grads_flat"])
    clone["adapted"] = fm.unflatten(clone["adapted_flat"])
    clone["evals"] = dict(r.evals)
    return MetaGradient(**clone)


class CapturedMetaGradient:
    """meta_gradient_flat(fm, ...) captured as a CUDA graph per input signature."""

    def __init__(self, fm: FunctionalModel, config: IMAMLConfig,
                 operator: Optional[Tuple[float, float]] = None, warmup: int = 2,
                 max_graphs: Optional[int] = None):
        """max_graphs: capture at most this many input signatures (each holds its static
        inputs and its memory pool); calls with further signatures run uncaptured.
        None: no limit."""
        reasons = graphs_why_not(fm.device)
        if reasons:
            raise ValueError("cuda_graphs needs a CUDA model: " + "; ".join(reasons))
        if config_why_not(config):
            raise ValueError("; ".join(config_why_not(config)))
        self.fm, self.config, self.operator, self.warmup = fm, config, operator, warmup
        if max_graphs is not None and (isinstance(max_graphs, bool) or not isinstance(max_graphs, int)
                                       or max_graphs < 0):
            raise ValueError(f"max_graphs={max_graphs!r} is invalid: expected an int >= 0 or None")
        self.max_graphs = max_graphs
        self._graphs: Dict[tuple, tuple] = {}
        self.captures = 0
        self.replays = 0
        self.uncaptured = 0

    @staticmethod
    def _key(tensors) -> tuple:
        return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)

    def _run(self, theta, xs, ys, xq, yq, validate_values: bool) -> MetaGradient:
        return meta_gradient_flat(self.fm, xs, ys, xq, yq, self.config, theta=theta,
                                  operator=self.operator, validate_values=validate_values)

    def _capture(self, inputs) -> tuple:
        static = tuple(t.detach().clone() for t in inputs)
        # The first call outside any graph: data checks and task-batching measurement.
        self._run(*static, validate_values=True)
        side = torch.cuda.Stream(device=static[0].device)
        side.wait_stream(torch.cuda.current_stream(static[0].device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(self.warmup):
                self._run(*static, validate_values=False)
        torch.cuda.current_stream(static[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._run(*static, validate_values=False)
        except Exception as e:  # the uncaptured runs above passed: the capture itself failed
            raise CaptureFailed(f"capturing the meta-gradient as a CUDA graph failed "
                                f"({type(e).__name__}: {e})") from e
        self.captures += 1
        return graph, static, out

    def __call__(self, theta, xs, ys, xq, yq) -> MetaGradient:
        inputs = (theta, xs, ys, xq, yq)
        validate_episode(self.fm, theta, xs, ys, xq, yq, values=False)
        key = self._key(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            if self.max_graphs is not None and len(self._graphs) >= self.max_graphs:
                self.uncaptured += 1
                return self._run(*inputs, validate_values=True)
            entry = self._graphs[key] = self._capture(inputs)
        graph, static, out = entry
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        self.replays += 1
        return _copy_result(out, self.fm)

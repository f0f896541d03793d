"""The backend registry: which implementation runs the hot path, and why another cannot.

A backend either runs the whole engine its own way ("reference": one task at a time, the
structure of the authors' code) or supplies the fused ops of the batched engine
(`cg_update`, `prox_update`). Each backend says why it cannot run on given inputs; an
explicit request that cannot run raises with every reason, "auto" takes the first backend in
its preference order that can run, and the result records which one ran. Kernel modules are
imported only when their backend's ops are first asked for, so importing imaml_fast never
fails and never initialises CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Backend:
    name: str
    summary: str
    batched: bool
    # (device, dtype) -> reasons it cannot run there; empty when it can.
    why_not: Callable[[torch.device, torch.dtype], List[str]] = lambda device, dtype: []
    # () -> {"cg_update": fn, "prox_update": fn}; imported lazily.
    load_ops: Optional[Callable[[], Dict[str, Callable]]] = None
    _ops: Optional[Dict[str, Callable]] = field(default=None, repr=False)

    def ops(self) -> Dict[str, Callable]:
        if self._ops is None:
            self._ops = self.load_ops() if self.load_ops else {}
        return self._ops


_REGISTRY: Dict[str, Backend] = {}
# "auto" tries these in order, per device type. CPU: the C++ twins' fused CG and proximal
# update measured faster than the PyTorch ops (meta-step 2.13 s vs 2.28 s for omniglot-5w1s,
# benchmarks/results/cpu-epyc-2core/compare.md); without _C the torch backend runs. GPU: the
# CUDA kernels, then Triton, then torch: on an H100 the CUDA CG and proximal updates were at
# least as fast as Triton's and 1.5-7x faster than the PyTorch ops at the Omniglot size, and the
# cuda backend's meta-step the fastest (0.158 s vs triton 0.163, torch 0.193;
# benchmarks/results/NVIDIA-H100-80GB-HBM3/).
_AUTO_ORDER = {"cpu": ["cpp", "torch"], "cuda": ["cuda", "triton", "torch"]}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _torch_ops():
    from ..cg import batched_dot, cg_update_ref
    from ..dense import dense_cg_ref
    from ..inner import prox_update_ref
    from ..layers import batch_norm_double_backward

    return {"cg_update": cg_update_ref, "prox_update": prox_update_ref,
            "batched_dot": batched_dot, "dense_cg": dense_cg_ref,
            "bn_double_backward": batch_norm_double_backward}


register_backend(Backend(
    name="reference", batched=False,
    summary="one task at a time, autograd double-backward HVPs rebuilt per product "
            "(the authors' structure, the paper's math); the yardstick for tests and benchmarks"))
register_backend(Backend(
    name="torch", batched=True, load_ops=_torch_ops,
    summary="all tasks together: vmap/chunked functional calls, one reused HVP graph, "
            "masked batched CG on flat [T, P] buffers, pure PyTorch on any device"))

def _register_kernel_backends():
    from . import cpp as _cpp
    from . import cuda as _cuda
    from . import triton as _triton

    register_backend(Backend(
        name="triton", batched=True, why_not=_triton.why_not, load_ops=_triton.load_ops,
        summary="the torch backend with the fused CG iteration and proximal update as Triton "
                "kernels (2 passes over [T, P] per CG iteration); CUDA, or TRITON_INTERPRET=1"))
    register_backend(Backend(
        name="cuda", batched=True, why_not=_cuda.why_not, load_ops=_cuda.load_ops,
        summary="the torch backend with the fused CG iteration, proximal update, dots and dense "
                "CG as CUDA C++ kernels from imaml_fast._C (C ABI, no PyTorch C++ API)"))
    register_backend(Backend(
        name="cpp", batched=True, why_not=_cpp.why_not, load_ops=_cpp.load_ops,
        summary="the CPU twins of the CUDA kernels (imaml_fast._C): same formulation, on CPU "
                "tensors, float32/float64"))


_register_kernel_backends()
BACKEND_NAMES = ("auto",) + tuple(_REGISTRY)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that will run `name` on (device, dtype), or ValueError with the reasons."""
    device = torch.device(device)
    if name == "auto":
        reasons = []
        for cand in _AUTO_ORDER.get(device.type, ["torch"]):
            why = _REGISTRY[cand].why_not(device, dtype)
            if not why:
                return _REGISTRY[cand]
            reasons += [f"{cand}: {w}" for w in why]
        raise ValueError(f"no backend can run on {device} with {dtype}: " + "; ".join(reasons))
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown: allowed values are {BACKEND_NAMES}")
    why = _REGISTRY[name].why_not(device, dtype)
    if why:
        raise ValueError(f"backend={name!r} cannot run on {device} with {dtype}: " + "; ".join(why))
    return _REGISTRY[name]


def backend_info(device="cpu", dtype=torch.float32) -> List[dict]:
    """Every backend, whether it can run on (device, dtype), why not, and what it is."""
    device = torch.device(device)
    out = []
    for b in _REGISTRY.values():
        why = b.why_not(device, dtype)
        out.append({"name": b.name, "available": not why, "reasons": why, "summary": b.summary})
    return out

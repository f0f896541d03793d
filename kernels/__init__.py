"""Triton kernels of the hot path, installed as imaml_fast.kernels.

Importing this package imports triton; imaml_fast imports it only when the "triton" backend's
ops are first asked for. On a CPU the kernels run under TRITON_INTERPRET=1 (set it before
triton is imported), which is how CI tests them against their references.
"""
from .batch_norm import bn_double_backward
from .cg import cg_update
from .dense import dense_cg
from .vector import batched_dot, prox_update

__all__ = ["cg_update", "dense_cg", "prox_update", "batched_dot", "bn_double_backward"]

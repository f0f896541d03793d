"""The "triton" backend: the fused CG iteration, the proximal inner update, the dense CG solve
and BatchNorm's double backward (bn_double_backward, float32/float64; other dtypes go to
imaml_fast.layers.batch_norm_double_backward) as Triton kernels (kernels/, installed as
imaml_fast.kernels), the rest of the batched engine as in "torch". triton is imported only
when these ops are first asked for."""
from __future__ import annotations

import importlib.util
import os
from typing import List

import torch

GPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INTERPRETER_DTYPES = (torch.float32, torch.float64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(device: torch.device, dtype: torch.dtype) -> List[str]:
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed: pip install triton")
    if device.type == "cuda":
        if interpreting():
            reasons.append("TRITON_INTERPRET=1 is set, which runs kernels on the host: unset it "
                           "to run on the GPU")
        if dtype not in GPU_DTYPES:
            reasons.append(f"{dtype} is not supported (float32, float64, bfloat16, float16)")
    elif device.type == "cpu":
        if not interpreting():
            reasons.append("Triton kernels need a CUDA device; on the CPU they run only under "
                           "TRITON_INTERPRET=1, a test mode far slower than the torch backend")
        if dtype not in INTERPRETER_DTYPES:
            reasons.append(f"{dtype} is not supported by the Triton interpreter (float32, float64)")
    else:
        reasons.append(f"device type '{device.type}' is not supported (cuda)")
    return reasons


def load_ops():
    from .. import kernels

    return {"cg_update": kernels.cg_update, "prox_update": kernels.prox_update,
            "batched_dot": kernels.batched_dot, "dense_cg": kernels.dense_cg,
            "bn_double_backward": kernels.bn_double_backward}

"""TF32 inside the engine: float32 convolutions and matmuls at full precision unless asked.

PyTorch runs cuDNN's float32 convolutions in TF32 by default (10-bit mantissa inputs). For
iMAML that default costs exactness where it matters most: the inner loop and the implicit
solve's Hessian-vector products repeat those convolutions, and on random Omniglot-shaped
data the batched engine's float32 meta-gradient ended 0.12 (inner lr 0.03) to 0.30 (inner
lr 0.1) from float64 with TF32, against 8e-7 and 2e-6 without it; the sequential reference,
one task's small convolutions at a time, 2e-5 to 3e-5 with TF32
(benchmarks/results/NVIDIA-H200/precision.md). TF32 made the captured Omniglot 5-way
meta-step 2.2x faster on the same H200 (0.019 against 0.042 s). So the engine runs its model
calls with TF32 off by default, and IMAMLConfig(tf32=True) opts in to the speed.

tf32_mode(allow) sets PyTorch's flags for the block and puts back exactly what was there: the
legacy flags where they can be read, else (settings mixed through torch's newer
fp32_precision API, which makes the legacy getters raise) the newer API's strings. The flags
are process-wide: another thread running convolutions during a meta-step sees the engine's
setting for that time.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch

# The new-API precision strings (torch >= 2.9), parents before children.
_PRECISION_PATHS = ("fp32_precision", "cudnn.fp32_precision", "cudnn.conv.fp32_precision",
                    "cudnn.rnn.fp32_precision", "cuda.matmul.fp32_precision")


def _resolve(path: str):
    obj = torch.backends
    *parents, leaf = path.split(".")
    for name in parents:
        obj = getattr(obj, name)
    return obj, leaf


def _saved() -> List[Tuple[object, str, object]]:
    try:
        return [(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32),
                (torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)]
    except RuntimeError:  # set through both APIs (torch >= 2.9): keep the newer API's strings
        return [(obj, name, getattr(obj, name)) for obj, name in map(_resolve, _PRECISION_PATHS)]


@contextlib.contextmanager
def tf32_mode(allow: bool) -> Iterator[None]:
    """Within the block, cuDNN convolutions and CUDA matmuls in float32 use TF32 iff `allow`.
    No effect on CPU arithmetic (the flags only steer cuDNN and cuBLAS)."""
    saved = _saved()
    torch.backends.cudnn.allow_tf32 = bool(allow)
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)

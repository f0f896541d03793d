"""Lazy access to the compiled kernel library, imaml_fast._C (built from csrc/ by setup.py).

Nothing here runs at `import imaml_fast`: the extension is imported on the first `load()`,
from the code path that needs it (a cpp/cuda backend's why_not or load_ops), and importing it
never initialises CUDA (the module holds no CUDA state until a *_cuda function is called).

    module, reason = load()     # (imaml_fast._C, None) or (None, "why it is not available")
    build_info()                # {"cuda": bool, "cuda_archs": ..., compilers...} or None
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional, Tuple

import torch

# The C ABI version these wrappers are written against (IMAML_FAST_ABI_VERSION in
# csrc/include/imaml_fast/imaml_fast.h); a stale build with another ABI is refused.
ABI_VERSION = 3

# dtype codes of the C ABI (IMF_FLOAT32, ...).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_BUILD_HINT = ("build it with `pip install -e .` from the repository (needs cmake and a C++17 "
               "compiler; nvcc for the CUDA kernels)")

_MISSING = "the extension module is missing"
_state: Optional[Tuple[object, Optional[str]]] = None
_info: Optional[dict] = None


def load():
    """(module, None) when imaml_fast._C imports, else (None, the reason). Cached.

    A module that is there but cannot be used (a stale build with another C ABI, an import
    error) also warns, once per process: backend="auto" then quietly runs the pure-PyTorch
    backends, about half as fast on the CPU, and the user did build the extension. A module
    that is simply not built (a pure-Python install) does not warn: that fallback is the
    documented one."""
    global _state
    if _state is None:
        _state = _import()
        module, why = _state
        if module is None and not why.startswith(_MISSING):
            warnings.warn(f"imaml_fast._C cannot be used: {why}. backend='auto' runs the "
                          f"pure-PyTorch backends until it is rebuilt.", RuntimeWarning,
                          stacklevel=2)
    return _state


def _import():
    try:
        module = importlib.import_module("imaml_fast._C")
    except ModuleNotFoundError as e:
        if e.name == "imaml_fast._C":
            return None, f"{_MISSING} ({_BUILD_HINT})"
        return None, f"importing it failed: {e}"
    except ImportError as e:  # e.g. an undefined symbol, a wrong architecture
        return None, f"importing it failed: {e} ({_BUILD_HINT})"
    abi = getattr(module, "ABI_VERSION", None)
    if abi != ABI_VERSION:
        return None, (f"the built extension has C ABI version {abi}, these wrappers need "
                      f"{ABI_VERSION}: a stale build; rebuild ({_BUILD_HINT})")
    return module, None


def build_info() -> Optional[dict]:
    """What the built extension contains (cuda, cuda_archs, no_cuda_reason, compilers), or
    None when it is not built."""
    global _info
    module, _ = load()
    if module is None:
        return None
    if _info is None:
        _info = dict(module.build_info())
    return dict(_info)

"""Keep freed CPU memory in the process instead of handing it back to the OS after every use.

A meta-step on the CPU allocates and frees hundreds of megabytes of large temporaries (the
batched activations of 16 inner steps and 5 Hessian-vector products). With glibc's default
settings, blocks that large are mostly mapped for each allocation and unmapped when freed (or
trimmed from the heap), so every step touches fresh pages: measured on the Omniglot 5-way
1-shot step (T = 32, vmap, two threads), 64,000-73,000 minor page faults per meta-step by
default against 800-1,100 after keep_freed_cpu_memory(), and the step 4-10% faster (1.128 ->
1.020 s and 1.093 -> 1.050 s, median of 5, in two A/B runs of separate processes); later, 18%
(1.285 -> 1.052 s) and 9% (0.967 -> 0.883 s) in two A/Bs timed in interleaved rounds
(benchmarks/bench_meta_step.py --malloc-ab), where the sequential reference's small per-task
tensors gained 0-2%.

`keep_freed_cpu_memory()` sets them: no large block is mapped on its own below 32 MiB, and up
to 256 MiB of freed memory stay with the process. It changes the whole process, so the
library never calls it on import; `imaml-fast train` and `eval` call it (their process is
theirs), and a script may. It also exports glibc's matching environment variables, so that
processes started afterwards (the training workers of --nproc) start with the same settings.
IMAML_FAST_MALLOC=default turns it off. On anything but glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20, "MALLOC_MMAP_THRESHOLD_"),
            (M_TRIM_THRESHOLD, 256 << 20, "MALLOC_TRIM_THRESHOLD_"),
            (M_TOP_PAD, 64 << 20, "MALLOC_TOP_PAD_"))


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt  # glibc; musl and others have no mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: its settings are what we set)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def keep_freed_cpu_memory() -> bool:
    """Apply the settings above to this process (and, through the environment, to processes
    it starts). Returns whether they are in effect: False on a non-glibc system or with
    IMAML_FAST_MALLOC=default."""
    if os.environ.get("IMAML_FAST_MALLOC", "").strip().lower() == "default":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = all(mallopt(param, value) == 1 for param, value, _ in SETTINGS)
    if ok:
        for _, value, env in SETTINGS:
            os.environ.setdefault(env, str(value))
    return ok

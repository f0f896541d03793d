"""Task groups on CPU threads: a meta-batch cut into contiguous groups of tasks, each group
run on its own worker thread with one intra-op thread.

Why: tasks are independent until the meta-gradient's final mean, and a single batched call
over all tasks leaves CPU cores idle. Every operation of a step is dispatched from one Python
thread (about 4,100 per Omniglot 5-way step), the cores wait while it does, and the late
convolutions (4x4 and 2x2 outputs) split poorly over cores. With one group per core, each
group's dispatch overlaps the other groups' compute, and every operation runs on one core.
The Omniglot 5-way 1-shot meta-step (T = 32, 16 inner steps, 5 CG steps) on two cores took
8% less time in two groups than in one call on two intra-op threads, the 20-way step 11%
less (in-process A/Bs; benchmarks/bench_meta_step.py times both).

What a worker runs is the engine's whole per-task computation for its group (inner solve,
query gradient, CG with its products), with its own shallow copy of the FunctionalModel
(the engine switches the model's layer modes during a pass; each copy switches its own) and,
from the second worker on, its own deep copy of the module (torch.func.functional_call
swaps parameters into the module it runs, so two threads cannot share one; the
hand-batched layers never touch it). Per-task numbers are the same computation whatever the
grouping, up to the floating-point rounding of the per-group batched calls.

Thread counts: PyTorch's CPU builds run ATen on OpenMP, whose thread count is per calling
thread. Each worker sets its own to one when it starts; the caller's count is restored.
Where the count turns out to be process-wide (a build without OpenMP), no worker pool is
used and everything runs on the calling thread.
"""
from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Optional, Tuple

import torch

_LOCK = threading.Lock()
_POOL: Optional["_Workers"] = None
_UNUSABLE: Optional[str] = None  # why worker threads cannot be used here, once found out


class _Workers:
    """n persistent worker threads, each with one intra-op thread."""

    def __init__(self, n: int):
        caller = torch.get_num_threads()
        ready = threading.Barrier(n + 1)

        def start():
            # ATen sets a thread's count from the process-wide record on the thread's first
            # query; query first, so that the caller's restore below cannot undo the 1
            torch.get_num_threads()
            torch.set_num_threads(1)
            ready.wait(timeout=60)

        self.n = n
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="imaml_fast-tasks",
                                       initializer=start)
        # Every submit finds no idle worker while the others wait at the barrier in their
        # initializer, so n submits start n threads.
        started = [self.pool.submit(int) for _ in range(n)]
        ready.wait(timeout=60)
        wait(started)
        torch.set_num_threads(caller)  # the process-wide record of the count, for new threads
        worker_counts = {f.result() for f in [self.pool.submit(torch.get_num_threads)
                                               for _ in range(n)]}
        self.per_thread = worker_counts == {1} and torch.get_num_threads() == caller

    def shutdown(self):
        self.pool.shutdown(wait=True)


def _workers(n: int) -> Optional[_Workers]:
    """The pool, with at least n workers; None where per-thread counts are not available."""
    global _POOL, _UNUSABLE
    with _LOCK:
        if _UNUSABLE is not None:
            return None
        if _POOL is None or _POOL.n < n:
            if _POOL is not None:  # its queued work still runs; its threads then end
                _POOL.pool.shutdown(wait=False)
            caller = torch.get_num_threads()
            _POOL = _Workers(n)
            if not _POOL.per_thread:
                _POOL.shutdown()
                _POOL = None
                torch.set_num_threads(caller)
                _UNUSABLE = ("this PyTorch build keeps one intra-op thread count for the whole "
                             "process (no OpenMP), so workers cannot each run on one thread")
                return None
        return _POOL


def unavailable_reason() -> Optional[str]:
    """Why task groups run on the calling thread in this process, or None (not yet known
    counts as available)."""
    return _UNUSABLE


def thread_state_active() -> Optional[str]:
    """What the caller has active that is kept per thread, so that work on workers would
    escape it, or None: a TorchFunctionMode or TorchDispatchMode (an op counter, a FLOP
    counter), saved-tensor hooks (a memory meter, save_on_cpu), autocast, torch.profiler
    (which records the calling thread's operations only). PyTorch has no public query for
    some of these; where its private ones are missing, they count as inactive."""
    for name, what in (("_len_torch_function_stack", "a TorchFunctionMode"),
                       ("_len_torch_dispatch_stack", "a TorchDispatchMode")):
        fn = getattr(torch._C, name, None)
        if fn is not None and fn() > 0:
            return what
    hooks = getattr(getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks",
                    None)
    if hooks is not None and hooks(False) is not None:
        return "saved-tensor hooks"
    if torch.is_autocast_enabled("cpu"):
        return "autocast"
    enabled = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)
    if enabled is not None and enabled():
        return "the profiler"  # it records the calling thread's operations only
    return None


def resolve_task_threads(requested, device: torch.device, T: int, batched: bool) -> int:
    """How many groups of tasks run concurrently: 1 off the CPU, for the sequential reference
    backend, for a single task, and for "auto" while thread_state_active(); else
    min(requested, T), "auto" meaning torch.get_num_threads() of the caller. An int asks
    for groups whatever is active: modes, hooks and autocast then see the calling thread's
    work only."""
    if requested == 1 or T < 2 or not batched:
        return 1
    if device.type != "cpu":
        if requested == "auto":
            return 1
        raise ValueError(f"IMAMLConfig.task_threads={requested!r} runs groups of tasks on CPU "
                         f"threads, but the model is on {device.type}: use 'auto' or 1 there")
    if requested == "auto":
        if thread_state_active() is not None:
            return 1
        requested = torch.get_num_threads()
    return max(1, min(int(requested), T))


# "auto" keeps one call below this time for one batched gradient over all tasks: thread
# hand-offs and the GIL cost more than such work gains.
_MIN_SECONDS = 0.002
# Timed rounds, each one call and then the groups, after a warm-up of each; the best of each
# counts. A single gradient's time moves by up to 1.6x between calls on a shared machine
# (Omniglot 20-way: 0.21-0.27 s), more than the groups gain; interleaved rounds and best
# times keep that noise from deciding.
_ROUNDS = 4
# Groups replace one call when their best time is at most this fraction of one call's.
_MARGIN = 1.0
_CHOICES: Dict[Tuple, int] = {}
_CHOICE_LOCK = threading.Lock()


def choose_task_threads(requested, fm, theta, x, y, batched: bool, strategy="vmap") -> int:
    """The number of groups a call runs: resolve_task_threads, and for "auto" with more than
    one group, measured once per model structure, input shape, dtype and thread count (then
    cached): one batched support gradient over all tasks on the calling thread against the
    same gradient in groups on the workers. Tiny models lose: an MLP on sinusoid tasks ran
    1.5-2x slower in two groups (its operations take microseconds, and the groups take turns
    at the GIL); the Omniglot network's gradient took 0.5-0.9 times as long (two cores)."""
    n = resolve_task_threads(requested, fm.device, x.shape[0], batched)
    if requested != "auto" or n == 1:
        return n
    from .batching import _key

    key = _key(fm, x) + (n, torch.get_num_threads(), str(strategy))
    with _CHOICE_LOCK:
        if key not in _CHOICES:
            _CHOICES[key] = _measure(fm, theta, x, y, n, strategy)
        return _CHOICES[key]


def _measure(fm, theta, x, y, n, strategy) -> int:
    import time

    if _workers(n) is None:
        return 1
    T = x.shape[0]
    phi = theta.expand(T, -1) if theta.dim() == 1 else theta
    strategy = "vmap" if strategy == "auto" else strategy

    def one():
        fm.grad_and_losses(phi, x, y, strategy)

    def grouped():
        map_groups(lambda f, a, b: f.grad_and_losses(phi[a:b], x[a:b], y[a:b], strategy),
                   fm, T, n)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    one()  # warm-up
    t_one = timed(one)
    if t_one < _MIN_SECONDS:
        return 1
    grouped()  # warm-up
    t_groups = float("inf")
    for _ in range(_ROUNDS):
        t_one = min(t_one, timed(one))
        t_groups = min(t_groups, timed(grouped))
    return n if t_groups <= _MARGIN * t_one else 1


def clear_cache() -> None:
    _CHOICES.clear()


def groups(T: int, n: int) -> List[Tuple[int, int]]:
    """n contiguous task ranges covering [0, T), sizes differing by at most one, larger
    first."""
    base, extra = divmod(T, n)
    out, a = [], 0
    for i in range(n):
        b = a + base + (i < extra)
        out.append((a, b))
        a = b
    return out


def _sync_training_flags(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    for m_src, m_dst in zip(src.modules(), dst.modules()):
        m_dst.training = m_src.training


def worker_model(fm, i: int):
    """The FunctionalModel worker i runs: a shallow copy of fm (its own layer-mode flags),
    for i >= 1 over a deep copy of the module made once per fm and worker and given the
    module's current train/eval flags."""
    fm_i = copy.copy(fm)
    if i == 0:
        return fm_i
    copies = fm.__dict__.setdefault("_worker_modules", {})
    if i not in copies:
        copies[i] = copy.deepcopy(fm.model)
    _sync_training_flags(fm.model, copies[i])
    fm_i.model = copies[i]
    return fm_i


def map_groups(fn: Callable, fm, T: int, n: int, requested="auto") -> Tuple[list, int]:
    """([fn(fm_i, a, b) for each group (a, b) of groups(T, n)], the number of groups that
    ran): with n > 1 each group on a worker thread with one intra-op thread, the caller's
    grad mode carried over; with n == 1, or where workers cannot be used, fn(fm, 0, T) on
    the calling thread. An exception in any group is raised after every group has ended."""
    pool = _workers(n) if n > 1 else None
    if pool is None:
        return [fn(fm, 0, T)], 1
    try:
        models = [worker_model(fm, i) for i in range(n)]
    except Exception as e:  # a module that cannot be deep-copied
        if requested == "auto":
            return [fn(fm, 0, T)], 1
        raise ValueError(f"IMAMLConfig.task_threads={requested!r} needs a copy of the model per "
                         f"worker thread, but copy.deepcopy(model) failed ({e}): use "
                         f"task_threads=1") from e
    grad_mode = torch.is_grad_enabled()

    def run(i, a, b):
        with torch.set_grad_enabled(grad_mode):
            return fn(models[i], a, b)

    futures = [pool.pool.submit(run, i, a, b) for i, (a, b) in enumerate(groups(T, n))]
    wait(futures)
    return [f.result() for f in futures], n

"""Task groups on CPU threads: a meta-batch cut into contiguous groups of tasks, each group
run on its own worker thread, the caller's intra-op threads shared out between the groups.

Why: tasks are independent until the meta-gradient's final mean, and a single batched call
over all tasks leaves CPU cores idle. Every operation of a step is dispatched from one Python
thread (about 4,100 per Omniglot 5-way step), the cores wait while it does, and the late
convolutions (4x4 and 2x2 outputs) split poorly over cores. In groups, each group's dispatch
overlaps the other groups' compute. Two cores, Omniglot 5-way 1-shot, T = 32, 16 inner
steps, 5 CG steps, two groups of one thread against one call on two threads (in-process
A/Bs, 6-8 interleaved rounds): 8% and 6% less time per step, 15% with freed memory kept
(imaml_fast.cpu_memory); 20-way 11%; benchmarks/bench_meta_step.py has a one-group row.

When: "auto" runs two groups (each with half the caller's threads) where one batched
support gradient over all tasks takes at least _MIN_SECONDS on the caller, timed once per
model structure, input shape, dtype and thread count. Below that the operations are too
small: the groups take turns at the GIL and hand-offs cost more than the overlap wins. An
MLP on sinusoid tasks, two cores, whole steps in two groups against one call: 0.59x at
T = 32 (a gradient in 1.2 ms), 0.87x at 128 (1.9 ms), 0.97x at 256 (3.0 ms), 1.15x at 1024
(7.2 ms); the Omniglot network's gradients take 40-270 ms. Why not time the groups
themselves: their gain is the step's, not a gradient's (with freed memory kept, a gradient
and a product each took the same time in groups as in one call, the whole step 15% less).
Two groups, not one per thread: the groups' dispatch shares one GIL, and more than two were
only measured on two cores (four groups of one thread there: 5% against two groups' 8%).

What a worker runs is the engine's whole per-task computation for its group (inner solve,
query gradient, CG with its products), with its own shallow copy of the FunctionalModel
(the engine switches the model's layer modes during a pass; each copy switches its own) and,
from the second worker on, its own deep copy of the module (torch.func.functional_call
swaps parameters into the module it runs, so two threads cannot share one; the
hand-batched layers never touch it). Per-task numbers are the same computation whatever the
grouping, up to the floating-point rounding of the per-group batched calls (bit for bit the
same in every comparison so far).

Chunks (IMAMLConfig.task_chunk): map_chunks runs a call's tasks as consecutive chunks, each
in its groups, one chunk after another, so that at most a chunk's tasks are in flight.

Thread counts: PyTorch's CPU builds run ATen on OpenMP, whose thread count is per calling
thread. Each worker sets its own when it starts; the caller's count is restored. Where the
count turns out to be process-wide (a build without OpenMP), no worker pool is used and
everything runs on the calling thread.
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
    """n persistent worker threads, each with k intra-op threads."""

    def __init__(self, n: int, k: int):
        caller = torch.get_num_threads()
        ready = threading.Barrier(n + 1)

        def start():
            # ATen sets a thread's count from the process-wide record on the thread's first
            # query; query first, so that the caller's restore below cannot undo k
            torch.get_num_threads()
            torch.set_num_threads(k)
            ready.wait(timeout=60)

        self.n, self.k = n, k
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
        self.per_thread = worker_counts == {k} and torch.get_num_threads() == caller

    def shutdown(self):
        self.pool.shutdown(wait=True)


def threads_per_group(n: int) -> int:
    """The intra-op threads each of n groups runs with: the caller's shared out, at least 1."""
    return max(1, torch.get_num_threads() // n)


def _workers(n: int) -> Optional[_Workers]:
    """The pool for n groups (n workers of threads_per_group(n) threads); None where
    per-thread counts are not available."""
    global _POOL, _UNUSABLE
    k = threads_per_group(n)
    with _LOCK:
        if _UNUSABLE is not None:
            return None
        if _POOL is None or _POOL.n < n or _POOL.k != k:
            if _POOL is not None:  # its queued work still runs; its threads then end
                _POOL.pool.shutdown(wait=False)
            _POOL = _Workers(n, k)  # restores the caller's count whatever it finds
            if not _POOL.per_thread:
                _POOL.shutdown()
                _POOL = None
                _UNUSABLE = ("this PyTorch build keeps one intra-op thread count for the whole "
                             "process (no OpenMP), so workers cannot each run on their own")
                return None
        return _POOL


def thread_state_active() -> Optional[str]:
    """What the caller has active that is kept per thread, so that work on workers would
    escape it, or None: a TorchFunctionMode or TorchDispatchMode (an op counter, a FLOP
    counter), saved-tensor hooks (a memory meter, save_on_cpu), autocast, inference mode,
    torch.profiler (which records the calling thread's operations only). PyTorch has no public query for
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
    if torch.is_inference_mode_enabled():
        return "inference mode"
    enabled = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)
    if enabled is not None and enabled():
        return "the profiler"  # it records the calling thread's operations only
    return None


# "auto" runs this many groups at most (see the module's docstring)
AUTO_MAX_GROUPS = 2


def groupable(config, backend) -> bool:
    """Whether a computation with this config (an IMAMLConfig) and backend can run in groups
    at all: a batched backend (the reference path is sequential by design) and no
    forward-mode AD (hvp="fwdrev": torch keeps one dual level for the whole process, so two
    threads' jvp calls would enter and leave each other's level; IMAMLConfig refuses an int
    task_threads above 1 with it)."""
    return backend.batched and config.hvp != "fwdrev"


def resolve_task_threads(requested, device: torch.device, T: int, groupable: bool) -> int:
    """How many groups of tasks can run concurrently: 1 off the CPU, where not groupable(),
    for a single task, and for "auto" while thread_state_active() or on one torch thread; else min(requested, T), "auto" meaning min(torch.get_num_threads(),
    AUTO_MAX_GROUPS). An int asks for groups whatever is active: modes, hooks and autocast
    then see the calling thread's work only."""
    if requested == 1 or T < 2 or not groupable:
        return 1
    if device.type != "cpu":
        if requested == "auto":
            return 1
        raise ValueError(f"IMAMLConfig.task_threads={requested!r} runs groups of tasks on CPU "
                         f"threads, but the model is on {device.type}: use 'auto' or 1 there")
    if requested == "auto":
        if thread_state_active() is not None:
            return 1
        requested = min(torch.get_num_threads(), AUTO_MAX_GROUPS)
    return max(1, min(int(requested), T))


# "auto" keeps one call where one batched gradient over all tasks takes less (see the
# module's docstring for the measurements behind it)
_MIN_SECONDS = 0.005
_CHOICES: Dict[Tuple, int] = {}
_CHOICE_LOCK = threading.Lock()


def choose_task_threads(requested, fm, theta, x, y, groupable: bool,
                        strategy="vmap") -> int:
    """The number of groups a call runs: resolve_task_threads, and for "auto" with more than
    one group, one call where a batched support gradient over all tasks (the best of three
    after a warm-up, on the caller) takes less than _MIN_SECONDS; timed once per model
    structure, input shape, dtype and thread count, then cached."""
    n = resolve_task_threads(requested, fm.device, x.shape[0], groupable)
    if requested != "auto" or n == 1:
        return n
    from .batching import _key

    key = _key(fm, x) + (n, torch.get_num_threads(), str(strategy))
    with _CHOICE_LOCK:
        if key not in _CHOICES:
            _CHOICES[key] = n if _gradient_seconds(fm, theta, x, y, strategy) >= _MIN_SECONDS else 1
        return _CHOICES[key]


def _gradient_seconds(fm, theta, x, y, strategy) -> float:
    from .batching import _best_of

    phi = theta.expand(x.shape[0], -1) if theta.dim() == 1 else theta
    strategy = "vmap" if strategy == "auto" else strategy

    def gradient():
        fm.grad_and_losses(phi, x, y, strategy)

    gradient()  # warm-up
    return _best_of(gradient, x.device, 3)


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
    ran): with n > 1 each group on a worker thread with threads_per_group(n) intra-op
    threads, the caller's grad mode carried over; with n == 1, or where workers cannot be used, fn(fm, 0, T) on
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


def chunk_ranges(T: int, chunk: Optional[int]) -> List[Tuple[int, int]]:
    """The task ranges IMAMLConfig.task_chunk runs one after another: [(0, T)] for None,
    else ceil(T / chunk) contiguous ranges of at most chunk tasks, sizes differing by at most
    one (T = 10, chunk = 4: 4, 3, 3)."""
    if chunk is None or chunk >= T:
        return [(0, T)]
    return groups(T, -(-T // chunk))


def map_chunks(fn: Callable, fm, theta, x, y, config, backend,
               chunk: Optional[int]) -> Tuple[List[list], int]:
    """How a call schedules its T tasks: the chunks of chunk_ranges(T, chunk) one after
    another (IMAMLConfig.task_chunk), and inside each chunk the groups that
    choose_task_threads picks for it, through map_groups. fn(fm_i, a, b) computes tasks
    [a, b) of the whole batch. Returns each chunk's list of group results, in task order,
    and the number of groups the last chunk ran."""
    out, n = [], 1
    for c0, c1 in chunk_ranges(x.shape[0], chunk):
        th = theta if theta.dim() == 1 else theta[c0:c1]
        n = choose_task_threads(config.task_threads, fm, th, x[c0:c1], y[c0:c1],
                                groupable(config, backend), config.task_batching)
        parts, n = map_groups(lambda fm_i, a, b, c0=c0: fn(fm_i, c0 + a, c0 + b), fm, c1 - c0,
                              n, config.task_threads)
        out.append(parts)
    return out, n

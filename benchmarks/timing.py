"""Interleaved timing with every variant in its own process.

Two things spoil a ratio of timings on a shared machine: the machine's speed drifts (another
job starts), and variants run in one process can change each other's speed (allocator state,
thread pools, caches: the sequential reference measured 1.84 s alone and about 6% slower after
the batched variants had run in the same process). Running the variants interleaved, one call
of each per round, spreads the drift over all of them; running each in a process of its own
keeps them from touching each other. `time_in_processes` does both: one spawned worker per
variant builds it (through a picklable factory), warms it up and then times one call whenever
the parent asks, round after round. What neither removes: per-task loops (the reference, the
peers) vary more with the machine's load than batched code, from run to run.

The CPU allocator: `imaml-fast train` and `eval` run with `keep_freed_cpu_memory()` (glibc
keeps freed blocks in the process instead of mapping fresh pages for every large temporary).
The workers here keep glibc's defaults unless asked (`malloc="keep"` for all of them, or a
{name: setting} dict for an A/B of the setting itself, interleaved like everything else):
the peers' users get the defaults, and what the setting does to each implementation is a
measurement of its own (bench_meta_step.py --malloc-ab).
"""
from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple, Union


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing for the CPU or device None."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


MALLOC_CHOICES = ("keep", "default")


def _check_malloc(malloc: str) -> None:
    if malloc not in MALLOC_CHOICES:
        raise ValueError(f"malloc={malloc!r}: expected one of {MALLOC_CHOICES}")


def apply_malloc(malloc: str) -> bool:
    """Put this process on the allocator setting `malloc` ("keep": keep_freed_cpu_memory(),
    "default": leave it). Returns whether the kept-memory settings are in effect."""
    _check_malloc(malloc)
    if malloc == "default":
        return False
    from imaml_fast.cpu_memory import keep_freed_cpu_memory

    return keep_freed_cpu_memory()


def _serve(conn, factory, args, threads, device, malloc="default"):
    import torch

    apply_malloc(malloc)  # before the variant allocates anything large
    if threads:
        torch.set_num_threads(threads)
    if conn.recv() == "stop":  # started early, so that the imports overlap; now wait our turn
        return
    try:
        fn = factory(*args)
        info = fn()  # warm-up; the callable may return a small dict describing what ran
        sync(device)
        conn.send(("ready", info if isinstance(info, dict) else None))
    except BaseException as e:  # reported by the parent, which goes on without this variant
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
        return
    while True:
        if conn.recv() == "stop":
            return
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        conn.send(("time", time.perf_counter() - t0))


def time_in_processes(factories: Dict[str, Tuple[Callable, tuple]], repeats: int,
                      threads: Optional[int] = None, device: Optional[str] = None,
                      log: Callable[[str], None] = print,
                      malloc: Union[str, Dict[str, str]] = "default"
                      ) -> Tuple[Dict[str, List[float]], Dict[str, Optional[dict]]]:
    """factories: {name: (factory, args)}, factory(*args) -> a zero-argument callable (a
    module-level function, so that a spawned process can import it). Returns ({name: the
    `repeats` timings}, {name: what its warm-up call returned}); a variant whose build or
    warm-up fails is reported through `log` and left out. malloc: the workers' CPU allocator
    setting (module docstring), one for all or {name: setting} (names left out: "default")."""
    per = malloc if isinstance(malloc, dict) else {name: malloc for name in factories}
    for m in per.values():
        _check_malloc(m)
    ctx = mp.get_context("spawn")
    infos, live, started = {}, {}, {}
    try:
        # Every process starts at once (importing torch and the benchmark overlaps), then
        # builds and warms up one at a time: warm-ups side by side would oversubscribe the
        # cores and disturb the one-off measurements some make (task_batching="auto").
        for name, (factory, args) in factories.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, factory, args, threads, device,
                                                     per.get(name, "default")),
                               daemon=True)
            proc.start()
            started[name] = (proc, parent)
        for name, (proc, parent) in started.items():
            parent.send("build")
            kind, payload = parent.recv()
            if kind == "error":
                log(f"{name:26s} FAILED: {payload}")
                proc.join()
                continue
            infos[name] = payload
            live[name] = (proc, parent)
    except BaseException:
        _stop(started.values())
        raise
    times = {name: [] for name in live}
    try:
        for rep in range(repeats):
            for name, (_, conn) in live.items():
                conn.send("run")
                times[name].append(conn.recv()[1])
            log(f"  round {rep + 1}/{repeats}: " +
                ", ".join(f"{n} {times[n][-1]:.2f}s" for n in live))
    finally:
        _stop(live.values())
    return times, infos


def _stop(workers) -> None:
    for proc, conn in workers:
        try:
            conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        proc.join(timeout=60)

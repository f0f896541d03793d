"""Task-parallel meta-training over torch.distributed.

The meta-batch is split across ranks: each rank adapts to its own tasks and solves their
implicit systems, then one all-reduce of [sum of task meta-gradients, task count, non-finite
count] gives every rank the exact mean over all tasks (weighted by tasks, so uneven shards
are fine) and the same verdict on finiteness, so either every rank steps or every rank
raises. NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Optional, Union

import torch
import torch.distributed as dist


def enabled(group=None) -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group=None):
    if not enabled(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(T: int, rank: int, world: int) -> slice:
    """The contiguous share of T tasks that `rank` of `world` takes (sizes differ by <= 1)."""
    base, extra = divmod(T, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def reduce_meta_gradient(task_grads: torch.Tensor, bad: torch.Tensor, group=None):
    """(global mean meta-gradient [P], global count of non-finite tasks) from this rank's
    [T_local, P] task meta-gradients and [T_local] non-finite flags, in one all-reduce."""
    acc = torch.float64 if task_grads.dtype == torch.float64 else torch.float32
    buf = torch.cat([torch.nan_to_num(task_grads.to(acc)).sum(0),
                     torch.tensor([task_grads.shape[0], bad.sum().item()], dtype=acc,
                                  device=task_grads.device)])
    if enabled(group):
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    n = buf[-2]
    return (buf[:-2] / n).to(task_grads.dtype), int(buf[-1].item())


@contextmanager
def local_rendezvous():
    """An init_method for processes on this machine: a file:// store in a fresh temporary
    file, removed afterwards. Unlike a port found free and handed to the workers, nothing
    else can take it before they start."""
    fd, path = tempfile.mkstemp(prefix="imaml_fast_rendezvous_")
    os.close(fd)
    try:
        yield "file://" + path
    finally:
        if os.path.exists(path):
            os.remove(path)


def init_local(rank: int, world: int, rendezvous: Union[str, int], device: str = "cpu") -> None:
    """Join a process group of `world` local processes (gloo on CPU, NCCL on CUDA).
    rendezvous: an init_method such as local_rendezvous() gives ("file://...", "tcp://..."),
    or a TCP port on 127.0.0.1."""
    if isinstance(rendezvous, int):
        rendezvous = f"tcp://127.0.0.1:{rendezvous}"
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        # Local CPU ranks share the cores: more threads than cores makes OpenMP threads spin
        # against each other (tens of times slower on 2 cores).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world)


def shutdown(group=None) -> None:
    """Leave the process group once every rank is done. Without the barrier a rank that
    finishes first tears gloo down while the others still talk to it, which can abort the
    process ("terminate called without an active exception")."""
    if enabled(group):
        dist.barrier(group)
        dist.destroy_process_group()


def end_worker(group=None) -> None:
    """The last call of a spawned worker whose work is done and saved: shutdown(), then leave
    the process without running C++ static destructors. Even after the barrier and
    destroy_process_group, a gloo process sometimes aborts at interpreter teardown
    ("terminate called without an active exception", about 1 run in 8 of the two-process
    tests, with a TCP or a file rendezvous alike), which the parent would report as a failed
    run although every result was already written."""
    import sys

    shutdown(group)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


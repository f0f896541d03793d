"""benchmarks/timing.py: every timed worker runs in a process of its own with the CPU
allocator setting asked for (the benchmarks' ratios depend on it): glibc's defaults unless
told, one setting for all, or one per worker for an A/B of the setting."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timing  # noqa: E402


def _allocator_probe(tag):
    """A variant factory (module level: the spawned worker imports it) whose call reports
    what the worker's environment says about its allocator."""
    def run():
        return {"tag": tag, "pid": os.getpid(),
                "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    return run


def _kept():
    """What a worker with malloc="keep" shows: glibc's variable at 32 MiB (where mallopt
    exists)."""
    from imaml_fast.cpu_memory import _mallopt

    return str(32 << 20) if _mallopt() is not None else None


@pytest.mark.parametrize("malloc", timing.MALLOC_CHOICES + (None,))
def test_workers_get_the_allocator_setting_and_their_own_process(malloc, monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("IMAML_FAST_MALLOC", raising=False)
    kw = {} if malloc is None else {"malloc": malloc}  # None: the default, glibc's
    times, infos = timing.time_in_processes(
        {"a": (_allocator_probe, ("a",)), "b": (_allocator_probe, ("b",))}, repeats=2,
        threads=1, log=lambda m: None, **kw)
    assert sorted(times) == ["a", "b"] and all(len(t) == 2 for t in times.values())
    assert all(x >= 0 for t in times.values() for x in t)
    assert infos["a"]["tag"] == "a" and infos["b"]["tag"] == "b"
    pids = {infos["a"]["pid"], infos["b"]["pid"], os.getpid()}
    assert len(pids) == 3
    # keep_freed_cpu_memory() in the worker exports glibc's variables (32 MiB threshold);
    # "default" leaves the environment as it was
    expected = _kept() if malloc == "keep" else None
    assert infos["a"]["mmap_threshold"] == infos["b"]["mmap_threshold"] == expected
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # the parent is left alone


def test_allocator_setting_per_worker(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    _, infos = timing.time_in_processes(
        {"kept": (_allocator_probe, ("kept",)), "plain": (_allocator_probe, ("plain",)),
         "unnamed": (_allocator_probe, ("unnamed",))}, repeats=1, threads=1,
        log=lambda m: None, malloc={"kept": "keep", "plain": "default"})
    assert infos["kept"]["mmap_threshold"] == _kept()
    assert infos["plain"]["mmap_threshold"] is None and infos["unnamed"]["mmap_threshold"] is None


@pytest.mark.parametrize("malloc", ["big", {"a": "big"}])
def test_unknown_allocator_setting_is_refused_before_any_process_starts(malloc):
    with pytest.raises(ValueError, match="malloc='big'.*keep"):
        timing.time_in_processes({"a": (_allocator_probe, ("a",))}, 1, malloc=malloc)

"""benchmarks/timing.py: every timed worker runs in a process of its own with the CPU
allocator setting asked for, the same for all (the benchmarks' ratios depend on it)."""
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


@pytest.mark.parametrize("malloc", timing.MALLOC_CHOICES)
def test_workers_get_the_allocator_setting_and_their_own_process(malloc, monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("IMAML_FAST_MALLOC", raising=False)
    times, infos = timing.time_in_processes(
        {"a": (_allocator_probe, ("a",)), "b": (_allocator_probe, ("b",))}, repeats=2,
        threads=1, log=lambda m: None, malloc=malloc)
    assert sorted(times) == ["a", "b"] and all(len(t) == 2 for t in times.values())
    assert all(x >= 0 for t in times.values() for x in t)
    assert infos["a"]["tag"] == "a" and infos["b"]["tag"] == "b"
    pids = {infos["a"]["pid"], infos["b"]["pid"], os.getpid()}
    assert len(pids) == 3
    # keep_freed_cpu_memory() in the worker exports glibc's variables (32 MiB threshold);
    # "default" leaves the environment as it was
    from imaml_fast.cpu_memory import _mallopt

    expected = str(32 << 20) if malloc == "keep" and _mallopt() is not None else None
    assert infos["a"]["mmap_threshold"] == infos["b"]["mmap_threshold"] == expected
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # the parent is left alone


def test_unknown_allocator_setting_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="malloc='big'.*keep"):
        timing.time_in_processes({"a": (_allocator_probe, ("a",))}, 1, malloc="big")

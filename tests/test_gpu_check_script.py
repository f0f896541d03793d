"""benchmarks/gpu_check.sh is run when a GPU is at hand, often with little time on it: every
benchmark it calls must accept the flags it passes (checked against each script's --help),
and the shell must parse."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _invocations():
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = re.findall(r"(?:python3?|\$PY) (benchmarks/\w+\.py)([^|\n]*)", text)
    return [(path, sorted(set(re.findall(r"(--[\w-]+)", args)))) for path, args in calls]


def test_shell_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_benchmark_it_calls_exists():
    calls = _invocations()
    assert len(calls) >= 4
    for path, _ in calls:
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("path,flags", _invocations(), ids=lambda v: v if isinstance(v, str) else "")
def test_benchmark_accepts_the_flags_the_check_passes(path, flags):
    out = subprocess.run([sys.executable, str(ROOT / path), "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in flags:
        assert flag in out.stdout, f"{path} has no {flag} option"

"""What every comparison script shares: settings, random episodes, flat gradients, run
metadata, timing and result files.

An implementation ("impl") is a callable  impl(xs, ys, xq, yq) -> Result  for a meta-batch
x [T, N, ...], y [T, N]; Result.grad is the meta-gradient (mean over tasks) as one flat [P]
vector in model.named_parameters() order, Result.phi the adapted parameters [T, P] where the
implementation exposes them (None otherwise).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "results", "cpu-epyc-2core")


def results_dir(device="cpu") -> str:
    """benchmarks/results/<device>/: this CPU's folder, or one named after the GPU."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device)).replace(" ", "-")
        return os.path.join(os.path.dirname(RESULTS_DIR), name)
    return RESULTS_DIR


@dataclass(frozen=True)
class Settings:
    """One iMAML-GD setting, shared by every implementation of a comparison."""

    inner_steps: int = 16
    inner_lr: float = 0.1
    lam: float = 2.0
    cg_steps: int = 5
    cg_tol: float = 1e-10     # relative residual tolerance, where the implementation has one

    def to_dict(self):
        return asdict(self)


@dataclass
class Result:
    grad: torch.Tensor                    # [P] meta-gradient, mean over tasks
    phi: Optional[torch.Tensor] = None    # [T, P] adapted parameters, if exposed
    info: Optional[dict] = None           # what ran (backend, solver, ...)


Impl = Callable[..., Result]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def flat_tasks(per_task: List[List[torch.Tensor]]) -> torch.Tensor:
    """[[tensor per parameter] per task] -> [T, P]."""
    return torch.stack([flat(ts) for ts in per_task])


def omniglot_episode(T: int, n_way: int, shots: int = 1, queries: int = 1, seed: int = 0,
                     dtype=torch.float32):
    """Random 28x28 'images' with balanced labels, the shapes of an Omniglot meta-batch."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n_way * shots, 1, 28, 28, generator=g, dtype=dtype)
    xq = torch.randn(T, n_way * queries, 1, 28, 28, generator=g, dtype=dtype)
    ys = torch.arange(n_way).repeat_interleave(shots).expand(T, -1).contiguous()
    yq = torch.arange(n_way).repeat_interleave(queries).expand(T, -1).contiguous()
    return xs, ys, xq, yq


def sinusoid_episode(T: int, shots: int = 10, queries: int = 10, seed: int = 0,
                     dtype=torch.float64):
    """MAML's sinusoid regression: amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]."""
    g = torch.Generator().manual_seed(seed)
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=g, dtype=dtype)
    phase = torch.pi * torch.rand(T, 1, 1, generator=g, dtype=dtype)
    xs = -5 + 10 * torch.rand(T, shots, 1, generator=g, dtype=dtype)
    xq = -5 + 10 * torch.rand(T, queries, 1, generator=g, dtype=dtype)
    return xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def git_revision() -> Optional[str]:
    """The checkout's commit, with "-dirty" when tracked files other than results differ from
    it (a figure made from uncommitted code says so)."""
    try:
        root = os.path.dirname(RESULTS_DIR)
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        rev = out.stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=root, capture_output=True, text=True, timeout=10)
        changed = [line[3:] for line in status.stdout.splitlines()
                   if not line[3:].startswith("benchmarks/results/")]
        return f"{rev}-dirty" if rev and changed else rev
    except Exception:
        return None


def run_meta(script: str, settings: Dict, device: str = "cpu") -> Dict:
    """Where and with what a figure was made; recorded in every result file."""
    import imaml_fast

    meta = {
        "script": script, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": str(device), "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "imaml_fast": imaml_fast.__version__,
        "git": git_revision(),
        "peers": {p: package_version(p) for p in ("torchopt", "betty-ml", "higher")},
        "settings": settings,
    }
    if torch.device(device).type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(torch.device(device))
        meta["cuda"] = torch.version.cuda
    return meta


def meta_line(meta: Dict) -> str:
    where = (f"{meta['gpu']} (CUDA {meta['cuda']})" if meta.get("gpu") else
             f"{meta['cpu']} ({meta['cpu_count']} cores), torch threads = {meta['threads']}")
    return f"{where}, torch {meta['torch']}, imaml_fast {meta['imaml_fast']}, {meta['date']}"


def bullet_list(lines) -> str:
    lines = list(lines)
    return ("\n" + "\n".join(f"- {m}" for m in lines) + "\n") if lines else ""


def write_json(name: str, payload: Dict, out_dir: str = RESULTS_DIR) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return path


def write_text(name: str, text: str, out_dir: str = RESULTS_DIR) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def write_results(json_path: str, payload: Dict, md: str) -> None:
    """A script's --json: the raw results at json_path and the markdown table beside it."""
    out_dir, name = os.path.split(os.path.abspath(json_path))
    write_json(name, payload, out_dir)
    write_text(name.rsplit(".", 1)[0] + ".md", md, out_dir)


def child_json(cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None) -> Dict:
    """Run a benchmark's child process (cmd, with env added to this process's environment):
    the last line of its output that starts with "{", as a dict; {"error": the end of its
    stderr (else stdout)} where it failed or printed no such line."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(lines[-1])


def write_figure_files(name: str, payload: Dict, markdown, plot, out_dir: str,
                       raw: bool = True) -> None:
    """A figure script's files in out_dir: name.json (the raw payload; raw=False, as for
    --replot, keeps the one there), name.md (markdown(payload)) and name.png
    (plot(payload, path), which returns None where matplotlib is missing); each path
    printed."""
    if raw:
        print("\nwrote", write_json(name + ".json", payload, out_dir))
    print("wrote", write_text(name + ".md", markdown(payload), out_dir))
    png = plot(payload, os.path.join(out_dir, name + ".png"))
    if png:
        print("wrote", png)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return None


def save_figure(fig, path, meta, fontsize=7):
    """Title a result figure with its run's metadata line, write it as PNG, close it."""
    plt = pyplot()
    fig.suptitle(meta_line(meta), fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def median(xs: List[float]) -> float:
    return statistics.median(xs)

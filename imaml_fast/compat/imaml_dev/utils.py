"""Helpers of the iMAML authors' `implicit_maml.utils`, re-implemented from its public API.

Differences from the authors' module (all keep their call signatures and return values):

- cg_solve starts at x = 0 without a matrix-vector product when x_init is None (the authors'
  version evaluates f_Ax(0) first, one wasted Hessian-vector product per task); it returns
  the same x, computes the verbose objective from the residual instead of one more product
  per iteration, and returns 0 for b = 0 where the authors' version divides 0 by 0.
- to_tensor raises TypeError on unsupported input (the authors' prints and returns None).
- save_data and DataLog.save_log write through a temporary file and os.replace, so an
  interrupted save never leaves a truncated pickle or CSV behind; plots need matplotlib, which
  is imported only when a plot is asked for (no global backend switch).
- DataLog.read_log parses cells with ast.literal_eval, not eval (a log file cannot run code),
  keeps cells that are not Python literals as strings, and updates max_len.
- measure_accuracy returns a percentage, as the authors' does (100.0 = all correct).
"""
from __future__ import annotations

import ast
import csv
import os
import pickle
import tempfile
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["to_cuda", "to_tensor", "to_device", "to_numpy", "cg_solve", "smooth_vector",
           "save_data", "measure_accuracy", "DataLog"]


# ---- tensors ---------------------------------------------------------------------------------
def to_tensor(x, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """numpy array -> float32 tensor (the authors' convention; `dtype` overrides it); a tensor
    is returned as it is (cast only if `dtype` is given); lists and numbers go through numpy."""
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    if isinstance(x, (list, tuple, int, float, np.generic)):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32 if dtype is None else dtype)
    raise TypeError(f"to_tensor: expected a numpy array or a torch tensor, got {type(x).__name__}")


def to_cuda(x) -> torch.Tensor:
    return to_tensor(x).cuda()


def to_device(x, GPU=False) -> torch.Tensor:
    """to_tensor(x) moved to the GPU when GPU is True. GPU may also be a device ('cuda:1',
    torch.device('cpu')); False or None keeps the tensor where it is."""
    t = to_tensor(x)
    if GPU is True:
        return t.cuda()
    if GPU is False or GPU is None:
        return t
    return t.to(GPU)


def to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ---- conjugate gradient ------------------------------------------------------------------------
def _dot(a, b):
    return a.dot(b) if isinstance(a, np.ndarray) else torch.dot(a.reshape(-1), b.reshape(-1))


def cg_solve(f_Ax: Callable, b, cg_iters: int = 10, callback: Optional[Callable] = None,
             verbose: bool = False, residual_tol: float = 1e-10, x_init=None):
    """Solve A x = b for one flat vector b (torch tensor or numpy array) by classic conjugate
    gradient; f_Ax(v) = A v must be symmetric positive definite (damp it inside f_Ax).

    Stops after cg_iters iterations or once r.r < residual_tol (an absolute bound on the
    squared residual, as in the authors' code). Products of A: exactly one per iteration, plus
    one for b - A x_init when x_init is given; none for x_init=None (x = 0, r = b).
    callback(x) is called before every iteration and once at the end.
    """
    if isinstance(b, torch.Tensor):
        if x_init is None:
            x, r = torch.zeros_like(b), b.clone()
        else:
            x = to_tensor(x_init).to(device=b.device, dtype=b.dtype)
            r = b - f_Ax(x)
        p = r.clone()
    elif isinstance(b, np.ndarray):
        if x_init is None:
            x, r = np.zeros_like(b), b.copy()
        else:
            x = np.asarray(x_init, dtype=b.dtype)
            r = b - f_Ax(x)
        p = r.copy()
    else:
        raise TypeError(f"cg_solve: b must be a torch tensor or a numpy array, got {type(b).__name__}")
    if verbose:
        print("%10s %10s %10s %10s" % ("iter", "residual norm", "soln norm", "obj fn"))
    rdotr = _dot(r, r)
    done = float(rdotr) == 0.0  # exact already: a step would divide 0 by 0
    i = 0
    for i in range(cg_iters):
        if done:
            break
        if callback is not None:
            callback(x)
        if verbose:
            _print_row(i, x, b, r, rdotr)
        Ap = f_Ax(p)
        alpha = rdotr / _dot(p, Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        newrdotr = _dot(r, r)
        p = r + (newrdotr / rdotr) * p
        rdotr = newrdotr
        val = float(newrdotr)  # the one host sync per iteration, as in the authors' loop
        if val < residual_tol or val == 0.0:
            break
    if callback is not None:
        callback(x)
    if verbose:
        _print_row(i, x, b, r, rdotr)
    return x


def _print_row(i, x, b, r, rdotr):
    # f(x) = 1/2 x'Ax - b'x with Ax = b - r: no extra product.
    obj = -0.5 * float(_dot(x, b + r))
    norm_x = float(np.linalg.norm(x)) if isinstance(x, np.ndarray) else float(torch.norm(x))
    print("%10i %10.3g %10.3g %10.3g" % (i, float(rdotr), norm_x, obj))


# ---- curves, files, accuracy -------------------------------------------------------------------
def smooth_vector(vec, window_size: int = 25) -> np.ndarray:
    """Trailing moving average over rows (the authors' smoothing of loss curves): row i becomes
    the mean of rows [i - window_size, i); the first window_size rows are kept as they are.
    A vector shorter than the window gets row i = mean of rows [0, max(i, 1)) (the authors'
    version gives NaN for row 0 there). 1-D input is smoothed the same way."""
    vec = np.asarray(vec)
    svec = vec.astype(np.result_type(vec.dtype, np.float64), copy=True)
    n = vec.shape[0]
    if n < window_size:
        for i in range(n):
            svec[i] = np.mean(vec[:max(i, 1)], axis=0)
    else:
        for i in range(window_size, n):
            svec[i] = np.mean(vec[i - window_size:i], axis=0)
    return svec


def _atomic_write(path: str, write: Callable, mode: str = "wb") -> None:
    """Write `path` through a temporary file in the same directory and os.replace: readers see
    the old file or the new one, never a partial one; on error the old file stays."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        kwargs = {"newline": ""} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_data(agent, train_curve, other_data, save_file: str, itr=None, plot: bool = True):
    """Pickle dict(agent=agent, losses=train_curve, other_data=other_data) to
    save_file + '.pickle' (atomically) and, if plot and matplotlib is installed, plot the
    smoothed curve (first itr rows) to save_file + '.png'."""
    data = dict(agent=agent, losses=train_curve, other_data=other_data)
    _atomic_write(save_file + ".pickle", lambda f: pickle.dump(data, f))
    if not plot:
        return
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curve = np.asarray(train_curve)
    ax.plot(smooth_vector(curve[:itr] if itr is not None else curve), lw=2)
    ax.set_xlabel("Meta (outer) iterations")
    ax.set_ylabel("Loss")
    ax.set_ylim([0.0, 5.0])
    _atomic_write(save_file + ".png", lambda f: fig.savefig(f, format="png", dpi=100))


def measure_accuracy(task, model, train: bool = False) -> float:
    """Percentage (0 to 100) of argmax predictions equal to the labels on the task's train
    split (train=True) or validation split. model: a Learner (anything with
    .predict(x, return_numpy=True)) or a plain nn.Module."""
    x, y = (task["x_train"], task["y_train"]) if train else (task["x_val"], task["y_val"])
    if hasattr(model, "predict"):
        y_hat = model.predict(x, return_numpy=True)
    else:
        with torch.no_grad():
            y_hat = to_numpy(model(x))
    correct = np.sum(np.argmax(y_hat, axis=1) == to_numpy(y).reshape(-1))
    return float(correct) * 100.0 / y.shape[0]


class DataLog:
    """Key -> list-of-values log, saved as log.pickle and log.csv (one column per key, one
    row per logged entry; shorter columns leave trailing cells empty)."""

    def __init__(self):
        self.log = {}
        self.max_len = 0

    def log_exp_args(self, parsed_args) -> None:
        for k, v in vars(parsed_args).items():
            self.log_kv(k, v)

    def log_kv(self, key, value) -> None:
        self.log.setdefault(key, []).append(value)
        self.max_len = max(self.max_len, len(self.log[key]))

    def get_current_log(self) -> dict:
        return {k: v[-1] for k, v in self.log.items() if v}

    def shrink_to(self, num_entries: int) -> None:
        """Keep the first num_entries values of every key (to resume from a checkpoint)."""
        for k in self.log:
            self.log[k] = self.log[k][:num_entries]
        self.max_len = max((len(v) for v in self.log.values()), default=0)

    def save_log(self, save_path: Optional[str] = None) -> None:
        """Write save_path/log.pickle and save_path/log.csv, each atomically. save_path
        defaults to the last logged 'save_dir' (as in the authors' scripts)."""
        if save_path is None:
            if not self.log.get("save_dir"):
                raise ValueError("save_log: pass save_path, or log a 'save_dir' first")
            save_path = self.log["save_dir"][-1]
        os.makedirs(save_path, exist_ok=True)
        _atomic_write(os.path.join(save_path, "log.pickle"), lambda f: pickle.dump(self.log, f))
        keys = list(self.log)
        rows = max((len(v) for v in self.log.values()), default=0)

        def write_csv(f):
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for row in range(rows):
                writer.writerow({k: self.log[k][row] for k in keys if row < len(self.log[k])})

        _atomic_write(os.path.join(save_path, "log.csv"), write_csv, mode="w")

    def read_log(self, log_path: str) -> dict:
        """Load a log.csv written by save_log (or the directory holding it) into self.log.
        Empty cells are skipped, so each key gets back the list it had."""
        if os.path.isdir(log_path):
            log_path = os.path.join(log_path, "log.csv")
        with open(log_path, newline="") as f:
            reader = csv.DictReader(f)
            data = {k: [] for k in (reader.fieldnames or [])}
            for row in reader:
                for k in data:
                    cell = row.get(k)
                    if cell is None or cell == "":
                        continue
                    try:
                        data[k].append(ast.literal_eval(cell))
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        data[k].append(cell)
        self.log = data
        self.max_len = max((len(v) for v in data.values()), default=0)
        return data

"""IMAMLConfig: every knob of the engine, validated when it is built.

A bad value raises ValueError naming the field, the value and what is allowed, so a typo in a
sweep fails at construction and not twenty minutes into training.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

INNER_SOLVERS = ("gd", "gd_armijo", "agd", "hf")
HVP_MODES = ("auto", "fwdrev", "revrev")
TASK_BATCHING = ("auto", "vmap", "loop")
CG_DENSE = ("auto", "never", "always")
AMP = ("none", "bf16", "fp16")
LAYER_DERIVATIVES = ("closed_form", "autograd")
LAYER_BATCHING = ("auto", "vmap")


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"IMAMLConfig.{field}={value!r} is invalid: {allowed}")


def _check_int(field, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, value, f"expected an int >= {minimum}")
    if value < minimum:
        _fail(field, value, f"expected an int >= {minimum}")


def _check_real(field, value, *, positive=False, nonneg=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, value, "expected a finite real number")
    if positive and not value > 0:
        _fail(field, value, "expected a number > 0")
    if nonneg and value < 0:
        _fail(field, value, "expected a number >= 0")


@dataclass(frozen=True)
class IMAMLConfig:
    """Settings of one iMAML meta-gradient computation.

    inner_solver: "gd" (iMAML-GD: `inner_steps` proximal gradient steps of size `inner_lr`),
        "gd_armijo" (the same steps, each kept only where it decreases the task's regularised
        objective enough; a rejected step halves that task's step size, a kept one lets it
        grow back towards `inner_lr`: stays convergent where the fixed step does not, see
        imaml_fast.inner; every preset of `imaml-fast train` uses it, while the default here
        stays the paper's "gd", the algorithm the speed comparisons measure), "agd" (the same
        line search with Nesterov momentum and adaptive restart, the objective never rising:
        one loss evaluation more per step, and on the Omniglot network far closer to the
        minimiser in the same steps, see imaml_fast.inner.inner_agd; at the paper's lam = 2
        that trained worse, imaml_fast/presets.py says why) or "hf"
        (iMAML-HF: `inner_steps` Hessian-free Newton steps, each solving (H + lam I) d = grad
        with `hf_cg_steps` CG iterations, then a backtracking line search of at most
        `hf_ls_steps` halvings).
    inner_lr: the GD step size. The default 0.03 is the Omniglot presets' value: with 0.1 the
        inner loop of the paper's Omniglot network stops converging as meta-training sharpens
        it (imaml_fast/presets.py has the measurements).
    lam: strength of the proximal term lam/2 ||phi - theta||^2 (the paper's lambda).
    inner_tol: with inner_solver="gd_armijo", stop a task's inner loop as soon as its inner
        residual ||grad F_i(phi_i)|| / ||grad F_i(theta)|| (MetaGradient.inner_residual) is
        at most inner_tol; `inner_steps` is then the most steps a task takes, and
        MetaGradient.inner_steps says how many each took. Finished tasks leave the batch, so
        later steps cost less. The implicit gradient assumes a solved inner problem: as
        meta-training sharpens the network, a fixed step count leaves more of it unsolved,
        and a tolerance spends more steps where they are needed. One host sync per inner
        step, so no CUDA graph capture. 0 (default): every task takes `inner_steps`.
    cg_steps: maximum CG iterations of the implicit solve (I + H/lam) g = grad L_query.
        0 means the first-order approximation g = grad L_query (the Hessian term dropped).
    cg_tol: per-task relative tolerance, ||r|| <= cg_tol * ||b||.
    cg_damping: added to the Hessian in the implicit solve, (I + (H + cg_damping I)/lam).
    cg_clip: scale each task's CG solution g_i down to ||b_i|| lam / cg_damping where it is
        longer (b_i = grad L_query_i). That is the longest g_i can be when phi_i minimises the
        proximal problem (then H_i + lam I is positive semi-definite, so the operator is at
        least cg_damping / lam times the identity); a longer one means phi_i is not a
        minimiser, typically a task whose CG iterate grew along a direction of negative
        curvature, and such tasks' g_i can dominate the meta-batch's mean. Needs
        cg_damping > 0. MetaGradient.cg_clipped says which tasks were clipped.
    hvp: "fwdrev" (forward-over-reverse, jvp of grad, recomputed per product), "revrev"
        (double backward through a support-gradient graph built once per solve and reused by
        every CG iteration) or "auto" (revrev: measured faster on CPU, see README).
    backend: "auto" | "reference" | "torch"; imaml_fast.backend_info() lists what runs here.
    task_batching: how the batched backends run the T tasks through the model: "vmap" (all
        tasks in one batched call: under vmap, or hand-batched, see layer_batching), "loop"
        (one functional call per task), an int k (chunks of k tasks) or "auto" (measured once
        per model, shape and device, then cached).
    check_finite: IMAML.meta_step refuses a non-finite meta-gradient (one host sync per step).
    tf32: let the model's float32 convolutions and matmuls on a GPU run in TF32 inside the
        engine. Off by default, whatever torch's global flags say (PyTorch turns it on for
        cuDNN convolutions): with it the float32 meta-gradient of the Omniglot network ended
        0.12-0.30 from float64 on an H200, against 1e-6 without; the captured 5-way step ran
        2.2x faster (imaml_fast.precision). No effect on the CPU.
    amp: "bf16" (or "fp16", CUDA only) runs the model's forward and backward passes under
        torch.autocast while parameters, inner updates and the CG solve stay in fp32 (the
        parameters' dtype); "none" runs everything in the parameters' dtype.
    cg_dense: "always" materialises each task's support Hessian [T, P, P] once and runs the
        whole implicit CG solve in one kernel launch (small models); "never" keeps the
        matrix-free solve; "auto" is matrix-free too: materialising measured slower for every
        model size tried, on the CPU and on a GPU (imaml_fast.dense). "always" refuses
        Hessians of more than 2 GiB at once (one chunk's, with task_chunk).
    layer_derivatives: "closed_form" (default) builds the graphs that Hessian-vector products
        differentiate with imaml_fast.layers: convolutions and BatchNorm (batch statistics)
        whose second derivatives are written out instead of autograd's differentiation of
        their backward passes. Same values up to rounding, products about 1.5x cheaper on
        the Omniglot network. "autograd" keeps ATen's own layers throughout. The sequential
        reference backend and hvp="fwdrev" always use ATen's.
    layer_batching: how one batched call runs the model over its tasks. "auto" (default): a
        model that is a plain stack of known layers (an nn.Sequential of convolutions,
        BatchNorm with batch statistics, linear layers, activations, padding, pooling,
        flatten: imaml_fast.stacked lists them) runs hand-batched, its activations kept in
        one [N, T*C, ...] layout from layer to layer, so a pass dispatches fewer operations
        and moves less memory; any other model runs under torch.func.vmap. "vmap": always
        vmap. Same values up to rounding.
    task_threads: on the CPU, how many groups of tasks run concurrently, each on its own
        worker thread with an equal share of the caller's torch threads (imaml_fast.threads):
        "auto" (default) two groups where torch uses two threads or more and one batched
        gradient over all tasks takes at least 5 ms (timed once per model and shape), else
        one call; an int n at most n groups; 1 one batched call on the calling thread.
        Tasks are independent until the final mean, so one group's Python dispatch overlaps
        the other's compute: the Omniglot meta-step took 6-15% (5-way) and 11% (20-way)
        less time in two groups on two cores. Batched backends only, and not with
        hvp="fwdrev" (forward-mode AD keeps one process-wide level: "auto" means 1 there, an
        int above 1 is refused); on a GPU "auto" means 1 and an int above 1 is an error.
        Same values up to rounding.
    task_chunk: at most this many tasks in flight at once. None (default): all T tasks
        together. An int c runs the meta-batch as ceil(T / c) consecutive chunks of at most c
        tasks (sizes as equal as they can be), each chunk's whole computation (inner solve,
        query gradient, CG with its products) before the next, so a step needs one chunk's
        working memory (its activations, the product graphs, CG's vectors) plus the [T, P]
        results, at the cost of smaller batched calls. The batched engine keeps about ten
        [T, P] buffers and every task's product graph at once: this is the knob for a large
        T or model (README, Benchmarks: memory). task_threads' groups run inside each chunk.
        Batched backends only (the reference backend runs one task at a time anyway). Same
        values up to rounding.
    """

    inner_solver: str = "gd"
    inner_steps: int = 16
    inner_lr: float = 0.03
    lam: float = 2.0
    cg_steps: int = 5
    cg_tol: float = 1e-10
    cg_damping: float = 0.0
    cg_clip: bool = False
    hvp: str = "auto"
    backend: str = "auto"
    hf_cg_steps: int = 5
    hf_ls_steps: int = 10
    task_batching: Union[str, int] = "auto"
    check_finite: bool = True
    cg_dense: str = "auto"
    amp: str = "none"
    layer_derivatives: str = "closed_form"
    inner_tol: float = 0.0  # after the older fields, so that positional construction keeps
    tf32: bool = False      # its meaning
    layer_batching: str = "auto"
    task_threads: Union[str, int] = "auto"
    task_chunk: Optional[int] = None

    def __post_init__(self):
        if self.inner_solver not in INNER_SOLVERS:
            _fail("inner_solver", self.inner_solver, f"allowed values are {INNER_SOLVERS}")
        _check_int("inner_steps", self.inner_steps, 0)
        _check_real("inner_lr", self.inner_lr, positive=True)
        _check_real("inner_tol", self.inner_tol, nonneg=True)
        if not self.inner_tol < 1:
            _fail("inner_tol", self.inner_tol, "expected a number in [0, 1): a relative residual "
                  "(1 means no progress from theta)")
        if self.inner_tol > 0 and self.inner_solver != "gd_armijo":
            _fail("inner_tol", self.inner_tol, "it needs inner_solver='gd_armijo', the solver "
                  "that knows grad F at every iterate (or set inner_tol=0)")
        _check_real("lam", self.lam, positive=True)
        _check_int("cg_steps", self.cg_steps, 0)
        _check_real("cg_tol", self.cg_tol, nonneg=True)
        _check_real("cg_damping", self.cg_damping, nonneg=True)
        if self.hvp not in HVP_MODES:
            _fail("hvp", self.hvp, f"allowed values are {HVP_MODES}")
        from .backends import BACKEND_NAMES  # late import: backends import this module

        if self.backend not in BACKEND_NAMES:
            _fail("backend", self.backend, f"allowed values are {BACKEND_NAMES}")
        _check_int("hf_cg_steps", self.hf_cg_steps, 1)
        _check_int("hf_ls_steps", self.hf_ls_steps, 1)
        tb = self.task_batching
        if isinstance(tb, bool) or not (
            tb in TASK_BATCHING or (isinstance(tb, int) and tb >= 1)
        ):
            _fail("task_batching", tb, f"allowed values are {TASK_BATCHING} or an int >= 1")
        if self.cg_dense not in CG_DENSE:
            _fail("cg_dense", self.cg_dense, f"allowed values are {CG_DENSE}")
        if self.amp not in AMP:
            _fail("amp", self.amp, f"allowed values are {AMP}")
        if self.layer_derivatives not in LAYER_DERIVATIVES:
            _fail("layer_derivatives", self.layer_derivatives, f"allowed values are {LAYER_DERIVATIVES}")
        tt = self.task_threads
        if isinstance(tt, bool) or not (tt == "auto" or (isinstance(tt, int) and tt >= 1)):
            _fail("task_threads", tt, "allowed values are 'auto' or an int >= 1")
        if isinstance(tt, int) and tt > 1 and self.hvp == "fwdrev":
            _fail("task_threads", tt, "hvp='fwdrev' runs forward-mode AD, whose dual level torch "
                  "keeps for the whole process, so its products cannot run on concurrent "
                  "threads: use task_threads=1 or 'auto', or hvp='revrev'")
        if self.task_chunk is not None:
            c = self.task_chunk
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                _fail("task_chunk", c, "expected None (all tasks at once) or an int >= 1 (at "
                      "most that many tasks in flight)")
        if self.layer_batching not in LAYER_BATCHING:
            _fail("layer_batching", self.layer_batching, f"allowed values are {LAYER_BATCHING}")
        if not isinstance(self.check_finite, bool):
            _fail("check_finite", self.check_finite, "expected True or False")
        if not isinstance(self.tf32, bool):
            _fail("tf32", self.tf32, "expected True or False")
        if not isinstance(self.cg_clip, bool):
            _fail("cg_clip", self.cg_clip, "expected True or False")
        if self.cg_clip and not self.cg_damping > 0:
            _fail("cg_clip", self.cg_clip, "it bounds ||g_i|| by ||b_i|| lam / cg_damping, so it "
                  "needs cg_damping > 0 (e.g. cg_damping=10)")

    def replace(self, **changes) -> "IMAMLConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

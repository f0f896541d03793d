"""The C++ kernel library (csrc/, imaml_fast._C): CPU twins against their PyTorch references,
the same tests for the CUDA kernels (marked gpu, skipped without a GPU), backend reasons, the
build itself, and the C++ example through CMake / ctest.

The CPU-twin tests never skip: a missing or broken imaml_fast._C fails them.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from imaml_fast import _ext
from imaml_fast.backends import cpp as cpp_backend
from imaml_fast.backends import cuda as cuda_backend
from imaml_fast.backends.cpp import cg_update_fused_ref
from imaml_fast.cg import (CG_CONVERGED, CG_MAX_ITER, CG_NEGATIVE_CURVATURE, CG_NONFINITE,
                           acc_dtype, batched_dot, cg_solve, cg_update_ref)
from imaml_fast.dense import dense_cg_ref
from imaml_fast.inner import prox_update_ref
from imaml_fast.layers import batch_norm_double_backward

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]

BACKENDS = [pytest.param("cpp", id="cpp"), pytest.param("cuda", id="cuda", marks=needs_gpu)]
# (dtype, rtol against the fused reference) as data; P values are not multiples of any block.
FLOATS = [pytest.param(torch.float64, 1e-12, id="f64"), pytest.param(torch.float32, 1e-5, id="f32")]
SIZES = [(1, 1), (7, 13), (1, 1000), (7, 4097)]


@pytest.fixture(params=BACKENDS)
def be(request):
    """The backend under test; fails (never skips) when it cannot run."""
    name = request.param
    module = cpp_backend if name == "cpp" else cuda_backend
    device = torch.device("cpu" if name == "cpp" else "cuda")
    why = module.why_not(device, torch.float32)
    assert not why, f"the {name} backend cannot run here: {why}"
    return SimpleNamespace(name=name, device=device, ops=module.load_ops())


def rel(a, b):
    """Norm-wise relative difference, per task for [T, ...] tensors, as a max."""
    a, b = a.double(), b.double()
    if a.dim() < 2:
        a, b = a.unsqueeze(-1), b.unsqueeze(-1)
    num = (a - b).flatten(1).norm(dim=1)
    den = b.flatten(1).norm(dim=1).clamp_min(1e-300)
    return float((num / den).max()) if a.numel() else 0.0


# ---- the build ----------------------------------------------------------------------------------

def test_extension_is_built_and_describes_itself():
    module, why = _ext.load()
    assert module is not None, f"imaml_fast._C did not import: {why}"
    info = _ext.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "no_cuda_reason", "cxx_compiler", "cuda_compiler"}
    assert info["abi_version"] == _ext.ABI_VERSION
    assert info["cxx_compiler"] and info["cxx_compiler"] != "unknown"
    if info["cuda"]:
        assert "80" in info["cuda_archs"] or os.environ.get("IMAML_FAST_CUDA_ARCHS") \
            or os.environ.get("CUDA_ARCHS")
        assert info["cuda_compiler"].startswith("NVIDIA") and info["no_cuda_reason"] == ""
    else:
        assert info["no_cuda_reason"] and info["cuda_archs"] == ""


def test_cuda_was_compiled_when_nvcc_is_available():
    """CI compiles the CUDA sources (that is its CUDA check): with nvcc on PATH and no
    IMAML_FAST_SKIP_CUDA, the build must contain the CUDA kernels."""
    nvcc = shutil.which("nvcc") or os.environ.get("CUDACXX")
    skip = os.environ.get("IMAML_FAST_SKIP_CUDA", "").lower() in ("1", "on", "true", "yes")
    info = _ext.build_info()
    assert info is not None, _ext.load()[1]
    if nvcc and not skip:
        assert info["cuda"], f"nvcc is at {nvcc} but _C was built without CUDA: {info}"
        assert "90" in info["cuda_archs"] or os.environ.get("IMAML_FAST_CUDA_ARCHS") \
            or os.environ.get("CUDA_ARCHS")
    elif not info["cuda"]:
        assert info["no_cuda_reason"] in ("nvcc not found", "IMAML_FAST_SKIP_CUDA=1",
                                          "IMAML_FAST_CUDA=OFF")


def test_cuda_entry_points_report_a_missing_gpu_or_build_cleanly():
    """Without CUDA compiled in, a *_cuda call raises with the C ABI's message instead of
    crashing; with it but no GPU, the Python wrapper refuses CPU tensors."""
    module, _ = _ext.load()
    if not _ext.build_info()["cuda"]:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            module.batched_dot_cuda(0, 0, 0, 0, 1, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="a is on cpu"):
        cuda_backend.batched_dot(torch.ones(2, 3), torch.ones(2, 3))


def test_importing_imaml_fast_does_not_import_the_extension():
    code = ("import sys, torch, imaml_fast; "
            "assert 'imaml_fast._C' not in sys.modules, 'imported _C'; "
            "from imaml_fast.backends import cpp, cuda; "
            "assert 'imaml_fast._C' not in sys.modules, 'backends imported _C'; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cpp_example_links_the_installed_library_and_passes_ctest(tmp_path):
    """Configure + build + install the core library (CPU twin), then build csrc/examples
    against the installed CMake package (find_package(imaml_fast)) and run ctest."""
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build imaml_fast._C and the C++ example"
    gen = ["-GNinja"] if shutil.which("ninja") else []
    env = dict(os.environ, IMAML_FAST_SKIP_CUDA="1")
    lib, prefix, ex = tmp_path / "lib", tmp_path / "prefix", tmp_path / "ex"

    def run(*cmd):
        out = subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    run(cmake, "-S", str(ROOT), "-B", str(lib), *gen, "-DIMAML_FAST_BUILD_EXAMPLES=OFF",
        "-DCMAKE_BUILD_TYPE=Release")
    run(cmake, "--build", str(lib), "--parallel", "2")
    run(cmake, "--install", str(lib), "--prefix", str(prefix))
    assert (prefix / "include" / "imaml_fast" / "imaml_fast.h").exists()
    assert list(prefix.glob("lib*/cmake/imaml_fast/imaml_fastConfig.cmake"))
    run(cmake, "-S", str(ROOT / "csrc" / "examples"), "-B", str(ex), *gen,
        f"-DCMAKE_PREFIX_PATH={prefix}")
    run(cmake, "--build", str(ex), "--parallel", "2")
    out = run(shutil.which("ctest") or "ctest", "--test-dir", str(ex), "--output-on-failure")
    # CTest 3.x says "100% tests passed, 0 tests failed out of 1", CTest 4 "100% tests passed
    # out of 1"
    assert re.search(r"100% tests passed(, 0 tests failed)? out of 1\b", out), out


# ---- backend reasons ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_runs_on_cpu_float32_and_float64(dtype):
    assert cpp_backend.why_not(torch.device("cpu"), dtype) == []
    assert set(cpp_backend.load_ops()) >= {"cg_update", "prox_update", "batched_dot"}


def test_cpp_reasons_name_dtype_and_device():
    assert cpp_backend.why_not("cpu", torch.float16) == \
        ["dtype torch.float16 not supported by the CPU twin (float32, float64)"]
    why = cpp_backend.why_not("cuda", torch.bfloat16)
    assert why[0].startswith("tensors are on cuda") and "torch.bfloat16" in why[1]


def test_cpp_and_cuda_say_the_extension_is_not_built(monkeypatch):
    monkeypatch.setattr(_ext, "_state", (None, "the extension module is missing (...)"))
    monkeypatch.setattr(_ext, "_info", None)
    assert cpp_backend.why_not("cpu", torch.float32) == \
        ["imaml_fast._C is not built: the extension module is missing (...)"]
    assert "imaml_fast._C is not built" in cuda_backend.why_not("cuda", torch.float32)[0]
    with pytest.raises(RuntimeError, match="imaml_fast._C is not built"):
        cpp_backend.load_ops()


def test_a_stale_build_warns_once_and_a_missing_one_does_not(monkeypatch):
    """A built module with another C ABI is refused with a RuntimeWarning (once per process:
    load() caches), since backend="auto" then silently runs the slower pure-PyTorch path; an
    extension that was never built is the documented pure-Python install and stays quiet."""
    import types
    import warnings

    stale = types.ModuleType("imaml_fast._C")
    stale.ABI_VERSION = _ext.ABI_VERSION - 1
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: stale)
    monkeypatch.setattr(_ext, "_state", None)
    with pytest.warns(RuntimeWarning, match=r"imaml_fast\._C cannot be used: the built extension "
                      rf"has C ABI version {_ext.ABI_VERSION - 1}, these wrappers need "
                      rf"{_ext.ABI_VERSION}: a stale build; rebuild"):
        module, why = _ext.load()
    assert module is None and "stale build" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.load() == (None, why)  # cached: no second warning
        assert "stale build" in cpp_backend.why_not("cpu", torch.float32)[0]

    def missing(name):
        raise ModuleNotFoundError("No module named 'imaml_fast._C'", name="imaml_fast._C")

    monkeypatch.setattr(_ext.importlib, "import_module", missing)
    monkeypatch.setattr(_ext, "_state", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module, why = _ext.load()
    assert module is None and why.startswith("the extension module is missing")


@pytest.mark.skipif(HAS_GPU, reason="checks the reasons given on a machine without a GPU")
def test_cuda_says_why_not_here():
    why = cuda_backend.why_not(torch.device("cpu"), torch.float32)
    assert why[0] == "tensors are on cpu (the CUDA kernels need cuda tensors)"
    info = _ext.build_info()
    if info["cuda"]:
        assert why[1:] == ["no CUDA GPU is available (torch.cuda.is_available() is False)"]
    else:
        assert why[1].startswith(f"built without CUDA ({info['no_cuda_reason']})")
    assert not any("dtype" in w for w in cuda_backend.why_not("cpu", torch.float16))
    assert "dtype torch.int32" in " ".join(cuda_backend.why_not("cpu", torch.int32))


def test_cuda_arch_rules():
    assert cuda_backend.arch_supported((9, 0), "80-real 90")
    assert cuda_backend.arch_supported((8, 6), "80-real 90")      # sm_80 SASS runs on 8.6
    assert cuda_backend.arch_supported((10, 0), "80-real 90")     # compute_90 PTX is JIT-ed
    assert not cuda_backend.arch_supported((10, 0), "80-real 90-real")
    assert not cuda_backend.arch_supported((7, 5), "80-real 90")


# ---- prox_update ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,rtol", FLOATS)
@pytest.mark.parametrize("T,P", SIZES)
@pytest.mark.parametrize("shared_theta", [True, False], ids=["theta_P", "theta_TP"])
def test_prox_update_matches_reference(be, dtype, rtol, T, P, shared_theta):
    phi, g = (torch.randn(T, P, dtype=dtype, device=be.device) for _ in range(2))
    theta = torch.randn(*((P,) if shared_theta else (T, P)), dtype=dtype, device=be.device)
    out = be.ops["prox_update"](phi, g, theta, 0.1, 2.0)
    want = prox_update_ref(phi, g, theta, 0.1, 2.0)
    assert out.shape == (T, P) and out.dtype == dtype and out.data_ptr() != phi.data_ptr()
    if be.name == "cpp":  # same operations in the same order, no FMA contraction: bitwise
        assert torch.equal(out, want)
    assert rel(out, want) <= rtol


def test_prox_update_rejects_bad_arguments_by_name():
    ops = cpp_backend.load_ops()
    phi, g = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="theta must be"):
        ops["prox_update"](phi, g, torch.randn(4, dtype=torch.float64), 0.1, 1.0)
    with pytest.raises(ValueError, match="g has dtype torch.float32"):
        ops["prox_update"](phi, g.float(), phi[0], 0.1, 1.0)
    with pytest.raises(ValueError, match="phi must be contiguous"):
        ops["prox_update"](torch.randn(5, 3, dtype=torch.float64).t(), g, phi[0], 0.1, 1.0)
    with pytest.raises(ValueError, match="phi has dtype torch.float16"):
        ops["prox_update"](phi.half(), g.half(), phi[0].half(), 0.1, 1.0)
    with pytest.raises(ValueError, match="lr=nan"):
        ops["prox_update"](phi, g, phi[0], float("nan"), 1.0)
    with pytest.raises(ValueError, match="requires grad"):
        ops["prox_update"](phi.requires_grad_(), g, g[0], 0.1, 1.0)


# ---- batched_dot ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,rtol", FLOATS)
@pytest.mark.parametrize("T,P", SIZES + [(3, 0)])
def test_batched_dot_matches_reference(be, dtype, rtol, T, P):
    a, b = (torch.randn(T, P, dtype=dtype, device=be.device) for _ in range(2))
    a[:, : P // 2] += 1.0  # a non-zero mean: the sums do not cancel to noise
    b[:, : P // 2] += 1.0
    out = be.ops["batched_dot"](a, b)
    want = batched_dot(a.double(), b.double())
    assert out.shape == (T,) and out.dtype == dtype
    assert rel(out, want) <= rtol
    assert torch.equal(be.ops["batched_dot"](a, b), out)  # deterministic


# ---- cg_update: one step -------------------------------------------------------------------------

class SpdOperator:
    """A_t v = d_t * v + U_t (U_t^T v): symmetric positive definite, matrix-free, any P."""

    def __init__(self, T, P, dtype, device, k=3, lo=1.0, hi=5.0):
        g = torch.Generator().manual_seed(1234 + T * 7919 + P)
        d = lo + (hi - lo) * torch.rand(T, P, generator=g, dtype=torch.float64)
        U = torch.randn(T, P, k, generator=g, dtype=torch.float64) / max(P, 1) ** 0.5
        self.d, self.U = d.to(dtype).to(device), U.to(dtype).to(device)

    def __call__(self, v):
        return self.d * v + torch.einsum("tpk,tk->tp", self.U, torch.einsum("tpk,tp->tk", self.U, v))

    def dense(self):
        U = self.U.double()
        return torch.diag_embed(self.d.double()) + U @ U.transpose(1, 2)


def cg_state(T, P, dtype, device, steps=2):
    """A mid-solve CG state after `steps` reference iterations, with tasks 1, 2, 3 (when they
    exist) set to converged / negative curvature / non-finite: those must not be touched."""
    A = SpdOperator(T, P, dtype, device)
    b = torch.randn(T, P, dtype=dtype, device=device)
    acc = acc_dtype(dtype)
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rs = batched_dot(r, r)
    status = torch.zeros(T, dtype=torch.int8, device=device)
    iters = torch.zeros(T, dtype=torch.long, device=device)
    thresh = (1e-30 * batched_dot(b, b)).to(acc)
    for _ in range(steps):
        x, r, p, rs, status, iters = cg_update_ref(x, r, p, A(p), rs, status, iters, thresh)
    for t, code in ((1, CG_CONVERGED), (2, CG_NEGATIVE_CURVATURE), (3, CG_NONFINITE)):
        if t < T:
            status[t] = code
    return [x, r, p, A(p), rs, status, iters, thresh]


def clone_all(state):
    return [s.clone() for s in state]


@pytest.mark.parametrize("dtype,rtol", FLOATS)
@pytest.mark.parametrize("T,P", SIZES)
@pytest.mark.parametrize("steps", [0, 2])
def test_cg_update_matches_fused_reference_and_leaves_finished_tasks_alone(be, dtype, rtol, T,
                                                                           P, steps):
    state = cg_state(T, P, dtype, be.device, steps)
    before = clone_all(state)
    want = cg_update_fused_ref(*clone_all(state))
    got = be.ops["cg_update"](*state)
    assert all(g.data_ptr() == s.data_ptr() for g, s in zip(got, state[:3] + state[4:7]))
    x, r, p, rs, status, iters = got
    assert torch.equal(status, want[4]) and torch.equal(iters, want[5])
    for a, b in zip((x, r, p, rs), want[:4]):
        assert rel(a, b) <= rtol
    finished = before[5] != CG_MAX_ITER
    for new, old in zip((x, r, p, rs, status, iters), before[:3] + before[4:7]):
        assert torch.equal(new[finished], old[finished])  # bit-identical
    assert bool((iters[~finished] == before[6][~finished] + 1).all())


@pytest.mark.parametrize("dtype,rtol", FLOATS)
@pytest.mark.parametrize("T,P", [(7, 13), (7, 4097)])
def test_cg_update_matches_classic_reference(be, dtype, rtol, T, P):
    state = cg_state(T, P, dtype, be.device, steps=2)
    want = cg_update_ref(*clone_all(state))
    got = be.ops["cg_update"](*clone_all(state))
    assert torch.equal(got[4], want[4]) and torch.equal(got[5], want[5])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in zip(got[:2] + got[3:4], want[:2] + want[3:4]):  # x, r, rs
        assert rel(a, b) <= tol
    running = got[4] == CG_MAX_ITER  # p of tasks that just converged differs on purpose
    assert rel(got[2][running], want[2][running]) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,P", [(1, 1), (7, 13), (7, 1000), (1, 4097)])
def test_cg_solve_with_the_kernel_matches_linalg_solve_and_the_reference(be, dtype, T, P):
    A = SpdOperator(T, P, dtype, be.device)
    b = torch.randn(T, P, dtype=dtype, device=be.device)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    res = cg_solve(A, b, max_iter=60, tol=tol, update=be.ops["cg_update"])
    ref = cg_solve(A, b, max_iter=60, tol=tol)
    assert bool((res.status == CG_CONVERGED).all()), res.status
    assert torch.equal(res.iters, ref.iters) and torch.equal(res.status, ref.status)
    assert rel(res.x, ref.x) <= (1e-10 if dtype == torch.float64 else 1e-4)
    if P <= 200:  # against the materialised operator
        exact = torch.linalg.solve(A.dense(), b.double())
        assert rel(res.x, exact) <= (1e-8 if dtype == torch.float64 else 1e-4)


def test_cg_update_flags_negative_curvature_like_the_reference(be):
    """pAp <= 0: on the first iteration the steepest-descent step x + p, later the last
    iterate; flags, iterations and x exactly as cg_update_ref."""
    dt, dev = torch.float64, be.device
    T, P = 4, 9
    x = torch.randn(T, P, dtype=dt, device=dev)
    r = torch.randn(T, P, dtype=dt, device=dev)
    p = torch.randn(T, P, dtype=dt, device=dev)
    Ap = torch.randn(T, P, dtype=dt, device=dev)
    Ap[0] = -p[0]          # pAp < 0, first iteration -> x + p
    Ap[1] = -2 * p[1]      # pAp < 0, iteration 3 -> x kept
    Ap[2] = 0              # pAp == 0 -> negative curvature too
    Ap[3] = 3 * p[3]       # a healthy task beside them
    rs = batched_dot(r, r)
    status = torch.zeros(T, dtype=torch.int8, device=dev)
    iters = torch.tensor([0, 3, 0, 2], device=dev)
    thresh = torch.zeros(T, dtype=dt, device=dev)
    state = [x, r, p, Ap, rs, status, iters, thresh]
    want = cg_update_ref(*clone_all(state))
    got = be.ops["cg_update"](*clone_all(state))
    assert got[4].tolist() == [CG_NEGATIVE_CURVATURE] * 3 + [CG_MAX_ITER] == want[4].tolist()
    assert got[5].tolist() == [0, 3, 0, 3] == want[5].tolist()
    assert torch.equal(got[0][:3], want[0][:3])
    assert torch.equal(got[0][0], x[0] + p[0]) and torch.equal(got[0][1], x[1])
    for k in (1, 2, 3):  # r, p, rs of the flagged tasks untouched
        assert torch.equal(got[k][:3], state[k if k < 3 else 4][:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cg_update_flags_non_finite_like_the_reference(be, dtype):
    """NaN / inf in A p, and overflow inside the update (alpha = inf; r_new.r_new = inf): the
    task stops at its last finite iterate, exactly like cg_update_ref; a task whose bound says
    "might overflow" but does not takes the exact path and matches the reference."""
    dev = be.device
    big = 1e19 if dtype == torch.float32 else 1e154  # big^2 < max < (10 big)^2; big > bound
    tiny = 1e-40 if dtype == torch.float32 else 1e-320  # a denormal p.Ap: alpha = inf
    T, P = 6, 4
    x = torch.randn(T, P, dtype=dtype, device=dev)
    r = torch.zeros(T, P, dtype=dtype, device=dev)
    r[:, 0] = 1.0
    p = torch.zeros(T, P, dtype=dtype, device=dev)
    p[:, 0] = 1.0
    Ap = torch.zeros(T, P, dtype=dtype, device=dev)
    Ap[:, 0] = 1.0
    Ap[0, 1] = float("nan")                  # NaN: pAp = NaN
    Ap[1, 0] = float("inf")                  # inf: pAp = inf
    p[2, 0] = tiny ** 0.5; Ap[2, 0] = tiny ** 0.5  # noqa: E702  p.Ap denormal -> alpha = inf
    Ap[3, 0], Ap[3, 1] = 1e-10, big * 1e-9   # alpha = 1e10: |r_new| = 10 big: r.r overflows
    Ap[4, 0], Ap[4, 1] = 1e-10, big * 1e-10  # |r_new| = big: r.r finite, but above the bound
    Ap[5, 0], Ap[5, 1] = 2.0, 1.0            # a healthy task: alpha = 1/2, r_new = -e2 / 2
    rs = batched_dot(r, r)
    status = torch.zeros(T, dtype=torch.int8, device=dev)
    iters = torch.full((T,), 2, device=dev)
    thresh = torch.zeros(T, dtype=dtype, device=dev)
    state = [x, r, p, Ap, rs, status, iters, thresh]
    want = cg_update_ref(*clone_all(state))
    fused = cg_update_fused_ref(*clone_all(state))
    got = be.ops["cg_update"](*clone_all(state))
    codes = [CG_NONFINITE] * 4 + [CG_MAX_ITER, CG_MAX_ITER]
    assert got[4].tolist() == codes == want[4].tolist() == fused[4].tolist()
    assert got[5].tolist() == [2, 2, 2, 2, 3, 3] == want[5].tolist()
    for k, name in enumerate(("x", "r", "p")):  # flagged tasks keep their last finite iterate
        assert torch.equal(got[k][:4], state[k][:4]), name
        assert bool(torch.isfinite(got[k]).all()), name
    assert torch.equal(got[3][:4], rs[:4])
    for k in (0, 1, 3):  # x, r, rs of the healthy and the risky-but-finite task
        assert rel(got[k][4:], want[k][4:]) <= 1e-6
    assert rel(got[2][4:], fused[2][4:]) <= 1e-6


def test_cg_update_rejects_bad_arguments_by_name():
    ops = cpp_backend.load_ops()
    state = cg_state(3, 5, torch.float64, torch.device("cpu"))
    bad = clone_all(state)
    bad[2] = bad[1]  # p is r
    with pytest.raises(ValueError, match="p and r share memory"):
        ops["cg_update"](*bad)
    bad = clone_all(state)
    bad[5] = bad[5].long()
    with pytest.raises(ValueError, match="status has dtype torch.int64, expected torch.int8"):
        ops["cg_update"](*bad)
    bad = clone_all(state)
    bad[4] = bad[4].float()
    with pytest.raises(ValueError, match="rs has dtype torch.float32, expected torch.float64"):
        ops["cg_update"](*bad)
    bad = clone_all(state)
    bad[3] = torch.randn(5, 3, dtype=torch.float64).t()
    with pytest.raises(ValueError, match="Ap must be contiguous"):
        ops["cg_update"](*bad)
    bad = clone_all(state)
    bad[0] = bad[0][:, :4].contiguous()
    with pytest.raises(ValueError, match=r"r has shape \(3, 5\), expected \(3, 4\)"):
        ops["cg_update"](*bad)


def test_cg_update_bumps_version_counters():
    ops = cpp_backend.load_ops()
    state = cg_state(2, 5, torch.float64, torch.device("cpu"))
    versions = [t._version for t in state]
    ops["cg_update"](*state)
    changed = [t._version > v for t, v in zip(state, versions)]
    assert changed == [True, True, True, False, True, True, True, False]


# ---- dense_cg ------------------------------------------------------------------------------------

def spd_matrices(T, P, dtype, device, cond=20.0):
    g = torch.Generator().manual_seed(99 + T * 31 + P)
    Q, _ = torch.linalg.qr(torch.randn(T, P, P, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, float(torch.log10(torch.tensor(cond))), P, dtype=torch.float64)
    H = Q @ torch.diag_embed(ev.expand(T, P)) @ Q.transpose(1, 2)
    return ((H + H.transpose(1, 2)) / 2).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,P", [(1, 1), (7, 13), (3, 60)])
def test_dense_cg_matches_linalg_solve_and_the_matrix_free_solve(be, dtype, T, P):
    H = spd_matrices(T, P, dtype, be.device)
    b = torch.randn(T, P, dtype=dtype, device=be.device)
    shift, scale = 1.0, 0.5
    # Iterations and flags: a tolerance reached well before CG's finite termination, where
    # the last iterations are rounding noise and any two implementations may differ by one.
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    x, iters, residual, status = be.ops["dense_cg"](H, b, shift, scale, 60, tol)
    rx, riters, rresidual, rstatus = dense_cg_ref(H, b, shift, scale, 60, tol)
    assert torch.equal(status, rstatus) and torch.equal(iters, riters)
    assert bool((status == CG_CONVERGED).all())
    assert residual.dtype == dtype
    # (a task may stop at CG's finite termination with a residual at rounding-noise level)
    torch.testing.assert_close(residual, rresidual, rtol=1e-8 if dtype == torch.float64 else 1e-2,
                               atol=float(1e-3 * tol * b.norm(dim=1).max()))
    assert rel(x, rx) <= (1e-10 if dtype == torch.float64 else 1e-5)
    # Exactness: run to a tight tolerance and compare with the materialised solve.
    x, iters, residual, status = be.ops["dense_cg"](H, b, shift, scale, 200,
                                                     1e-13 if dtype == torch.float64 else 1e-7)
    M = shift * torch.eye(P, dtype=torch.float64, device=be.device) + scale * H.double()
    exact = torch.linalg.solve(M, b.double())
    assert rel(x, exact) <= (1e-11 if dtype == torch.float64 else 1e-5)


def test_dense_cg_flags_like_the_reference(be):
    """Indefinite operator (first-iteration steepest-descent step x = b, or a later stop),
    NaN in H, b = 0 (converged at once), max_iter reached."""
    dt, dev = torch.float64, be.device
    T, P = 5, 6
    H = spd_matrices(T, P, dt, dev)
    b = torch.randn(T, P, dtype=dt, device=dev)
    H[0] = -H[0]                                  # negative definite: pAp < 0 at once
    ev = torch.tensor([3.0, 2.0, 1.0, 0.5, -0.1, -4.0], dtype=dt, device=dev)
    H[1] = torch.diag(ev)                         # indefinite
    b[1] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.3, 0.05], dtype=dt, device=dev)
    H[2, 1, 2] = float("nan")
    b[3] = 0
    for max_iter in (0, 2, 50):
        x, iters, residual, status = be.ops["dense_cg"](H, b, 0.0, 1.0, max_iter, 1e-6)
        rx, riters, rresidual, rstatus = dense_cg_ref(H, b, 0.0, 1.0, max_iter, 1e-6)
        assert torch.equal(status, rstatus), (max_iter, status, rstatus)
        assert torch.equal(iters, riters), (max_iter, iters, riters)
        assert rel(x, rx) <= 1e-10 and bool(torch.isfinite(x).all())
        torch.testing.assert_close(residual, rresidual, rtol=1e-8, atol=1e-12)
    assert status.tolist() == [CG_NEGATIVE_CURVATURE, CG_NEGATIVE_CURVATURE, CG_NONFINITE,
                               CG_CONVERGED, CG_CONVERGED]
    assert iters[1] > 0 and iters[3] == 0
    assert torch.equal(x[0], b[0]) and torch.equal(x[3], b[3])


def test_dense_cg_rejects_bad_arguments_by_name():
    ops = cpp_backend.load_ops()
    H, b = spd_matrices(2, 3, torch.float64, "cpu"), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"H must be \[T, P, P\]"):
        ops["dense_cg"](H[:, :2], b, 1.0, 1.0, 5, 1e-6)
    with pytest.raises(ValueError, match="max_iter=-1"):
        ops["dense_cg"](H, b, 1.0, 1.0, -1, 1e-6)
    with pytest.raises(ValueError, match="tol=-1"):
        ops["dense_cg"](H, b, 1.0, 1.0, 5, -1.0)
    with pytest.raises(ValueError, match="b has dtype torch.float16"):
        ops["dense_cg"](H.half(), b.half(), 1.0, 1.0, 5, 1e-3)


# ---- bn_double_backward --------------------------------------------------------------------------

BN_SHAPES = [(5, 7, 3, 3), (4, 6), (1, 3, 2, 5), (3, 4, 1)]
# which of the optional inputs are None
BN_ABSENT = [(), ("a",), ("b",), ("c",), ("weight",), ("a", "b", "c", "weight")]


def bn_inputs(shape, dtype, device, absent=(), seed=0):
    """(a, b, c, gy, x, mean, invstd, weight) as BatchNorm's backward would see them: batch
    statistics of x from native_batch_norm; gy and a with non-zero means (the centring terms
    matter); the inputs named in `absent` are None."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]

    def randn(*s, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) + shift).to(dtype).to(device)

    x = 2 * randn(*shape, shift=0.25)
    if x.numel():
        _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    else:
        mean, invstd = randn(C), randn(C).abs()
    t = {"a": randn(*shape, shift=0.2), "b": randn(C), "c": randn(C), "weight": randn(C, shift=1)}
    for name in absent:
        t[name] = None
    return t["a"], t["b"], t["c"], randn(*shape, shift=0.3), x, mean, invstd, t["weight"]


def bn_reference64(args):
    """The reference evaluated in float64 on the same inputs."""
    return batch_norm_double_backward(*(None if t is None else t.double() for t in args))


def flat_rel(a, b):
    return rel(a.reshape(1, -1), b.reshape(1, -1))


@pytest.mark.parametrize("dtype,rtol", [pytest.param(torch.float64, 1e-12, id="f64"),
                                        pytest.param(torch.float32, 2e-5, id="f32")])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("absent", BN_ABSENT,
                         ids=lambda a: "none_" + "_".join(a) if a else "all_given")
def test_bn_double_backward_matches_reference(be, dtype, rtol, shape, absent):
    args = bn_inputs(shape, dtype, be.device, absent)
    got = be.ops["bn_double_backward"](*args)
    want = batch_norm_double_backward(*args)
    exact = bn_reference64(args)
    assert len(got) == 3
    for name, g_, w_, e_ in zip(("dgy", "dx", "dw"), got, want, exact):
        if w_ is None:
            assert g_ is None, name
            continue
        assert g_.shape == w_.shape and g_.dtype == dtype and g_.is_contiguous(), name
        assert g_.device.type == be.device.type, name
        if not bool(e_.any()):  # an all-zero output (a, b and c absent; dw without a)
            assert torch.equal(g_, torch.zeros_like(g_)), name
            continue
        assert flat_rel(g_, e_) <= rtol, (name, flat_rel(g_, e_))
        assert flat_rel(g_, w_) <= (rtol if dtype == torch.float64 else 1e-4), name


def test_bn_double_backward_takes_non_contiguous_inputs(be):
    """A channels_last x and gy and a strided a: the wrapper makes contiguous copies and
    returns contiguous outputs with the reference's values."""
    a, b, c, gy, x, mean, invstd, w = bn_inputs((4, 5, 3, 6), torch.float64, be.device)
    x, gy = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
    a = torch.cat([a, a], dim=3)[..., ::2]
    assert not (x.is_contiguous() or gy.is_contiguous() or a.is_contiguous())
    got = be.ops["bn_double_backward"](a, b, c, gy, x, mean, invstd, w)
    want = batch_norm_double_backward(a, b, c, gy, x, mean, invstd, w)
    for g_, w_ in zip(got, want):
        assert g_.is_contiguous() and flat_rel(g_, w_) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_double_backward_same_bits_on_any_number_of_threads(monkeypatch, dtype):
    """Above the twins' threading threshold (N * C * S >= 65,536), C not a multiple of the
    thread count, S a multiple of 8 (the vectorisable row loop) and not (the generic loop),
    and a 2-D input (S = 1)."""
    module, _ = _ext.load()
    ops = cpp_backend.load_ops()
    runs = {}
    shapes = [(16, 7, 33, 19), (64, 5, 256), (22000, 3)]
    inputs = [bn_inputs(s, dtype, "cpu", seed=i) for i, s in enumerate(shapes)]
    try:
        for n in (1, 3):
            monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
            runs[n] = [t for args in inputs for t in ops["bn_double_backward"](*args)]
            assert module.cpu_threads() == n
    finally:
        module.set_cpu_threads(1)
    assert all(torch.equal(u, v) for u, v in zip(runs[3], runs[1]))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for k, args in enumerate(inputs):
        for got, want in zip(runs[1][3 * k:3 * k + 3], bn_reference64(args)):
            assert flat_rel(got, want) <= tol


@pytest.mark.parametrize("S, parts", [(8, 2), (15, 3), (49, 7), (196, 4)])
def test_bn_double_backward_lanes_follow_the_channel_order(S, parts):
    """The CPU twin puts element m = n * S + s of a channel in lane m % 8, in order of m,
    whatever S: each row runs a head up to lane 0, blocks of 8 (vectorised), then a tail.
    The same channel data as [N, C, S] and as [parts * N, C, S / parts] (same m order, rows
    starting at other lanes) must give the same bits."""
    ops = cpp_backend.load_ops()
    N, C = 9, 4
    args = bn_inputs((N, C, S), torch.float64, "cpu")

    def split(t):  # [N, C, S] -> [parts N, C, S / parts], the per-channel order unchanged
        return (t.reshape(N, C, parts, S // parts).permute(0, 2, 1, 3)
                .reshape(parts * N, C, S // parts))

    whole = ops["bn_double_backward"](*args)
    parted = ops["bn_double_backward"](*(split(t) if t is not None and t.dim() == 3 else t
                                         for t in args))
    assert torch.equal(split(whole[0]), parted[0]) and torch.equal(split(whole[1]), parted[1])
    assert torch.equal(whole[2], parted[2])
    for got, want in zip(whole, bn_reference64(args)):
        assert flat_rel(got, want) <= 1e-12


def test_bn_double_backward_falls_back_to_the_reference(be):
    """float16/bfloat16, mixed dtypes, inputs that need autograd and empty inputs are the
    reference's: same values (it is the reference), and gradients flow."""
    for dtype in (torch.float16, torch.bfloat16):
        args = bn_inputs((4, 3, 5), dtype, be.device)
        got = be.ops["bn_double_backward"](*args)
        want = batch_norm_double_backward(*args)
        assert all(torch.equal(u, v) for u, v in zip(got, want))
    a, b, c, gy, x, mean, invstd, w = bn_inputs((4, 3, 5), torch.float64, be.device)
    got = be.ops["bn_double_backward"](a, b.float(), c, gy, x, mean, invstd, w)  # mixed
    want = batch_norm_double_backward(a, b.float(), c, gy, x, mean, invstd, w)
    assert all(torch.equal(u, v) for u, v in zip(got, want))
    a.requires_grad_()
    dgy, dx, dw = be.ops["bn_double_backward"](a, b, c, gy, x, mean, invstd, w)
    assert dgy.requires_grad and dx.requires_grad and dw.requires_grad
    with torch.no_grad():  # under no_grad the kernel runs
        out = be.ops["bn_double_backward"](a, b, c, gy, x, mean, invstd, w)
    assert not out[0].requires_grad and flat_rel(out[1], dx.detach()) <= 1e-12
    a = a.detach()
    xg = x.clone().requires_grad_()  # eps: the reference recomputes the statistics from x
    got = be.ops["bn_double_backward"](a, b, c, gy, xg, mean, invstd, w, eps=1e-5)
    want = batch_norm_double_backward(a, b, c, gy, xg, mean, invstd, w, eps=1e-5)
    assert got[1].requires_grad and all(torch.equal(u, v) for u, v in zip(got, want))
    with torch.no_grad():
        out = be.ops["bn_double_backward"](a, b, c, gy, xg, mean, invstd, w, eps=1e-5)
    assert all(flat_rel(u, v.detach()) <= 1e-12 for u, v in zip(out, want))
    args = bn_inputs((4, 3, 5), torch.float64, be.device)  # under vmap: BatchedTensors
    batched = [t.unsqueeze(0).expand(2, *t.shape) for t in args]
    got = torch.func.vmap(be.ops["bn_double_backward"])(*batched)
    want = batch_norm_double_backward(*args)
    assert all(torch.equal(u[1], v) for u, v in zip(got, want))

    class Twice(torch.autograd.Function):  # autograd's batched cotangents (legacy batching)
        @staticmethod
        def forward(ctx, t):
            return 2 * t

        @staticmethod
        def backward(ctx, v):
            return be.ops["bn_double_backward"](v, *args[1:])[0]

    gy = args[3].clone().requires_grad_()
    vs = torch.randn(2, *gy.shape, dtype=gy.dtype, device=gy.device)
    got, = torch.autograd.grad(Twice.apply(gy), gy, vs, is_grads_batched=True)
    for k in range(2):
        assert flat_rel(got[k], batch_norm_double_backward(vs[k], *args[1:])[0]) <= 1e-12
    empty = bn_inputs((0, 3, 5), torch.float64, be.device)
    got = be.ops["bn_double_backward"](*empty)
    want = batch_norm_double_backward(*empty)
    assert got[0].shape == (0, 3, 5) and got[1].shape == (0, 3, 5)
    torch.testing.assert_close(got[2], want[2], equal_nan=True)


def test_bn_double_backward_rejects_bad_arguments_by_name():
    ops = cpp_backend.load_ops()
    a, b, c, gy, x, mean, invstd, w = bn_inputs((4, 3, 5), torch.float64, "cpu")
    with pytest.raises(ValueError, match=r"gy has shape \(4, 3, 4\), expected \(4, 3, 5\)"):
        ops["bn_double_backward"](a, b, c, gy[..., :4], x, mean, invstd, w)
    with pytest.raises(ValueError, match=r"weight has shape \(4,\), expected \(3,\)"):
        ops["bn_double_backward"](a, b, c, gy, x, mean, invstd, torch.ones(4, dtype=x.dtype))
    with pytest.raises(ValueError, match=r"mean must be a torch.Tensor, got NoneType"):
        ops["bn_double_backward"](a, b, c, gy, x, None, invstd, w)
    with pytest.raises(ValueError, match=r"x must be \[N, C, ...\]"):
        ops["bn_double_backward"](None, None, None, gy[0, 0], x[0, 0], mean, invstd, None)
    with pytest.raises(ValueError, match="x is on cpu, but the cuda backend needs cuda tensors"):
        cuda_backend.bn_double_backward(a, b, c, gy, x, mean, invstd, w)


def test_bn_double_backward_c_abi_codes():
    """The raw bindings: a NULL required pointer, an unsupported dtype and bad sizes raise
    with the C ABI's code and message (before any CUDA call, so the CUDA entry point says the
    same on a machine without a GPU); no elements (N * S = 0) writes dw = 0 only."""
    module, _ = _ext.load()
    a, b, c, gy, x, mean, invstd, w = bn_inputs((4, 3, 5), torch.float64, "cpu")
    dgy, dx, dw = torch.empty_like(x), torch.empty_like(x), torch.empty(3, dtype=x.dtype)
    p = [t.data_ptr() for t in (a, b, c, gy, x, mean, invstd, w, dgy, dx, dw)]
    has_cuda = _ext.build_info()["cuda"]
    for fn, extra in ((module.bn_double_backward_cpu, ()), (module.bn_double_backward_cuda, (0,))):
        if fn is module.bn_double_backward_cuda and not has_cuda:
            with pytest.raises(RuntimeError, match="built without CUDA"):
                fn(1, *p, 4, 3, 5, *extra)
            continue
        no_x = p[:4] + [0] + p[5:]
        with pytest.raises(RuntimeError, match=r"\(code -3\): a required pointer is NULL"):
            fn(1, *no_x, 4, 3, 5, *extra)
        with pytest.raises(RuntimeError, match=r"\(code -1\): dtype not supported"):
            fn(2, *p, 4, 3, 5, *extra)
        with pytest.raises(RuntimeError, match=r"\(code -2\): bad sizes"):
            fn(1, *p, 4, -3, 5, *extra)
    # The CPU twin: a, b, c, weight and dw may be NULL; N * S = 0 writes dw = 0.
    dw.fill_(7.0)
    module.bn_double_backward_cpu(1, *[0] * 10, p[10], 0, 3, 5)
    assert torch.equal(dw, torch.zeros(3, dtype=dw.dtype))
    module.bn_double_backward_cpu(1, 0, 0, 0, *p[3:7], 0, p[8], p[9], 0, 4, 3, 5)
    assert torch.equal(dgy, torch.zeros_like(dgy)) and torch.equal(dx, torch.zeros_like(dx))


def test_torch_backend_has_the_reference_bn_double_backward():
    from imaml_fast.backends import resolve_backend
    ops = resolve_backend("torch", "cpu", torch.float32).ops()
    assert ops["bn_double_backward"] is batch_norm_double_backward
    assert "bn_double_backward" in cpp_backend.load_ops()
    assert "bn_double_backward" in cuda_backend.load_ops()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_bn_double_backward_is_deterministic_at_scale(dtype):
    """Large channels (M = 50,176, many blocks' worth of elements per block), a 2-D input with
    a tall batch (strided columns), and C above any single-wave grid: the same bits twice,
    and the float64 reference's values."""
    ops = cuda_backend.load_ops()
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for shape in [(64, 16, 28, 28), (4096, 300), (2, 70000, 3)]:
        args = bn_inputs(shape, dtype, "cuda")
        one = ops["bn_double_backward"](*args)
        two = ops["bn_double_backward"](*args)
        assert all(torch.equal(u, v) for u, v in zip(one, two)), shape
        for got, want in zip(one, bn_reference64(args)):
            assert flat_rel(got, want) <= tol, shape


# ---- GPU only: low precision -------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_within_twice_the_reference_error(dtype):
    """flash-attention's rule: the kernel's error against an fp64 reference is at most twice
    the low-precision PyTorch reference's error (plus a little absolute slack)."""
    ops = cuda_backend.load_ops()
    T, P = 7, 4097
    dev = torch.device("cuda")
    phi, g, theta = (torch.randn(T, P, device=dev, dtype=torch.float64) for _ in range(3))
    exact = prox_update_ref(phi, g, theta, 0.1, 2.0)
    lp = [t.to(dtype) for t in (phi, g, theta)]
    err_k = (ops["prox_update"](*lp, 0.1, 2.0).double() - exact).abs().max()
    err_r = (prox_update_ref(*lp, 0.1, 2.0).double() - exact).abs().max()
    assert err_k <= 2 * err_r + 1e-6
    a, b = torch.randn(T, P, device=dev, dtype=torch.float64), torch.randn(T, P, device=dev,
                                                                           dtype=torch.float64)
    exact = batched_dot(a.to(dtype).double(), b.to(dtype).double())
    err_k = (ops["batched_dot"](a.to(dtype), b.to(dtype)).double() - exact).abs().max()
    err_r = (batched_dot(a.to(dtype), b.to(dtype)).double() - exact).abs().max()
    assert err_k <= 2 * err_r + 1e-4
    state = cg_state(T, P, torch.float64, dev, steps=2)
    exact = cg_update_fused_ref(*clone_all(state))
    low = [s.to(dtype) if s.is_floating_point() and s.dim() == 2 else s for s in clone_all(state)]
    low[4], low[7] = state[4].float(), state[7].float()
    got = ops["cg_update"](*clone_all(low))
    ref = cg_update_fused_ref(*clone_all(low))
    assert torch.equal(got[4], ref[4]) and torch.equal(got[5], ref[5])
    for k in range(3):
        err_k = (got[k].double() - exact[k]).abs().max()
        err_r = (ref[k].double() - exact[k]).abs().max()
        assert err_k <= 2 * err_r + 1e-3, (k, err_k, err_r)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_cg_update_is_deterministic_and_graph_capturable():
    ops = cuda_backend.load_ops()
    state = cg_state(32, 113_000, torch.float32, torch.device("cuda"), steps=1)
    a = ops["cg_update"](*clone_all(state))
    b = ops["cg_update"](*clone_all(state))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    work = clone_all(state)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops["cg_update"](*clone_all(state))  # warm-up on the side stream
        with torch.cuda.graph(g, stream=s):
            ops["cg_update"](*work)
    torch.cuda.current_stream().wait_stream(s)
    for w, s0 in zip(work, clone_all(state)):
        w.copy_(s0)
    g.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(u, v) for u, v in zip(work[:3] + work[4:7], a[:3] + a[3:6]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_twins_give_the_same_bits_on_any_number_of_threads(monkeypatch, dtype):
    # Sizes above the twins' threading threshold (T * P >= 65,536; P^2 for the dense CG), and
    # T not a multiple of the thread count. The twins follow torch.get_num_threads().
    module, _ = _ext.load()
    ops = cpp_backend.load_ops()
    T, P, Pd = 7, 10007, 101
    phi, g = torch.randn(T, P, dtype=dtype), torch.randn(T, P, dtype=dtype)
    theta = torch.randn(P, dtype=dtype)
    state = cg_state(T, P, dtype, "cpu", steps=2)
    H, bd = spd_matrices(T, Pd, dtype, "cpu"), torch.randn(T, Pd, dtype=dtype)
    runs = {}
    try:
        for n in (1, 2, 3):
            monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
            runs[n] = (ops["prox_update"](phi, g, theta, 0.1, 2.0),
                       ops["batched_dot"](phi, g),
                       *ops["cg_update"](*clone_all(state)),
                       *ops["dense_cg"](H, bd, 1.0, 0.5, 30, 0.0))
            assert module.cpu_threads() == n
    finally:
        module.set_cpu_threads(1)
    for n in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(runs[n], runs[1]))
    # and the single-thread results are the references' (as the tests above check in general)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel(runs[1][0], prox_update_ref(phi, g, theta, 0.1, 2.0)) <= tol
    want = cg_update_fused_ref(*clone_all(state))  # (x, r, p, rs, status, iters)
    assert rel(runs[1][2], want[0]) <= tol and torch.equal(runs[1][6], want[4])


# ---- conv2d_input_grad (CPU only) ------------------------------------------------------------
# (N, groups, C per group, O per group, H, W, KH, KW, stride, padding, dilation): the Omniglot
# layers with tasks as groups, stride 1, stride 3 with a 2x2 kernel (pixels no tap reaches),
# 5x5 (taps over two register tiles and a tail), 1x1, asymmetric settings, one group, one
# channel, and widths whose N * Ho * Wo is not a multiple of the vector width.
CONV_SHAPES = [
    (5, 4, 8, 6, 14, 14, 3, 3, (2, 2), (1, 1), (1, 1)),
    (5, 4, 8, 6, 8, 8, 3, 3, (2, 2), (1, 1), (1, 1)),
    (2, 3, 5, 4, 9, 9, 3, 3, (1, 1), (1, 1), (1, 1)),
    (3, 2, 4, 3, 10, 11, 2, 2, (3, 3), (0, 0), (1, 1)),
    (2, 2, 3, 5, 13, 12, 5, 5, (2, 1), (2, 1), (1, 2)),
    (4, 2, 6, 7, 7, 7, 1, 1, (2, 2), (0, 0), (1, 1)),
    (3, 1, 4, 4, 9, 7, 3, 2, (2, 3), (1, 0), (2, 1)),
    (6, 5, 1, 3, 11, 11, 3, 3, (2, 2), (1, 1), (1, 1)),
    (1, 2, 3, 2, 4, 4, 4, 4, (1, 1), (3, 3), (1, 1)),
]


def conv_inputs(shape, dtype, seed=0):
    N, G, C, O, H, W, KH, KW, stride, padding, dilation = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, G * C, H, W, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(G * O, C, KH, KW, generator=g, dtype=torch.float64).to(dtype)
    y = torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, G)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    return gy, x, w, list(stride), list(padding), list(dilation), G


def conv_reference64(args):
    from imaml_fast.layers import conv_input_grad_ref
    gy, x, w, *rest = args
    return conv_input_grad_ref(gy.double(), x.double(), w.double(), *rest)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv2d_input_grad_matches_aten(shape, dtype, tol):
    """The kernel against ATen's convolution_backward in float64, for every shape (also the
    ones conv_input_grad would leave to ATen); gx overwritten everywhere, also where no tap
    reaches (it must be zero there)."""
    args = conv_inputs(shape, dtype)
    got = cpp_backend.conv2d_input_grad(*args)
    assert got.dtype == dtype and got.shape == args[1].shape
    assert rel(got.unsqueeze(0), conv_reference64(args).unsqueeze(0)) <= tol


def test_conv2d_input_grad_zero_where_no_tap_reaches():
    """Stride 3, kernel 2: a third of the rows and columns of x never meet a tap, and their
    gradient is exactly zero, whatever was in memory."""
    args = conv_inputs((2, 2, 3, 4, 9, 9, 2, 2, (3, 3), (0, 0), (1, 1)), torch.float64)
    got = cpp_backend.conv2d_input_grad(*args)
    assert torch.equal(got[:, :, 2::3, :], torch.zeros_like(got[:, :, 2::3, :]))
    assert torch.equal(got[:, :, :, 2::3], torch.zeros_like(got[:, :, :, 2::3]))
    assert got[:, :, 0::3, 0::3].abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv2d_input_grad_same_bits_on_any_number_of_threads(monkeypatch, dtype):
    """Above the twins' threading threshold, a group count that is not a multiple of 3."""
    module, _ = _ext.load()
    args = conv_inputs((5, 7, 16, 16, 14, 14, 3, 3, (2, 2), (1, 1), (1, 1)), dtype)
    runs = {}
    try:
        for n in (1, 3):
            monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
            runs[n] = cpp_backend.conv2d_input_grad(*args)
            assert module.cpu_threads() == n
    finally:
        module.set_cpu_threads(1)
    assert torch.equal(runs[1], runs[3])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel(runs[1].unsqueeze(0), conv_reference64(args).unsqueeze(0)) <= tol


def test_conv_input_grad_runs_the_kernel_only_where_it_pays(monkeypatch):
    """The op behind ConvFn: strided 2-D convolutions with 2+ groups on plain float32/float64
    tensors go to the kernel; stride 1, one group, 1-D/3-D, other dtypes, tensors that need
    autograd and vmap's BatchedTensors go to ATen's convolution_backward (the same bits as
    the reference, which it then is)."""
    from imaml_fast.layers import conv_input_grad_ref
    calls = []
    kernel = cpp_backend.conv2d_input_grad
    monkeypatch.setattr(cpp_backend, "conv2d_input_grad",
                        lambda *a: calls.append(1) or kernel(*a))
    op = cpp_backend.load_ops()["conv_input_grad"]
    strided = conv_inputs((5, 4, 8, 6, 14, 14, 3, 3, (2, 2), (1, 1), (1, 1)), torch.float64)
    got = op(*strided)
    assert calls == [1] and rel(got.unsqueeze(0), conv_reference64(strided).unsqueeze(0)) <= 1e-12
    calls.clear()
    others = [conv_inputs((2, 3, 5, 4, 9, 9, 3, 3, (1, 1), (1, 1), (1, 1)), torch.float64),
              conv_inputs((3, 1, 4, 4, 9, 7, 3, 2, (2, 3), (1, 0), (2, 1)), torch.float64),
              conv_inputs((5, 4, 8, 6, 14, 14, 3, 3, (2, 2), (1, 1), (1, 1)), torch.bfloat16)]
    for args in others:
        assert torch.equal(op(*args), conv_input_grad_ref(*args))
    gy, x, w, *rest = strided
    x1 = x[:, :, 0]  # a 1-D convolution
    w1 = w[:, :, 0]
    gy1 = torch.nn.functional.conv1d(x1, w1, None, 2, 1, 1, 4)
    assert torch.equal(op(gy1, x1, w1, [2], [1], [1], 4), conv_input_grad_ref(gy1, x1, w1, [2],
                                                                              [1], [1], 4))
    gyg = gy.clone().requires_grad_()
    out = op(gyg, x, w, *rest)
    assert out.requires_grad and torch.equal(out, conv_input_grad_ref(gy, x, w, *rest))
    batched = torch.func.vmap(lambda g: op(g, x, w, *rest))(gy.unsqueeze(0).expand(2, *gy.shape))
    assert torch.equal(batched[1], conv_input_grad_ref(gy, x, w, *rest))
    assert calls == []
    with torch.no_grad():  # no graph to build: the kernel
        op(gyg, x, w, *rest)
    assert calls == [1]


def test_conv2d_input_grad_rejects_bad_arguments_by_name():
    gy, x, w, stride, padding, dilation, G = conv_inputs(
        (5, 4, 8, 6, 14, 14, 3, 3, (2, 2), (1, 1), (1, 1)), torch.float64)
    fn = cpp_backend.conv2d_input_grad
    with pytest.raises(ValueError, match=r"gy has shape \(5, 24, 7, 6\), but this convolution "
                                         r"of x \(5, 32, 14, 14\) gives \(5, 24, 7, 7\)"):
        fn(gy[..., :6], x, w, stride, padding, dilation, G)
    with pytest.raises(ValueError, match=r"which does not fit groups=3"):
        fn(gy, x, w, stride, padding, dilation, 3)
    with pytest.raises(ValueError, match=r"weight has dtype torch.float32; gy, x and weight"):
        fn(gy, x, w.float(), stride, padding, dilation, G)
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor \(a 2-D convolution\)"):
        fn(gy, x[0], w, stride, padding, dilation, G)
    with pytest.raises(ValueError, match=r"stride must be an int or a pair of ints >= 1, got \[0, 2\]"):
        fn(gy, x, w, [0, 2], padding, dilation, G)
    with pytest.raises(ValueError, match=r"padding must be an int or a pair of ints >= 0"):
        fn(gy, x, w, stride, [1, 1, 1], dilation, G)


def test_conv2d_input_grad_c_abi_codes():
    """The raw binding: bad dtype, NULL pointers, negative sizes, and an output size that is
    not the convolution's raise with the C ABI's code; no elements is a no-op."""
    module, _ = _ext.load()
    gy, x, w, *_ = conv_inputs((2, 2, 3, 4, 8, 8, 3, 3, (2, 2), (1, 1), (1, 1)), torch.float64)
    gx = torch.empty_like(x)
    p = (gy.data_ptr(), w.data_ptr(), gx.data_ptr())
    sizes = [2, 2, 3, 4, 8, 8, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1]
    fn = module.conv2d_input_grad_cpu
    with pytest.raises(RuntimeError, match=r"\(code -1\): dtype not supported"):
        fn(2, *p, *sizes)
    with pytest.raises(RuntimeError, match=r"\(code -3\): a required pointer is NULL"):
        fn(1, p[0], 0, p[2], *sizes)
    with pytest.raises(RuntimeError, match=r"\(code -2\): bad sizes"):
        fn(1, *p, *sizes[:2], -3, *sizes[3:])
    with pytest.raises(RuntimeError, match=r"\(code -6\)"):
        fn(1, *p, *sizes[:6], 5, *sizes[7:])  # Ho = 5: not what stride 2 on 8 rows gives
    fn(1, 0, 0, 0, 0, *sizes[1:])  # N = 0
    fn(1, *p, *sizes)
    assert rel(gx.unsqueeze(0), conv_reference64(
        (gy, x, w, [2, 2], [1, 1], [1, 1], 2)).unsqueeze(0)) <= 1e-12


def test_openmp_team_when_built_with_gcc():
    """The CPU twins' threads are an OpenMP team in a GCC build (csrc/src/cpu/cpu_common.h:
    next to PyTorch that reuses ATen's libgomp workers instead of competing with them), and
    in this process it is the libgomp that torch loaded."""
    info = _ext.build_info()
    if not info["cxx_compiler"].startswith("GNU"):
        pytest.skip(f"OpenMP is only required of GCC builds; this one: {info['cxx_compiler']}")
    assert info["openmp"]
    maps = Path("/proc/self/maps")
    if maps.exists():
        gomp = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
        torch_gomp = {p for p in gomp if os.sep + "torch" + os.sep in p}
        assert not torch_gomp or gomp == torch_gomp, gomp


# ---- bn_relu: BatchNorm then ReLU as one layer (CPU) --------------------------------------------

def bn_relu_inputs(shape, dtype, seed=0, affine=(True, True)):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(C, generator=g, dtype=torch.float64) if affine[0] else None
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64) if affine[1] else None
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(b), cast(gy)


def bn_relu_aten64(x, w, b, gy, eps=1e-5):
    """ATen's own BatchNorm and ReLU in float64, differentiated by autograd: the values the
    kernels must reproduce (an independent computation, not the references)."""
    F_ = torch.nn.functional
    xs, ws, bs = (None if t is None else t.detach().double().clone().requires_grad_()
                  for t in (x, w, b))
    y = F_.relu(F_.batch_norm(xs, None, None, ws, bs, True, 0.0, eps))
    leaves = [t for t in (xs, ws, bs) if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, gy.double()))
    gx = next(grads)
    gw = None if w is None else next(grads)
    gb = None if b is None else next(grads)
    return y.detach(), gx, gw, gb


# (3, 3, 1, 1): three elements per channel (with two, gx is all cancellation: relative error
# 1e-12 of a result 1e-5 the size of gy)
BN_RELU_SHAPES = [(5, 64, 7, 7), (3, 10), (2, 4, 3, 5, 2), (4, 6, 13), (3, 3, 1, 1), (9, 2, 8)]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape", BN_RELU_SHAPES)
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)])
def test_bn_relu_kernels_match_aten(shape, dtype, tol, affine):
    """Forward (y, mean, invstd) and backward (gx, gw, gb) of the kernels against ATen's
    BatchNorm + ReLU under autograd in float64: rows of every length (full vectors and
    tails, S = 1), with and without weight and bias."""
    x, w, b, gy = bn_relu_inputs(shape, dtype, affine=affine)
    y, mean, invstd = cpp_backend.bn_relu_forward(x, w, b, 1e-5)
    y64, gx64, gw64, gb64 = bn_relu_aten64(x, w, b, gy)
    dims = [0] + list(range(2, x.dim()))
    var64, mean64 = torch.var_mean(x.double(), dims, correction=0)
    assert y.dtype == dtype and flat_rel(y, y64) <= tol
    assert flat_rel(mean, mean64) <= tol and flat_rel(invstd, (var64 + 1e-5).rsqrt()) <= tol
    gx, gw, gb = cpp_backend.bn_relu_backward(gy, x, mean, invstd, w, b, (True, True, True))
    assert flat_rel(gx, gx64) <= tol
    assert (gw is None) == (w is None) and (gb is None) == (b is None)
    for got, want in ((gw, gw64), (gb, gb64)):
        if want is not None:
            assert flat_rel(got, want) <= tol


def test_bn_relu_backward_computes_only_what_the_mask_asks():
    x, w, b, gy = bn_relu_inputs((4, 6, 5, 5), torch.float64)
    y, mean, invstd = cpp_backend.bn_relu_forward(x, w, b, 1e-5)
    full = cpp_backend.bn_relu_backward(gy, x, mean, invstd, w, b, (True, True, True))
    for mask in [(True, False, False), (False, True, True), (False, False, True)]:
        got = cpp_backend.bn_relu_backward(gy, x, mean, invstd, w, b, mask)
        for m, g, f in zip(mask, got, full):
            assert (g is None) if not m else torch.equal(g, f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_relu_same_bits_on_any_number_of_threads(monkeypatch, dtype):
    """Above the twins' threading threshold, C not a multiple of the thread count (the last
    block of channels shorter), rows with and without a tail."""
    module, _ = _ext.load()
    inputs = [bn_relu_inputs(s, dtype, seed=i) for i, s in
              enumerate([(16, 7, 33, 19), (64, 5, 256), (22000, 3)])]
    runs = {}
    try:
        for n in (1, 3):
            monkeypatch.setattr(torch, "get_num_threads", lambda n=n: n)
            out = []
            for x, w, b, gy in inputs:
                y, mean, invstd = cpp_backend.bn_relu_forward(x, w, b, 1e-5)
                out += [y, mean, invstd, *cpp_backend.bn_relu_backward(
                    gy, x, mean, invstd, w, b, (True, True, True))]
            runs[n] = out
            assert module.cpu_threads() == n
    finally:
        module.set_cpu_threads(1)
    assert all(torch.equal(u, v) for u, v in zip(runs[1], runs[3]))


def test_bn_relu_mask_is_the_forwards():
    """The backward recomputes the ReLU mask from x: it must pass the gradient exactly where
    the forward's output is positive (checked on data with many pre-activations at 0: a
    channel whose bias puts half the elements on the threshold)."""
    x = torch.tensor([[-1.0, 1.0, -1.0, 1.0]], dtype=torch.float64).T.reshape(4, 1)
    x = torch.cat([x, torch.randn(4, 2, dtype=torch.float64)], 1)  # C = 3
    w = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # channel 0: z = xh + 1 is 0 or 2
    y, mean, invstd = cpp_backend.bn_relu_forward(x, w, b, 0.0)
    assert torch.equal(y[:, 0], torch.tensor([0.0, 2.0, 0.0, 2.0], dtype=torch.float64))
    gy = torch.ones_like(x)
    gx, gw, gb = cpp_backend.bn_relu_backward(gy, x, mean, invstd, w, b, (True, True, True))
    assert gb[0] == 2.0  # only the two positive outputs pass their gradient
    assert torch.equal(gb, (y > 0).double().sum(0))


def test_bn_relu_falls_back_to_the_references():
    """Other dtypes, inputs that need autograd and torch.func wrappers go to the references
    (imaml_fast.layers.bn_relu_forward_ref / bn_relu_backward_ref)."""
    from imaml_fast.layers import bn_relu_backward_ref, bn_relu_forward_ref

    x, w, b, gy = bn_relu_inputs((4, 6, 3, 3), torch.bfloat16)
    for got, want in zip(cpp_backend.bn_relu_forward(x, w, b, 1e-5),
                         bn_relu_forward_ref(x, w, b, 1e-5)):
        assert torch.equal(got, want)
    x, w, b, gy = bn_relu_inputs((4, 6, 3, 3), torch.float64)
    xg = x.clone().requires_grad_()
    y, mean, invstd = cpp_backend.bn_relu_forward(xg, w, b, 1e-5)
    assert y.requires_grad  # the differentiable reference ran
    batched = torch.func.vmap(lambda t: cpp_backend.bn_relu_forward(t, w, b, 1e-5)[0])(
        torch.stack([x, x]))
    assert torch.equal(batched[1], bn_relu_forward_ref(x, w, b, 1e-5)[0])
    mean, invstd = mean.detach(), invstd.detach()
    got = cpp_backend.bn_relu_backward(gy.half(), x.half(), mean.half(), invstd.half(),
                                       w.half(), b.half(), (True, True, True))
    want = bn_relu_backward_ref(gy.half(), x.half(), mean.half(), invstd.half(), w.half(),
                                b.half(), (True, True, True))
    assert all(torch.equal(g, v) for g, v in zip(got, want))


def test_bn_relu_rejects_bad_arguments_by_name():
    x, w, b, gy = bn_relu_inputs((4, 6, 3, 3), torch.float64)
    with pytest.raises(ValueError, match=r"bn_relu_forward: x must be \[N, C, \.\.\.\]"):
        cpp_backend.bn_relu_forward(x[0, 0, 0], w, b, 1e-5)
    with pytest.raises(ValueError, match=r"bn_relu_forward: weight is \(5,\) on cpu, expected "
                                         r"\(6,\)"):
        cpp_backend.bn_relu_forward(x, w[:5], b, 1e-5)
    y, mean, invstd = cpp_backend.bn_relu_forward(x, w, b, 1e-5)
    with pytest.raises(ValueError, match=r"bn_relu_backward: gy is \(4, 6, 3\) on cpu, expected "
                                         r"\(4, 6, 3, 3\)"):
        cpp_backend.bn_relu_backward(gy[..., 0], x, mean, invstd, w, b, (True, True, True))
    with pytest.raises(ValueError, match=r"bn_relu_backward: gy, mean and invstd are required"):
        cpp_backend.bn_relu_backward(gy, x, None, invstd, w, b, (True, True, True))


def test_bn_relu_c_abi_codes():
    """The raw bindings: bad dtype, NULL pointers, negative sizes, no elements per channel
    (batch statistics need one), a negative eps; no channels is a no-op."""
    module, _ = _ext.load()
    x, w, b, gy = bn_relu_inputs((3, 4, 5), torch.float64)
    y, mean, invstd = (torch.empty_like(x), torch.empty(4, dtype=torch.float64),
                       torch.empty(4, dtype=torch.float64))
    p = (x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), mean.data_ptr(),
         invstd.data_ptr())
    fwd = module.bn_relu_forward_cpu
    with pytest.raises(RuntimeError, match=r"\(code -1\): dtype not supported"):
        fwd(2, *p, 3, 4, 5, 1e-5)
    with pytest.raises(RuntimeError, match=r"\(code -3\): a required pointer is NULL"):
        fwd(1, 0, *p[1:], 3, 4, 5, 1e-5)
    with pytest.raises(RuntimeError, match=r"\(code -2\): bad sizes"):
        fwd(1, *p, -3, 4, 5, 1e-5)
    with pytest.raises(RuntimeError, match=r"\(code -2\): bad sizes"):
        fwd(1, *p, 0, 4, 5, 1e-5)
    with pytest.raises(RuntimeError, match=r"\(code -6\)"):
        fwd(1, *p, 3, 4, 5, -1.0)
    fwd(1, 0, 0, 0, 0, 0, 0, 3, 0, 5, 1e-5)  # C = 0
    fwd(1, *p, 3, 4, 5, 1e-5)
    y64, gx64, gw64, gb64 = bn_relu_aten64(x, w, b, gy)
    assert flat_rel(y, y64) <= 1e-12
    gx, gw, gb = torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)
    bwd = module.bn_relu_backward_cpu
    q = (gy.data_ptr(), x.data_ptr(), mean.data_ptr(), invstd.data_ptr(), w.data_ptr(),
         b.data_ptr())
    with pytest.raises(RuntimeError, match=r"\(code -3\): a required pointer is NULL"):
        bwd(1, *q[:2], 0, *q[3:], gx.data_ptr(), 0, 0, 3, 4, 5)
    bwd(1, *q, gx.data_ptr(), gw.data_ptr(), gb.data_ptr(), 3, 4, 5)
    assert flat_rel(gx, gx64) <= 1e-12 and flat_rel(gw, gw64) <= 1e-12
    assert flat_rel(gb, gb64) <= 1e-12

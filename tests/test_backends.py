import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from _helpers import class_episode, mlp
import imaml_fast
from imaml_fast import IMAMLConfig, backend_info, meta_gradient
from imaml_fast.backends import Backend, _REGISTRY, register_backend, resolve_backend


def test_backend_info_lists_every_backend_with_reasons():
    info = {b["name"]: b for b in backend_info("cpu")}
    assert {"reference", "torch"} <= set(info)
    for b in info.values():
        assert b["available"] == (not b["reasons"]) and b["summary"]
    assert info["torch"]["available"] and info["reference"]["available"]


def test_auto_on_cpu_takes_the_cpp_twin_then_torch_and_says_so():
    from imaml_fast.backends import cpp
    expected = "torch" if cpp.why_not(torch.device("cpu"), torch.float64) else "cpp"
    r = meta_gradient(mlp(), F.cross_entropy, *class_episode(2, 3, 3, (3,), 2), IMAMLConfig(inner_steps=1))
    assert r.backend == expected
    assert resolve_backend("auto", "cpu", torch.float32).name == expected
    # dtypes the C++ twin does not take fall back to torch
    assert resolve_backend("auto", "cpu", torch.bfloat16).name == "torch"


def test_explicit_backend_that_cannot_run_raises_with_its_reasons():
    fake = Backend(name="fake", summary="test double", batched=True,
                   why_not=lambda d, t: ["needs a build that is missing", f"{t} unsupported"])
    register_backend(fake)
    try:
        with pytest.raises(ValueError, match=r"backend='fake' cannot run on cpu.*build that is missing.*unsupported"):
            resolve_backend("fake", "cpu", torch.float64)
        info = {b["name"]: b for b in backend_info("cpu", torch.float64)}
        assert info["fake"]["available"] is False and len(info["fake"]["reasons"]) == 2
    finally:
        del _REGISTRY["fake"]
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("fake", "cpu", torch.float64)


def test_import_initialises_nothing_heavy():
    code = ("import sys, torch, imaml_fast; "
            "assert not torch.cuda.is_initialized(); "
            "assert 'triton' not in sys.modules; "
            "print(sorted(imaml_fast.__all__)[:1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_public_api():
    for name in ("IMAMLConfig", "meta_gradient", "IMAML", "cg_solve", "backend_info", "MetaGradient"):
        assert name in imaml_fast.__all__ and hasattr(imaml_fast, name)

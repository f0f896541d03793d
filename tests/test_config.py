import pytest

from imaml_fast import IMAMLConfig

BAD = [
    ("inner_solver", "sgd"), ("inner_solver", None),
    ("inner_steps", -1), ("inner_steps", 2.5), ("inner_steps", True),
    ("inner_lr", 0.0), ("inner_lr", -0.1), ("inner_lr", float("nan")), ("inner_lr", "0.1"),
    ("lam", 0.0), ("lam", -2.0), ("lam", float("inf")),
    ("cg_steps", -1), ("cg_steps", 1.0),
    ("cg_tol", -1e-3), ("cg_damping", -1.0),
    ("hvp", "fwd"), ("backend", "cuda-ish"),
    ("hf_cg_steps", 0), ("hf_ls_steps", 0),
    ("task_batching", 0), ("task_batching", "chunks"), ("task_batching", False),
    ("check_finite", 1), ("cg_clip", 1), ("cg_clip", True),  # cg_clip needs cg_damping > 0
    ("inner_tol", -0.1), ("inner_tol", 1.0), ("inner_tol", float("nan")), ("inner_tol", "0.1"),
    ("inner_tol", 0.1),  # inner_tol needs inner_solver="gd_armijo"
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"IMAMLConfig\.{field}="):
        IMAMLConfig(**{field: value})


def test_defaults_are_the_paper_settings():
    c = IMAMLConfig()
    assert (c.inner_solver, c.inner_steps, c.lam, c.cg_steps) == ("gd", 16, 2.0, 5)
    assert c.backend == "auto" and c.hvp == "auto"


def test_replace_validates_again():
    c = IMAMLConfig().replace(lam=0.5, task_batching=4)
    assert c.lam == 0.5 and c.task_batching == 4
    with pytest.raises(ValueError, match="IMAMLConfig.lam="):
        c.replace(lam=0)
    assert IMAMLConfig(cg_steps=0).cg_steps == 0  # first-order mode is allowed


def test_to_dict_round_trip():
    c = IMAMLConfig(inner_solver="hf", lam=3.0)
    assert IMAMLConfig(**c.to_dict()) == c


def test_cg_clip_says_it_needs_damping():
    with pytest.raises(ValueError, match="needs cg_damping > 0"):
        IMAMLConfig(cg_clip=True)
    assert IMAMLConfig(cg_clip=True, cg_damping=10.0).cg_clip


def test_inner_tol_says_which_solver_it_needs():
    for solver in ("gd", "hf"):
        with pytest.raises(ValueError, match="needs inner_solver='gd_armijo'"):
            IMAMLConfig(inner_solver=solver, inner_tol=0.01)
    assert IMAMLConfig(inner_solver="gd_armijo", inner_tol=0.01).inner_tol == 0.01
    assert IMAMLConfig().inner_tol == 0.0  # off by default: every task takes inner_steps

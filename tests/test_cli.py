import json
import subprocess
import sys

import pytest

from imaml_fast import cli
from imaml_fast import train as train_mod


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_then_eval_end_to_end(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "imaml_fast", "train", "--steps", "3", "--tasks", "3",
                        "--inner-steps", "2", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "trained 3 meta-steps" in p.stdout and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "imaml_fast", "eval", str(out / "checkpoint.pt"),
                        "--tasks", "20"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "eval.json").read_text())
    assert f"mse {r['mean']:.2f} ± {r['ci95']:.2f}" in p.stdout and "over 20" in p.stdout


@pytest.fixture(autouse=True)
def _malloc_defaults(monkeypatch):
    """The command changes this process's malloc settings (imaml_fast.cpu_memory); in the
    test process keep glibc's (tests/test_cpu_memory.py checks the settings)."""
    monkeypatch.setenv("IMAML_FAST_MALLOC", "default")


@pytest.fixture
def trained_settings(monkeypatch):
    """Replaces training with a stub; the dict gets the RunSettings the command built ("s")."""
    seen = {}

    def fake_train(s, resume=False, max_seconds=None):
        seen["s"], seen["max_seconds"] = s, max_seconds
        return {"steps": s.steps, "seconds": 0.0, "last": {"query_loss": 1.0}, "curve": None}

    monkeypatch.setattr(train_mod, "train_multiprocess", fake_train)
    return seen


def test_no_arguments_trains_the_sinusoid_preset(trained_settings, capsys):
    seen = trained_settings
    code, out, _ = run([], capsys)
    assert code == 0 and seen["s"].preset == "sinusoid" and seen["s"].steps == 1000
    assert seen["s"].out.startswith("runs/sinusoid-")


def test_flags_override_the_preset(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(train_mod, "train_multiprocess", lambda s, resume=False, max_seconds=None: seen.setdefault("s", s) and
                        {"steps": 0, "seconds": 0.0, "last": {}, "curve": None})
    run(["train", "omniglot-20w5s", "--lam", "3", "--inner-steps", "7", "--task-batching", "4",
         "--task-threads", "2", "--out", "x", "--data-root", "d"], capsys)
    s = seen["s"]
    assert (s.n_way, s.k_shot, s.lam, s.inner_steps, s.task_batching, s.cg_steps) == (20, 5, 3.0, 7, 4, 5)
    assert s.task_threads == 2 and s.imaml_config().task_threads == 2
    assert s.task_chunk is None and s.imaml_config().task_chunk is None


@pytest.mark.parametrize("value,chunk", [("8", 8), ("all", None)])
def test_task_chunk_flag(monkeypatch, capsys, value, chunk):
    seen = {}
    monkeypatch.setattr(train_mod, "train_multiprocess", lambda s, resume=False, max_seconds=None: seen.setdefault("s", s) and
                        {"steps": 0, "seconds": 0.0, "last": {}, "curve": None})
    run(["train", "omniglot-5w1s", "--task-chunk", value, "--out", "x", "--data-root", "d"], capsys)
    assert seen["s"].imaml_config().task_chunk == chunk


@pytest.mark.parametrize("value,says", [("0", "a chunk of tasks must be >= 1"),
                                        ("some", "use all or a number of tasks")])
def test_task_chunk_flag_refuses_what_is_not_a_count(capsys, value, says):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--task-chunk", value])
    assert says in capsys.readouterr().err


def test_warnings_read_as_the_commands_own_lines(monkeypatch, capsys):
    """While the command runs, a warning is formatted as its own line, without the library's
    file and source line (pytest records warnings itself, so the format is what is checked);
    afterwards Python's format is back."""
    import warnings

    seen = {}

    def fake_train(s, resume=False, max_seconds=None):
        seen["line"] = warnings.formatwarning("most tasks stopped early", RuntimeWarning,
                                              "train.py", 7)
        return {"steps": 1, "seconds": 0.1, "last": {}, "curve": None, "stopped": None}

    monkeypatch.setattr(train_mod, "train_multiprocess", fake_train)
    code, _, _ = run(["train", "--out", "x"], capsys)
    assert code == 0 and seen["line"] == "imaml-fast: warning: most tasks stopped early\n"
    after = warnings.formatwarning("most tasks stopped early", RuntimeWarning, "train.py", 7)
    assert "train.py:7" in after


def test_resuming_a_finished_run_says_so(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run(["train", "--steps", "2", "--tasks", "2", "--inner-steps", "1", "--out", out,
                "--no-progress"], capsys)[0] == 0
    code, text, _ = run(["train", "--out", out, "--resume", "--no-progress"], capsys)
    assert code == 0 and "trained 2 meta-steps" in text and "(nothing left to train)" in text


def test_resume_takes_the_runs_own_settings(tmp_path, capsys):
    """`train --out DIR --resume --steps N` continues with the preset and flags the run was
    started with (here all non-default) and ends where an uninterrupted run ends."""
    import torch

    flags = ["--tasks", "3", "--inner-steps", "2", "--lam", "3", "--inner-solver", "gd_armijo",
             "--seed", "5", "--checkpoint-every", "1", "--no-progress"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(["train", "sinusoid", "--steps", "2", "--out", a] + flags, capsys)[0] == 0
    assert run(["train", "--out", a, "--resume", "--steps", "4", "--no-progress"], capsys)[0] == 0
    assert run(["train", "sinusoid", "--steps", "4", "--out", b] + flags, capsys)[0] == 0
    sa = json.loads((tmp_path / "a" / "settings.json").read_text())
    sb = json.loads((tmp_path / "b" / "settings.json").read_text())
    assert {k: v for k, v in sa.items() if k != "out"} == {k: v for k, v in sb.items() if k != "out"}
    assert (sa["lam"], sa["seed"], sa["inner_solver"], sa["tasks"], sa["steps"]) == (3.0, 5, "gd_armijo", 3, 4)
    ma = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    mb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    # a flag that changes the run is still refused, naming it; so is another preset
    code, _, err = run(["train", "--out", a, "--resume", "--lam", "2"], capsys)
    assert code == 2 and "another configuration (lam: checkpoint 3.0, now 2.0)" in err
    code, _, err = run(["train", "omniglot-5w1s", "--out", a, "--resume"], capsys)
    assert code == 2 and "preset: checkpoint 'sinusoid', now 'omniglot-5w1s'" in err


def test_time_limit_is_passed_in_seconds(trained_settings, capsys):
    run(["train", "--time-limit", "1.5", "--out", "x"], capsys)
    assert trained_settings["max_seconds"] == 90.0
    run(["train", "--out", "y"], capsys)
    assert trained_settings["max_seconds"] is None


def test_cg_clip_flag_reaches_the_settings(trained_settings, capsys):
    run(["train", "--cg-clip", "--out", "x"], capsys)
    assert trained_settings["s"].cg_clip is True and trained_settings["s"].imaml_config().cg_clip
    run(["train", "--out", "y"], capsys)
    assert trained_settings["s"].cg_clip is False


def test_tf32_flag_reaches_the_engine_config(trained_settings, capsys):
    run(["train", "--tf32", "--out", "x"], capsys)
    assert trained_settings["s"].tf32 is True and trained_settings["s"].imaml_config().tf32
    run(["train", "--out", "y"], capsys)
    assert trained_settings["s"].tf32 is False and not trained_settings["s"].imaml_config().tf32


def test_inner_tol_flag_reaches_the_settings(trained_settings, capsys):
    run(["train", "--inner-solver", "gd_armijo", "--inner-tol", "0.05", "--out", "x"], capsys)
    assert trained_settings["s"].inner_tol == 0.05
    assert trained_settings["s"].imaml_config().inner_tol == 0.05
    run(["train", "--out", "y"], capsys)
    assert trained_settings["s"].inner_tol == 0.0


def test_cuda_graphs_flag_reaches_the_settings(trained_settings, capsys):
    run(["train", "--cuda-graphs", "--out", "x"], capsys)
    assert trained_settings["s"].cuda_graphs is True
    run(["train", "--out", "y"], capsys)
    assert trained_settings["s"].cuda_graphs == "auto"
    run(["train", "--no-cuda-graphs", "--out", "z"], capsys)
    assert trained_settings["s"].cuda_graphs is False


def test_eval_flags_reach_the_settings(trained_settings, capsys):
    run(["train", "--eval-every", "500", "--eval-tasks", "100", "--out", "x"], capsys)
    assert trained_settings["s"].eval_every == 500 and trained_settings["s"].eval_tasks == 100
    run(["train", "--out", "y"], capsys)
    assert trained_settings["s"].eval_every == 0 and trained_settings["s"].eval_tasks == 600


def test_the_summary_line_reports_the_last_evaluation(monkeypatch, capsys):
    ev = {"metric": "accuracy", "mean": 91.456, "ci95": 0.591, "unit": "%", "step": 1000}
    monkeypatch.setattr(train_mod, "train_multiprocess", lambda s, resume=False, max_seconds=None: {
        "steps": 1000, "seconds": 1.0, "last": {"accuracy": 0.9}, "curve": None, "eval": ev})
    code, out, _ = run(["train", "--out", "x", "--eval-every", "1000"], capsys)
    assert code == 0 and "meta-test accuracy 91.46 ± 0.59% at step 1000" in out


@pytest.mark.parametrize("argv,message", [
    (["train", "--lam", "-1", "--out", "{tmp}/a"], "IMAMLConfig.lam=-1.0 is invalid"),
    (["train", "--inner-solver", "hf", "--hvp", "auto", "--backend", "nope", "--out", "{tmp}/b"],
     "IMAMLConfig.backend='nope' is invalid"),
    (["train", "omniglot-5w1s", "--out", "{tmp}/c"], "needs --data-root"),
    (["train", "omniglot-5w1s", "--data-root", "{tmp}/missing", "--out", "{tmp}/d"], "missing"),
    (["train", "--resume", "--out", "{tmp}/nothing"], "does not exist"),
    (["eval", "{tmp}/none.pt"], "no checkpoint at"),
    (["train", "--device", "cuda:0", "--out", "{tmp}/e"], "cuda"),
    (["train", "--cuda-graphs", "--out", "{tmp}/f"], "cuda_graphs=True needs a CUDA device"),
    (["train", "--time-limit", "0", "--out", "{tmp}/g"], "--time-limit 0 is invalid"),
    (["train", "--eval-every", "5", "--eval-tasks", "1", "--out", "{tmp}/h"],
     "eval_tasks=1 is invalid"),
])
def test_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if message == "cuda":
        import torch
        if torch.cuda.is_available():
            pytest.skip("this check needs a machine without CUDA")
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message.lower() in err.lower(), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.rglob("checkpoint.pt"))


def test_corrupt_zip_exits_2(tmp_path, capsys):
    root = tmp_path / "omni"
    root.mkdir()
    (root / "images_background.zip").write_bytes(b"not a zip at all")
    (root / "images_evaluation.zip").write_bytes(b"neither")
    code, _, err = run(["train", "omniglot-5w1s", "--data-root", str(root), "--out",
                        str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 2 and "zip" in err.lower() and "Traceback" not in err


def test_checkpoint_from_another_configuration_exits_2(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run(["train", "--steps", "2", "--tasks", "2", "--inner-steps", "1", "--out", out,
                "--no-progress"], capsys)[0] == 0
    code, _, err = run(["train", "--steps", "4", "--tasks", "3", "--inner-steps", "1", "--out", out,
                        "--resume", "--no-progress"], capsys)
    assert code == 2 and "another configuration (tasks: checkpoint 2, now 3)" in err


def test_argparse_rejects_unknown_preset_and_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "omniglot-99w1s"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--no-such-flag"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--task-batching", "zero"])
    assert e.value.code == 2


def test_backends_command_lists_them(capsys):
    code, out, _ = run(["backends"], capsys)
    assert code == 0 and "torch" in out and "reference" in out and "available" in out


def test_layer_derivatives_flag_reaches_the_engine_config(trained_settings, capsys):
    seen = trained_settings
    code, _, _ = run(["train", "--layer-derivatives", "autograd", "--steps", "1"], capsys)
    assert code == 0 and seen["s"].imaml_config().layer_derivatives == "autograd"
    code, _, _ = run(["train", "--steps", "1"], capsys)
    assert seen["s"].imaml_config().layer_derivatives == "closed_form"
    with pytest.raises(SystemExit):
        cli.main(["train", "--layer-derivatives", "fused"])

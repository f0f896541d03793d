import json

import pytest
import torch

from _data_helpers import REAL_OMNIGLOT, real_omniglot
from imaml_fast.checkpoint import CheckpointError, load_checkpoint
from imaml_fast.train import (EVAL_SEED, RunSettings, build_model, build_sampler, evaluate,
                              loss_fn_for, train)
from imaml_fast.trainer import IMAML


def sin_settings(out, **kw):
    base = dict(steps=6, tasks=4, inner_steps=2, checkpoint_every=3, progress=False,
                task_batching="vmap")
    base.update(kw)
    return RunSettings.from_preset("sinusoid", out=str(out), **base)


def params(run):
    return load_checkpoint(run / "checkpoint.pt")["model"]


def log_records(path, drop=("tasks_per_s", "seconds")):
    """The lines of a metrics or evals log without the fields that depend on timing."""
    return [{k: v for k, v in json.loads(l).items() if k not in drop}
            for l in path.read_text().splitlines()]


def meta_test_by_hand(checkpoint, n, **overrides):
    """(mean, ci95) of the first n meta-test tasks of stream EVAL_SEED, drawn in meta-batches
    of the run's size, adapted from the checkpoint's parameters; each task's accuracy (%) or
    MSE computed here from its own outputs, and the mean and 1.96 std / sqrt(n) by the
    statistics module."""
    import math
    import statistics

    ck = load_checkpoint(checkpoint)
    s = RunSettings(**{**ck["settings"], **overrides})
    model = build_model(s)
    model.load_state_dict(ck["model"])
    learner = IMAML(model, loss_fn_for(s), s.imaml_config())
    sampler = build_sampler(s, "test", min(s.tasks, n), seed=EVAL_SEED)
    values = []
    while len(values) < n:
        xs, ys, xq, yq = sampler.sample()
        out = learner.predict(learner.adapt(xs, ys), xq)
        for o, y in zip(out, yq):
            values.append(((o - y) ** 2).mean().item() if s.task == "sinusoid"
                          else 100 * (o.argmax(-1) == y).double().mean().item())
    values = values[:n]
    return statistics.fmean(values), 1.96 * statistics.stdev(values) / math.sqrt(n)


def test_evaluations_during_training_are_the_meta_test_figures_and_change_nothing(tmp_path):
    # 9 tasks in meta-batches of 4: the third batch is cut
    with_eval = sin_settings(tmp_path / "eval", eval_every=3, eval_tasks=9)
    summary = train(with_eval)
    train(sin_settings(tmp_path / "plain"))
    a, b = params(tmp_path / "eval"), params(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)  # evaluating took no training randomness
    assert log_records(tmp_path / "eval" / "metrics.jsonl") == log_records(tmp_path / "plain" / "metrics.jsonl")
    assert not (tmp_path / "plain" / "evals.jsonl").exists()
    evals = [json.loads(l) for l in (tmp_path / "eval" / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 6] and summary["eval"]["step"] == 6
    assert all(e["tasks"] == 9 and e["metric"] == "mse" and e["eval_seed"] == EVAL_SEED for e in evals)
    mean, ci = meta_test_by_hand(tmp_path / "eval" / "checkpoint.pt", 9)
    assert evals[1]["mean"] == pytest.approx(mean, rel=1e-6)
    assert evals[1]["ci95"] == pytest.approx(ci, rel=1e-5)
    # step 3's parameters: a run of 3 steps ends where this one was at step 3
    train(sin_settings(tmp_path / "three", steps=3))
    r = evaluate(tmp_path / "three" / "checkpoint.pt", tasks=9)
    assert evals[0]["mean"] == r["mean"] and evals[0]["ci95"] == r["ci95"]
    assert evals[0]["mean"] != evals[1]["mean"]


def test_a_resumed_run_drops_evaluations_past_its_checkpoint_and_goes_on(tmp_path):
    train(sin_settings(tmp_path / "whole", eval_every=2, eval_tasks=5))
    run = tmp_path / "split"
    train(sin_settings(run, eval_every=2, eval_tasks=5), stop_after=3)  # checkpoint at 3
    with open(run / "evals.jsonl", "a") as f:  # as if killed after an evaluation at step 4
        f.write(json.dumps({"step": 4, "mean": -1.0}) + "\n")
    train(sin_settings(run, eval_every=2, eval_tasks=5), resume=True)
    got = log_records(run / "evals.jsonl")
    assert [e["step"] for e in got] == [2, 4, 6]
    assert got == log_records(tmp_path / "whole" / "evals.jsonl")


def test_a_resumed_run_evaluates_its_checkpoint_step_if_that_evaluation_is_missing(tmp_path):
    train(sin_settings(tmp_path / "whole", eval_every=3, eval_tasks=5))
    run = tmp_path / "split"
    train(sin_settings(run, eval_every=3, eval_tasks=5), stop_after=3)  # checkpoint at 3
    (run / "evals.jsonl").write_text("")  # as if killed between the checkpoint and its evaluation
    train(sin_settings(run, eval_every=3, eval_tasks=5), resume=True)
    got = log_records(run / "evals.jsonl")
    assert [e["step"] for e in got] == [3, 6] and got == log_records(tmp_path / "whole" / "evals.jsonl")


def test_evaluation_settings_are_checked_and_may_change_on_resume(tmp_path):
    for kw, message in (({"eval_every": -1}, "eval_every=-1 is invalid"),
                        ({"eval_tasks": 1}, "eval_tasks=1 is invalid"),
                        ({"eval_every": 1.5}, "eval_every=1.5 is invalid"),
                        ({"eval_every": 2, "eval_tasks": 2, "nproc": 3},
                         "nproc=3 is more than eval_tasks=2")):
        with pytest.raises(ValueError, match=message):
            train(sin_settings(tmp_path / "bad", **kw))
        assert not (tmp_path / "bad").exists()
    train(sin_settings(tmp_path / "run", steps=2))
    train(sin_settings(tmp_path / "run", steps=4, eval_every=4, eval_tasks=3), resume=True)
    evals = (tmp_path / "run" / "evals.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in evals] == [4]


def test_sinusoid_run_writes_its_folder(tmp_path):
    summary = train(sin_settings(tmp_path / "run"))
    run = tmp_path / "run"
    assert summary["steps"] == 6
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 7))
    assert all(l["query_loss"] > 0 and l["tasks_per_s"] > 0 for l in lines)
    saved = json.loads((run / "settings.json").read_text())
    assert saved["preset"] == "sinusoid" and saved["task_batching"] == "vmap"
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 6
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_meta_training_lowers_the_sinusoid_query_loss(tmp_path):
    s = sin_settings(tmp_path / "run", steps=150, tasks=10, inner_steps=10, checkpoint_every=150)
    train(s)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(l["query_loss"] for l in lines[:20]) / 20
    last = sum(l["query_loss"] for l in lines[-20:]) / 20
    assert last < 0.75 * first, (first, last)


def test_resume_is_bit_identical(tmp_path):
    train(sin_settings(tmp_path / "whole"))
    # stop right after the checkpoint of step 3 (as if killed there), then resume
    train(sin_settings(tmp_path / "split"), stop_after=3)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 3
    train(sin_settings(tmp_path / "split"), resume=True)
    a, b = params(tmp_path / "whole"), params(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["optimizer"]
    ob = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["optimizer"]
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])
    assert log_records(tmp_path / "whole" / "metrics.jsonl") == log_records(tmp_path / "split" / "metrics.jsonl")


def test_a_killed_run_loses_only_the_steps_since_the_last_checkpoint(tmp_path, monkeypatch):
    real = IMAML.meta_step
    calls = {"n": 0}

    def dies_at_step_5(self, *a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(IMAML, "meta_step", dies_at_step_5)
    s = sin_settings(tmp_path / "run", checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(s)
    run = tmp_path / "run"
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(IMAML, "meta_step", real)
    train(sin_settings(run, checkpoint_every=2), resume=True)
    train(sin_settings(tmp_path / "whole", checkpoint_every=2))
    a, b = params(run), params(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_a_run_folder_in_use_by_another_process_is_refused_and_left_alone(tmp_path):
    """A resume started while the run still trains would cut its metrics back to the last
    checkpoint and interleave checkpoints: the folder's lock refuses it, naming the holder,
    and changes nothing; once the holder is gone, the resume runs."""
    import fcntl

    from imaml_fast.train import LOCK_FILE

    run = tmp_path / "run"
    train(sin_settings(run, steps=4, checkpoint_every=2), stop_after=3)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK_FILE}
    holder = open(run / LOCK_FILE, "a+")  # another open file: flock conflicts like a process
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.seek(0), holder.truncate(), holder.write("pid 4242\n"), holder.flush()
    with pytest.raises(ValueError, match=r"in use by another training process \(pid 4242\)"):
        train(sin_settings(run, steps=4, checkpoint_every=2), resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK_FILE} == before
    # a new run into a fresh folder is not held up by it
    train(sin_settings(tmp_path / "other", steps=1))
    holder.close()
    train(sin_settings(run, steps=4, checkpoint_every=2), resume=True)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4


def test_resume_refuses_another_configuration(tmp_path):
    train(sin_settings(tmp_path / "run"))
    with pytest.raises(CheckpointError, match=r"another configuration \(lam: checkpoint 2.0, now 3.0"):
        train(sin_settings(tmp_path / "run", lam=3.0, steps=8), resume=True)
    with pytest.raises(ValueError, match="already holds a run"):
        train(sin_settings(tmp_path / "run"))
    # more steps with the same settings is fine
    train(sin_settings(tmp_path / "run", steps=8), resume=True)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 8


def test_corrupt_checkpoint_is_refused(tmp_path):
    train(sin_settings(tmp_path / "run"))
    ck = tmp_path / "run" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable imaml_fast checkpoint"):
        evaluate(ck, tasks=10)


def test_sinusoid_eval_reports_mean_and_ci(tmp_path):
    train(sin_settings(tmp_path / "run"))
    r = evaluate(tmp_path / "run" / "checkpoint.pt", tasks=30)
    assert r["metric"] == "mse" and r["tasks"] == 30 and r["mean"] > 0 and r["ci95"] > 0
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["mean"] == r["mean"]
    assert evaluate(tmp_path / "run" / "checkpoint.pt", tasks=30)["mean"] == r["mean"]  # seeded


@pytest.fixture
def omniglot_cache(tmp_path_factory, monkeypatch):
    _, cache_dir = real_omniglot(tmp_path_factory)
    monkeypatch.setenv("IMAML_FAST_CACHE", str(cache_dir))
    return cache_dir


def test_omniglot_train_and_eval_on_real_data(tmp_path, omniglot_cache):
    s = RunSettings.from_preset("omniglot-5w1s", out=str(tmp_path / "run"), steps=2, tasks=2,
                                inner_steps=2, progress=False, data_root=str(REAL_OMNIGLOT),
                                task_batching="vmap")
    s.eval_every, s.eval_tasks = 2, 6
    summary = train(s)
    assert 0.0 <= summary["last"]["accuracy"] <= 1.0
    r = evaluate(tmp_path / "run" / "checkpoint.pt", tasks=6)
    assert r["metric"] == "accuracy" and r["tasks"] == 6 and r["unit"] == "%"
    assert r["split"].startswith("meta-test characters")
    # evaluation by hand: the same accuracy from the same episodes
    mean, ci = meta_test_by_hand(tmp_path / "run" / "checkpoint.pt", 6,
                                 data_root=str(REAL_OMNIGLOT))
    # (the library counts in float32: 0.4 is 0.4000000059604645)
    assert r["mean"] == pytest.approx(mean, rel=1e-6) and r["ci95"] == pytest.approx(ci, rel=1e-6)
    # ... and the evaluation the run made at its last step
    assert summary["eval"]["mean"] == r["mean"] and summary["eval"]["ci95"] == r["ci95"]


def test_omniglot_needs_a_data_root(tmp_path):
    s = RunSettings.from_preset("omniglot-5w1s", out=str(tmp_path / "run"), steps=1, progress=False)
    with pytest.raises(ValueError, match="--data-root"):
        train(s)
    assert not (tmp_path / "run").exists()  # no run folder (nor its lock) left behind


def test_a_rare_divergent_meta_batch_is_skipped_a_persistent_one_ends_the_run(tmp_path, monkeypatch):
    real = IMAML.meta_step
    calls = {"n": 0}

    def diverges_on_call_2(self, *a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("not finite")
        return real(self, *a)

    monkeypatch.setattr(IMAML, "meta_step", diverges_on_call_2)
    summary = train(sin_settings(tmp_path / "run"))
    assert summary["steps"] == 6 and summary["last"]["skipped"] == 1 and calls["n"] == 7

    def always(self, *a):
        raise FloatingPointError("not finite")

    monkeypatch.setattr(IMAML, "meta_step", always)
    with pytest.raises(FloatingPointError):
        train(sin_settings(tmp_path / "bad"))


def test_metrics_log_the_share_of_tasks_stopped_by_negative_curvature(tmp_path, monkeypatch):
    """Sinusoid tasks without cg_damping have indefinite Hessians (presets.py): some tasks' CG
    stops on p'Ap <= 0. Each line's cg_negative_curvature is that step's share of such tasks,
    and cg_iters the mean iterations, as the meta-steps' own results say."""
    from imaml_fast.cg import CG_NEGATIVE_CURVATURE

    real, seen, cosines = IMAML.meta_step, [], []

    def recording(self, *a):
        stats = real(self, *a)
        seen.append((stats.result.cg_status.clone(), stats.result.cg_iters.clone(),
                     stats.result.inner_residual.clone()))
        cosines.append(stats.result.first_order_cosine.double().mean().item())
        return stats

    monkeypatch.setattr(IMAML, "meta_step", recording)
    train(sin_settings(tmp_path / "run", steps=8, tasks=10, inner_steps=10, cg_damping=0.0))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(seen) == 8
    shares = [(st == CG_NEGATIVE_CURVATURE).double().mean().item() for st, _, _ in seen]
    assert [l["cg_negative_curvature"] for l in lines] == pytest.approx(shares, abs=1e-12)
    assert [l["cg_iters"] for l in lines] == pytest.approx(
        [it.double().mean().item() for _, it, _ in seen], abs=1e-12)
    assert [l["inner_residual"] for l in lines] == pytest.approx(
        [r.double().mean().item() for _, _, r in seen], rel=1e-6)
    assert all(0 < l["inner_residual"] < 1 for l in lines)
    assert 0 < sum(shares) < len(shares)  # some tasks stopped early, not all
    # undamped, the implicit term turns these tasks' gradients: the mean cosine is below 1
    assert [l["first_order_cosine"] for l in lines] == pytest.approx(cosines, rel=1e-6)
    assert all(-1 <= c < 0.999 for c in cosines)


def test_a_run_whose_tasks_keep_stopping_on_negative_curvature_is_warned_once(tmp_path, monkeypatch):
    """The warning needs a whole window of steps with most tasks stopped; it names the
    fix. The same run with its real statuses (sinusoid, cg_damping 10: positive definite)
    stays quiet."""
    import warnings as w

    from imaml_fast.cg import CG_NEGATIVE_CURVATURE
    from imaml_fast.train import CURVATURE_WINDOW

    steps = CURVATURE_WINDOW + 5
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        train(sin_settings(tmp_path / "quiet", steps=steps, checkpoint_every=steps))
    assert not [c for c in caught if "negative curvature" in str(c.message)]
    lines = (tmp_path / "quiet" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(l)["cg_negative_curvature"] <= 0.5 for l in lines)

    real, calls = IMAML.meta_step, {"n": 0}

    def stops_after_warmup(self, *a):
        stats = real(self, *a)
        calls["n"] += 1
        if calls["n"] > 3:  # steps 4, 5, ...: every task flagged
            stats.result.cg_status.fill_(CG_NEGATIVE_CURVATURE)
        return stats

    monkeypatch.setattr(IMAML, "meta_step", stops_after_warmup)
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        train(sin_settings(tmp_path / "stalls", steps=steps, checkpoint_every=steps))
    msgs = [str(c.message) for c in caught if "negative curvature" in str(c.message)]
    # steps 4 .. 25 all flagged: the first full window (steps 1-20) is 17/20 flagged, and the
    # warning comes once, not at every later step
    assert len(msgs) == 1 and "a larger --cg-damping (now 10)" in msgs[0]
    assert "--inner-lr (now 0.02)" in msgs[0] and "--cg-steps 0" in msgs[0]
    # the preset already runs the line search: not suggested again
    assert "--inner-solver" not in msgs[0]


def test_metrics_log_the_share_of_clipped_tasks(tmp_path, monkeypatch):
    """--cg-clip reaches the engine, and each line's cg_clipped is its step's share of tasks
    whose CG solution was scaled down (sinusoid, cg_damping 1: a few tasks per run)."""
    real, seen = IMAML.meta_step, []

    def recording(self, *a):
        stats = real(self, *a)
        assert self.config.cg_clip
        seen.append(stats.result.cg_clipped.double().mean().item())
        return stats

    monkeypatch.setattr(IMAML, "meta_step", recording)
    train(sin_settings(tmp_path / "run", steps=8, tasks=10, inner_steps=10, cg_damping=1.0,
                       cg_clip=True))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["cg_clipped"] for l in lines] == pytest.approx(seen, abs=1e-12)
    assert 0 < sum(seen) < len(seen)


def test_metrics_log_the_mean_inner_steps_that_inner_tol_left(tmp_path, monkeypatch):
    """--inner-tol reaches the engine; each line's inner_steps is its step's mean of the
    steps each task's inner loop ran, below inner_steps where the tolerance stopped it."""
    real, seen = IMAML.meta_step, []

    def recording(self, *a):
        stats = real(self, *a)
        assert self.config.inner_tol == 0.1
        seen.append(stats.result.inner_steps.double().mean().item())
        return stats

    monkeypatch.setattr(IMAML, "meta_step", recording)
    train(sin_settings(tmp_path / "run", steps=6, tasks=10, inner_steps=30, inner_tol=0.1))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["inner_steps"] for l in lines] == pytest.approx(seen, abs=1e-12)
    assert all(0 < v < 30 for v in seen)
    monkeypatch.setattr(IMAML, "meta_step", real)
    train(sin_settings(tmp_path / "fixed", steps=2, tasks=10, inner_steps=7))
    lines = [json.loads(l) for l in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]
    assert [l["inner_steps"] for l in lines] == [7.0, 7.0]


def test_warnings_suggest_only_what_the_run_does_not_do_already(tmp_path):
    from imaml_fast.train import _fixes

    gd = sin_settings(tmp_path, inner_solver="gd", inner_lr=0.1, inner_steps=5, cg_damping=0.0)
    assert _fixes(gd, damping=True) == (
        "--inner-solver gd_armijo (a line search that keeps the inner loop convergent), a "
        "larger --cg-damping (now 0), a smaller --inner-lr (now 0.1) with more --inner-steps "
        "(now 5), or --cg-steps 0 (first-order)")
    first_order = sin_settings(tmp_path, cg_steps=0, inner_lr=0.02, inner_steps=10)
    assert _fixes(first_order) == "a smaller --inner-lr (now 0.02) with more --inner-steps (now 10)"


def test_a_run_whose_inner_loops_end_far_from_solved_is_warned_once(tmp_path, monkeypatch):
    """The inner-residual warning: quiet for the sinusoid preset's own inner loop; once, naming
    the fix, when the window's mean residual exceeds INNER_RESIDUAL_WARN (here from step 4
    on every task's residual is 2: the inner loop ended with twice its first gradient)."""
    import warnings as w

    from imaml_fast.train import CURVATURE_WINDOW, INNER_RESIDUAL_WARN

    steps = CURVATURE_WINDOW + 5
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        train(sin_settings(tmp_path / "quiet", steps=steps, checkpoint_every=steps,
                           inner_steps=10))
    assert not [c for c in caught if "inner_residual" in str(c.message)]
    lines = [json.loads(l) for l in (tmp_path / "quiet" / "metrics.jsonl").read_text().splitlines()]
    assert max(l["inner_residual"] for l in lines) < INNER_RESIDUAL_WARN

    real, calls = IMAML.meta_step, {"n": 0}

    def stalls_after_warmup(self, *a):
        stats = real(self, *a)
        calls["n"] += 1
        if calls["n"] > 3:
            stats.result.inner_residual.fill_(2.0)
        return stats

    monkeypatch.setattr(IMAML, "meta_step", stalls_after_warmup)
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        train(sin_settings(tmp_path / "stalls", steps=steps, checkpoint_every=steps,
                           inner_steps=10))
    msgs = [str(c.message) for c in caught if "inner_residual" in str(c.message)]
    assert len(msgs) == 1 and "--inner-lr (now 0.02) with more --inner-steps (now 10)" in msgs[0]
    assert "--inner-solver" not in msgs[0] and "--cg-damping" not in msgs[0]
    lines = [json.loads(l) for l in (tmp_path / "stalls" / "metrics.jsonl").read_text().splitlines()]
    assert [l["inner_residual"] for l in lines[3:]] == [2.0] * (steps - 3)
    assert not [c for c in caught if "negative curvature" in str(c.message)]


def test_resume_of_a_checkpoint_from_before_layer_derivatives(tmp_path):
    """Settings a checkpoint's version did not have count as their defaults: a run saved
    without layer_derivatives resumes with the default and refuses another value."""
    from imaml_fast.checkpoint import save_atomic

    run = tmp_path / "run"
    train(sin_settings(run, steps=3))
    ck = load_checkpoint(run / "checkpoint.pt")
    del ck["settings"]["layer_derivatives"]
    save_atomic(ck, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="layer_derivatives: checkpoint 'closed_form', now 'autograd'"):
        train(sin_settings(run, steps=6, layer_derivatives="autograd"), resume=True)
    train(sin_settings(run, steps=6), resume=True)
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 6


def test_a_checkpoint_with_settings_from_a_later_version_is_refused_naming_them(tmp_path):
    """Resuming or evaluating must not silently drop a setting it does not know (it could
    change what the run computes): both refuse with one CheckpointError naming it."""
    from imaml_fast.checkpoint import save_atomic

    run = tmp_path / "run"
    train(sin_settings(run, steps=2))
    ck = load_checkpoint(run / "checkpoint.pt")
    ck["settings"]["inner_momentum"] = 0.9
    save_atomic(ck, run / "checkpoint.pt")
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"does not know \(inner_momentum\).*upgrade"):
        RunSettings.resumed(run, steps=4)
    with pytest.raises(CheckpointError, match=r"does not know \(inner_momentum\)"):
        train(sin_settings(run, steps=4), resume=True)  # the Python API's resume too
    with pytest.raises(CheckpointError, match=r"does not know \(inner_momentum\)"):
        evaluate(run / "checkpoint.pt", tasks=4)
    assert (run / "checkpoint.pt").read_bytes() == before and not (run / "eval.json").exists()


@pytest.mark.parametrize("kw,message", [
    (dict(cuda_graphs=True, backend="reference"), "cannot capture backend='reference'"),
    (dict(cuda_graphs=True, device="cpu"), "cuda_graphs=True needs a CUDA device, but device='cpu'"),
    (dict(cuda_graphs="yes"), "cuda_graphs='yes' is invalid"),
])
def test_cuda_graphs_setting_is_checked_before_anything_is_written(tmp_path, kw, message):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train(sin_settings(run, **kw))
    assert not run.exists()


def test_cuda_graphs_may_change_on_resume(tmp_path):
    """Capturing changes how a step is launched, not what it computes (the GPU tests compare
    replays with uncaptured steps), so a run may resume with or without it, like --device."""
    from imaml_fast.train import RESUMABLE_CHANGES, _check_resumable

    assert "cuda_graphs" in RESUMABLE_CHANGES
    saved = sin_settings(tmp_path, cuda_graphs=True).to_dict()
    _check_resumable(saved, sin_settings(tmp_path), tmp_path / "checkpoint.pt")  # no error


def test_tf32_may_change_on_resume_and_old_checkpoints_resume_without_it(tmp_path):
    """TF32 changes the rounding of GPU convolutions, not the computation, so a run may resume
    with it on or off, like --device; a checkpoint from before the setting reads as off."""
    from imaml_fast.checkpoint import save_atomic
    from imaml_fast.train import RESUMABLE_CHANGES, _check_resumable

    assert "tf32" in RESUMABLE_CHANGES
    saved = sin_settings(tmp_path, tf32=True).to_dict()
    _check_resumable(saved, sin_settings(tmp_path), tmp_path / "checkpoint.pt")  # no error
    run = tmp_path / "run"
    train(sin_settings(run, steps=2))
    ck = load_checkpoint(run / "checkpoint.pt")
    assert ck["settings"]["tf32"] is False
    del ck["settings"]["tf32"]
    save_atomic(ck, run / "checkpoint.pt")
    train(sin_settings(run, steps=3, tf32=True), resume=True)
    ck = load_checkpoint(run / "checkpoint.pt")
    assert ck["step"] == 3 and ck["settings"]["tf32"] is True


def test_task_threads_may_change_on_resume(tmp_path):
    """Groups of tasks on worker threads change how a step is scheduled, not what it
    computes: a run trained in two groups and resumed in one ends where a run in one group
    all along ends, up to rounding."""
    from imaml_fast.train import RESUMABLE_CHANGES

    assert "task_threads" in RESUMABLE_CHANGES
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(sin_settings(whole, task_threads=1))
    train(sin_settings(split, task_threads=2), stop_after=3)
    assert load_checkpoint(split / "checkpoint.pt")["settings"]["task_threads"] == 2
    train(sin_settings(split, task_threads=1), resume=True)
    for k, v in params(whole).items():
        assert torch.allclose(params(split)[k], v, rtol=1e-5, atol=1e-7), k


def test_task_chunk_may_change_on_resume(tmp_path):
    """Chunks of tasks bound a step's memory, not what it computes: a run trained in chunks
    of 2 and resumed with every task at once ("all", as --task-chunk all gives) ends where a
    run without chunks ends, up to rounding."""
    from imaml_fast.train import RESUMABLE_CHANGES

    assert "task_chunk" in RESUMABLE_CHANGES
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(sin_settings(whole))
    train(sin_settings(split, task_chunk=2), stop_after=3)
    assert load_checkpoint(split / "checkpoint.pt")["settings"]["task_chunk"] == 2
    train(sin_settings(split, task_chunk="all"), resume=True)
    for k, v in params(whole).items():
        assert torch.allclose(params(split)[k], v, rtol=1e-5, atol=1e-7), k


def test_a_time_limit_stops_with_a_checkpoint_and_resume_finishes_identically(tmp_path):
    """max_seconds ends the run at the first step past the limit (here: the first step),
    with a checkpoint; resuming then ends bit-identical to an uninterrupted run."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(sin_settings(whole))
    first = train(sin_settings(split), max_seconds=1e-9)
    assert first["stopped"] == "time limit" and first["steps"] == 1
    assert load_checkpoint(split / "checkpoint.pt")["step"] == 1
    rest = train(sin_settings(split), resume=True)
    assert rest["stopped"] is None and rest["steps"] == 6
    for k, v in params(whole).items():
        assert torch.equal(params(split)[k], v), k
    with pytest.raises(ValueError, match="max_seconds=0 is invalid"):
        train(sin_settings(tmp_path / "bad"), max_seconds=0)
    assert not (tmp_path / "bad").exists()

import torch
import torch.nn.functional as F

from _helpers import class_episode, conv_bn
from imaml_fast import FunctionalModel, IMAMLConfig, meta_gradient
from imaml_fast import batching


def test_auto_measures_candidates_once_and_caches(monkeypatch):
    batching.clear_cache()
    monkeypatch.setattr(batching, "_TUNE_MIN_SECONDS", 0.0)  # force the measurement path
    timed = []
    real = batching._time_strategy

    def spy(fm, theta, x, y, strategy, repeats=3, weights=(1.0, 0.0)):
        timed.append(strategy)
        return real(fm, theta, x, y, strategy, repeats, weights)

    monkeypatch.setattr(batching, "_time_strategy", spy)
    fm = FunctionalModel(conv_bn(), F.cross_entropy)
    xs, ys, _, _ = class_episode(9, 3, 1, (1, 6, 6), 3)
    choice = batching.choose_strategy("auto", fm, fm.theta, xs, ys)
    assert choice in batching.candidates(9)
    assert set(timed) == set(batching.candidates(9)) == {"vmap", "loop", 4, 8}
    timed.clear()
    assert batching.choose_strategy("auto", fm, fm.theta, xs, ys) == choice
    assert timed == []  # cached
    assert batching.choose_strategy(3, fm, fm.theta, xs, ys) == 3
    assert batching.choose_strategy("auto", fm, fm.theta, xs[:1], ys[:1]) == "loop"
    batching.clear_cache()


def test_every_strategy_gives_the_same_meta_gradient():
    model = conv_bn()
    ep = class_episode(5, 4, 4, (1, 6, 6), 3)
    results = [meta_gradient(model, F.cross_entropy, *ep, IMAMLConfig(inner_steps=3, task_batching=s))
               for s in ("vmap", "loop", 2, 4)]
    for r in results[1:]:
        assert torch.allclose(r.grads_flat, results[0].grads_flat, rtol=1e-10, atol=1e-13)
    assert [r.task_batching for r in results] == ["vmap", "loop", 2, 4]


def test_auto_keeps_vmap_unless_another_strategy_is_clearly_faster(monkeypatch):
    fm = FunctionalModel(conv_bn(), F.cross_entropy)
    xs, ys, _, _ = class_episode(9, 3, 1, (1, 6, 6), 3)
    for loop_time, expected in ((0.95, "vmap"), (0.85, "loop")):
        batching.clear_cache()
        times = {"vmap": 1.0, "loop": loop_time, 4: 1.2, 8: 1.1}
        monkeypatch.setattr(batching, "_time_strategy",
                            lambda fm, theta, x, y, s, repeats=3, weights=(1.0, 0.0): times[s])
        assert batching.choose_strategy("auto", fm, fm.theta, xs, ys) == expected
    batching.clear_cache()


def test_auto_times_vmap_first_and_last_and_keeps_its_best(monkeypatch):
    """vmap is timed before the other candidates and again after them (in a fresh process the
    first timing still pays one-off costs): its best counts, in the order timed."""
    fm = FunctionalModel(conv_bn(), F.cross_entropy)
    xs, ys, _, _ = class_episode(9, 3, 1, (1, 6, 6), 3)
    monkeypatch.setattr(batching, "_TUNE_MIN_SECONDS", 0.0)
    for vmap_times, expected in (([0.1, 1.5, 1.45], 8), ([0.1, 1.5, 1.0], "vmap")):
        batching.clear_cache()
        order = []
        times = {"loop": 2.0, 4: 1.4, 8: 1.3}

        def fake(fm, theta, x, y, s, repeats=3, weights=(1.0, 0.0), vt=iter(vmap_times)):
            order.append(s)
            return next(vt) if s == "vmap" else times[s]

        monkeypatch.setattr(batching, "_time_strategy", fake)
        # warm-up, timed (1.5), retimed: 1.45 (8's 1.3 is 10% faster) or 1.0 (vmap stays)
        assert batching.choose_strategy("auto", fm, fm.theta, xs, ys) == expected
        assert order == ["vmap", "vmap", "loop", 4, 8, "vmap"]
    batching.clear_cache()


def test_tuning_weighs_gradients_and_products_as_a_meta_step_makes_them(monkeypatch):
    fm = FunctionalModel(conv_bn(), F.cross_entropy)
    xs, ys, _, _ = class_episode(4, 3, 1, (1, 6, 6), 3)
    calls = []

    def fake_best_of(fn, device, repeats):
        fn()  # the real gradient / product runs
        calls.append(fn)
        return 1.0

    monkeypatch.setattr(batching, "_best_of", fake_best_of)
    assert batching._time_strategy(fm, fm.theta, xs, ys, "vmap", weights=(18.0, 5.0)) == 23.0
    assert batching._time_strategy(fm, fm.theta, xs, ys, 2, weights=(16.0, 0.0)) == 16.0
    assert len(calls) == 3  # gradient + product, then the gradient alone
    gd = IMAMLConfig(inner_steps=16, cg_steps=5)
    assert batching.step_counts(gd) == {"inner_steps": 18, "hvps": 5}
    assert batching.step_counts(gd, inner_only=True) == {"inner_steps": 16, "hvps": 0}
    armijo = IMAMLConfig(inner_solver="gd_armijo", inner_steps=16, cg_steps=5)
    assert batching.step_counts(armijo, inner_only=True) == {"inner_steps": 17, "hvps": 0}
    assert batching.step_counts(armijo.replace(inner_steps=0), inner_only=True)["inner_steps"] == 0
    hf = IMAMLConfig(inner_solver="hf", inner_steps=4, hf_cg_steps=5, cg_steps=5)
    assert batching.step_counts(hf) == {"inner_steps": 6, "hvps": 25}

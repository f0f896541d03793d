import torch
import torch.nn.functional as F

from _helpers import class_episode, conv_bn
from imaml_fast import FunctionalModel, IMAMLConfig, meta_gradient
from imaml_fast import batching


def test_auto_measures_candidates_once_and_caches(monkeypatch):
    batching.clear_cache()
    monkeypatch.setattr(batching, "_TUNE_MIN_SECONDS", 0.0)  # force the measurement path
    timed = []
    real = batching._time_grad

    def spy(fm, theta, x, y, strategy, repeats=3):
        timed.append(strategy)
        return real(fm, theta, x, y, strategy, repeats)

    monkeypatch.setattr(batching, "_time_grad", spy)
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
        monkeypatch.setattr(batching, "_time_grad",
                            lambda fm, theta, x, y, s, repeats=3: times[s])
        assert batching.choose_strategy("auto", fm, fm.theta, xs, ys) == expected
    batching.clear_cache()

"""Groups of tasks on CPU worker threads (imaml_fast.threads, IMAMLConfig.task_threads)."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imaml_fast import IMAML, IMAMLConfig, meta_gradient, threads
from imaml_fast.threads import chunk_ranges, groups, resolve_task_threads, thread_state_active

from _helpers import DT, class_episode, conv_bn, mlp, rel_err

PER_TASK = ("task_grads_flat", "adapted_flat", "cg_residual", "inner_loss", "inner_residual",
            "query_loss", "query_outputs", "first_order_cosine")
EXACT = ("cg_iters", "cg_status", "cg_clipped", "inner_steps")


def _bn_relu_net(n_way=3):
    """Convolutions, BatchNorm, ReLU and a ZeroPad: the hand-batched layers, with the cpp
    backend's kernels in them."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 3 * 3, n_way)).to(DT)


def _assert_same(ours, one, tol=1e-12):
    """Every per-task field of a grouped result equal to one call's, within tol (float64
    rounding of differently sized batched calls), the integer ones exactly."""
    assert rel_err(ours.grads_flat, one.grads_flat) <= tol
    for name in PER_TASK:
        a, b = getattr(ours, name), getattr(one, name)
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=tol, atol=tol), name
    for name in EXACT:
        assert torch.equal(getattr(ours, name), getattr(one, name)), name
    assert ours.evals == one.evals


def test_groups_cover_the_tasks_in_order_with_sizes_one_apart():
    for T in range(1, 40):
        for n in range(1, T + 1):
            g = groups(T, n)
            assert len(g) == n and g[0][0] == 0 and g[-1][1] == T
            assert all(a1 == b0 for (_, b0), (a1, _) in zip(g, g[1:]))
            sizes = [b - a for a, b in g]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_chunk_ranges_cover_the_tasks_in_chunks_of_at_most_the_size():
    assert chunk_ranges(7, None) == [(0, 7)] and chunk_ranges(7, 7) == [(0, 7)]
    assert chunk_ranges(7, 9) == [(0, 7)] and chunk_ranges(10, 4) == [(0, 4), (4, 7), (7, 10)]
    for T in range(1, 30):
        for c in range(1, T + 1):
            r = chunk_ranges(T, c)
            assert len(r) == -(-T // c) and r[0][0] == 0 and r[-1][1] == T
            assert all(b0 == a1 for (_, b0), (a1, _) in zip(r, r[1:]))
            sizes = [b - a for a, b in r]
            assert max(sizes) <= c and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("n,T", [(2, 6), (3, 7), (4, 4)])
def test_grouped_meta_gradient_equals_one_call_and_the_exact_solve(backend, n, T):
    """T tasks in n groups on worker threads (T = 7: groups of 3, 2, 2) give each task what
    one batched call gives it, and what the sequential reference path gives it."""
    if backend == "cpp":
        from imaml_fast import backend_info

        if not {b["name"]: b["available"] for b in backend_info("cpu", DT)}["cpp"]:
            pytest.skip("imaml_fast._C is not built")
    torch.manual_seed(1)
    model = _bn_relu_net()
    xs, ys, xq, yq = class_episode(T, 4, 3, (1, 8, 8), 3)
    cfg = IMAMLConfig(inner_steps=4, inner_lr=0.1, lam=1.0, cg_steps=6, cg_tol=0.0,
                      backend=backend, task_batching="vmap")
    one = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(task_threads=1))
    ours = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(task_threads=n))
    assert one.task_threads == 1 and ours.task_threads == n
    _assert_same(ours, one)
    ref = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(backend="reference"))
    assert rel_err(ours.adapted_flat, ref.adapted_flat) <= 1e-12
    assert rel_err(ours.task_grads_flat, ref.task_grads_flat) <= 1e-9


@pytest.mark.parametrize("task_batching,layer_batching", [("loop", "auto"), (2, "vmap"),
                                                          ("vmap", "vmap")])
def test_groups_with_the_module_run_per_call(task_batching, layer_batching):
    """Per-task loops and vmap run the module through functional_call, which swaps parameters
    into it: each worker after the first has its own copy, and the groups still agree with
    one call (the module's own parameters untouched)."""
    torch.manual_seed(2)
    model = conv_bn()
    before = [p.detach().clone() for p in model.parameters()]
    xs, ys, xq, yq = class_episode(6, 5, 3, (1, 6, 6), 3)
    cfg = IMAMLConfig(inner_steps=3, inner_lr=0.1, lam=1.0, cg_steps=6, cg_tol=0.0,
                      backend="torch", task_batching=task_batching,
                      layer_batching=layer_batching)
    one = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(task_threads=1))
    ours = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg.replace(task_threads=3))
    _assert_same(ours, one)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_worker_copies_follow_the_modules_train_and_eval_flags():
    """Dropout differs between train and eval: a copy made while training must run in eval
    mode once the module is put there, as the module itself does."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).to(DT)
    xs, ys, xq, yq = class_episode(4, 5, 3, (3,), 2)
    cfg = IMAMLConfig(inner_steps=2, cg_steps=3, backend="torch", task_batching="loop")
    learner = IMAML(model, F.cross_entropy, cfg.replace(task_threads=2))
    learner.meta_gradient(xs, ys, xq, yq)  # the copies are made in train mode
    model.eval()
    ours = learner.meta_gradient(xs, ys, xq, yq)
    one = IMAML(model, F.cross_entropy, cfg.replace(task_threads=1)).meta_gradient(xs, ys, xq, yq)
    _assert_same(ours, one)


def test_adapt_in_groups_equals_one_call():
    torch.manual_seed(4)
    model = _bn_relu_net()
    xs, ys, _, _ = class_episode(5, 4, 3, (1, 8, 8), 3)
    cfg = IMAMLConfig(inner_steps=5, inner_lr=0.1, backend="torch", task_batching="vmap")
    one = IMAML(model, F.cross_entropy, cfg.replace(task_threads=1)).adapt(xs, ys)
    ours = IMAML(model, F.cross_entropy, cfg.replace(task_threads=2)).adapt(xs, ys)
    for name in one:
        assert torch.allclose(ours[name], one[name], rtol=1e-12, atol=1e-12), name


def test_workers_share_out_the_callers_threads_and_the_callers_count_is_kept(monkeypatch):
    """Each of n workers runs its group with the caller's threads divided by n, at least one
    (one each for two groups on two cores); the caller's thread count is what it was."""
    seen = []
    solve = threads.map_groups

    def spy(fn, fm, T, n, requested="auto"):
        def wrapped(f, a, b):
            seen.append((threading.current_thread() is threading.main_thread(),
                         torch.get_num_threads()))
            return fn(f, a, b)
        return solve(wrapped, fm, T, n, requested)

    monkeypatch.setattr(threads, "map_groups", spy)  # as threads.map_chunks calls it
    caller = torch.get_num_threads()
    model = mlp()
    xs, ys, xq, yq = class_episode(4, 5, 3, (3,), 2)
    meta_gradient(model, F.cross_entropy, xs, ys, xq, yq,
                  IMAMLConfig(inner_steps=2, cg_steps=2, backend="torch", task_threads=2))
    assert seen == [(False, max(1, caller // 2))] * 2
    assert torch.get_num_threads() == caller


def test_the_cpp_twins_thread_count_is_per_calling_thread():
    from imaml_fast import _ext

    module, why = _ext.load()
    if module is None:
        pytest.skip(f"imaml_fast._C is not built: {why}")
    before = module.cpu_threads()
    try:
        module.set_cpu_threads(3)
        seen = []
        t = threading.Thread(target=lambda: (seen.append(module.cpu_threads()),
                                             module.set_cpu_threads(2),
                                             seen.append(module.cpu_threads())))
        t.start()
        t.join()
        assert seen == [1, 2] and module.cpu_threads() == 3
    finally:
        module.set_cpu_threads(before)


def test_an_error_in_one_group_is_raised_and_the_workers_stay_usable(monkeypatch):
    import imaml_fast.implicit as implicit

    solve = implicit._solve_tasks

    def failing(fm, theta, xs, *args):
        if threading.current_thread() is not threading.main_thread() and xs.shape[0] == 2:
            raise RuntimeError("group failed")
        return solve(fm, theta, xs, *args)

    model = mlp()
    xs, ys, xq, yq = class_episode(5, 5, 3, (3,), 2)  # groups of 3 and 2
    cfg = IMAMLConfig(inner_steps=2, cg_steps=2, backend="torch", task_threads=2)
    monkeypatch.setattr(implicit, "_solve_tasks", failing)
    with pytest.raises(RuntimeError, match="group failed"):
        meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
    monkeypatch.setattr(implicit, "_solve_tasks", solve)
    ours = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
    _assert_same(ours, meta_gradient(model, F.cross_entropy, xs, ys, xq, yq,
                                     cfg.replace(task_threads=1)))


def test_groups_run_under_the_callers_no_grad():
    model = mlp()
    xs, ys, xq, yq = class_episode(4, 5, 3, (3,), 2)
    cfg = IMAMLConfig(inner_steps=2, cg_steps=3, backend="torch", task_threads=2)
    with torch.no_grad():
        ours = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
    _assert_same(ours, meta_gradient(model, F.cross_entropy, xs, ys, xq, yq,
                                     cfg.replace(task_threads=1)))


def test_resolve_task_threads():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_task_threads(4, cpu, 3, True) == 3      # at most one group per task
    assert resolve_task_threads(4, cpu, 1, True) == 1
    assert resolve_task_threads(4, cpu, 8, False) == 1     # the sequential reference backend
    assert resolve_task_threads("auto", cuda, 8, True) == 1
    assert resolve_task_threads(1, cuda, 8, True) == 1
    with pytest.raises(ValueError, match="task_threads=2 runs groups of tasks on CPU threads, "
                                         "but the model is on cuda: use 'auto' or 1"):
        resolve_task_threads(2, cuda, 8, True)


def test_auto_stays_on_the_calling_thread_under_per_thread_state(monkeypatch):
    """Modes, saved-tensor hooks and autocast are per thread: work on workers would escape
    them, so "auto" keeps one group while any is active (an int still asks for groups)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert resolve_task_threads("auto", cpu, 8, True) == 1  # one thread: one call
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert resolve_task_threads("auto", cpu, 8, True) == threads.AUTO_MAX_GROUPS == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert thread_state_active() is None and resolve_task_threads("auto", cpu, 8, True) == 2
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert thread_state_active() == "saved-tensor hooks"
        assert resolve_task_threads("auto", cpu, 8, True) == 1
        assert resolve_task_threads(2, cpu, 8, True) == 2
    with Count():
        assert thread_state_active() == "a TorchDispatchMode"
        assert resolve_task_threads("auto", cpu, 8, True) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert thread_state_active() == "autocast"
    with torch.inference_mode():
        assert thread_state_active() == "inference mode"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert thread_state_active() == "the profiler"
        assert resolve_task_threads("auto", cpu, 8, True) == 1
    assert thread_state_active() is None


def test_a_profiled_meta_gradient_records_every_operation():
    """Under torch.profiler "auto" keeps one group: the profile has the step's convolutions
    (every inner step's, the query's and the products'), not just the input check's."""
    model = _bn_relu_net()
    xs, ys, xq, yq = class_episode(4, 4, 3, (1, 8, 8), 3)
    learner = IMAML(model, F.cross_entropy, IMAMLConfig(inner_steps=3, cg_steps=2, cg_tol=0.0,
                                                         backend="torch", task_batching="vmap"))
    counts = []
    for groups_n in (1, "auto"):
        cfg = learner.config.replace(task_threads=groups_n)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            r = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
        assert r.task_threads == 1
        counts.append(sum(e.count for e in prof.key_averages() if e.key == "aten::convolution"))
    assert counts[0] == counts[1] and counts[0] >= 2 * (3 + 1)


def test_auto_times_one_gradient_once_per_shape_and_keeps_small_work_in_one_call(monkeypatch):
    """"auto" runs groups where one batched gradient over all tasks takes at least
    threads._MIN_SECONDS, timed once per model, shape and thread count; an explicit count is
    taken as it is, untimed."""
    from imaml_fast.backends import resolve_backend
    from imaml_fast.functional import FunctionalModel

    monkeypatch.setattr(threads, "_CHOICES", {})
    timed = []
    real = threads._gradient_seconds
    monkeypatch.setattr(threads, "_gradient_seconds",
                        lambda *a: timed.append(a[2].shape) or real(*a))
    # two groups for "auto" on any machine (torch.get_num_threads() there)
    resolve = threads.resolve_task_threads
    monkeypatch.setattr(threads, "resolve_task_threads",
                        lambda req, *a: resolve(2 if req == "auto" else req, *a))
    fm = FunctionalModel(mlp(), F.cross_entropy)
    xs, ys, _, _ = class_episode(4, 5, 3, (3,), 2)
    with fm.engine_mode(IMAMLConfig(), resolve_backend("torch", fm.device, fm.dtype)):
        monkeypatch.setattr(threads, "_MIN_SECONDS", float("inf"))
        assert threads.choose_task_threads("auto", fm, fm.theta, xs, ys, True) == 1
        assert threads.choose_task_threads("auto", fm, fm.theta, xs, ys, True) == 1
        assert timed == [xs.shape]
        assert threads.choose_task_threads(2, fm, fm.theta, xs[:3], ys[:3], True) == 2
        monkeypatch.setattr(threads, "_MIN_SECONDS", 0.0)
        assert threads.choose_task_threads("auto", fm, fm.theta, xs[:3], ys[:3], True) == 2
        assert timed == [xs.shape, xs[:3].shape]
    assert 0 < real(fm, fm.theta, xs, ys, "vmap") < 10


def test_config_refuses_bad_task_threads():
    for bad in (0, -1, True, "2", 1.5, None):
        with pytest.raises(ValueError, match="IMAMLConfig.task_threads="):
            IMAMLConfig(task_threads=bad)
    assert IMAMLConfig(task_threads=3).task_threads == 3
    with pytest.raises(ValueError, match=r"IMAMLConfig.task_threads=2 is invalid: hvp='fwdrev' "
                                         r"runs forward-mode AD"):
        IMAMLConfig(task_threads=2, hvp="fwdrev")
    assert IMAMLConfig(task_threads=1, hvp="fwdrev").task_threads == 1


@pytest.mark.parametrize("solver", ["gd", "hf"])
def test_forward_mode_products_stay_in_one_group(monkeypatch, solver):
    """hvp="fwdrev" runs torch.func.jvp, whose forward-AD level torch keeps for the whole
    process: two threads' products would leave each other's level ("no level exists").
    "auto" runs such a step in one group even where it would otherwise choose two, and it
    equals the step pinned to one group."""
    resolve = threads.resolve_task_threads
    monkeypatch.setattr(threads, "resolve_task_threads",
                        lambda req, *a: resolve(2 if req == "auto" else req, *a))
    monkeypatch.setattr(threads, "_MIN_SECONDS", 0.0)  # two groups wherever allowed
    model = conv_bn()
    xs, ys, xq, yq = class_episode(4, 5, 3, (1, 6, 6), 3)
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2, cg_steps=3, cg_tol=0.0,
                      backend="torch", task_batching="loop", hvp="fwdrev")
    ours = meta_gradient(model, F.cross_entropy, xs, ys, xq, yq, cfg)
    assert ours.task_threads == 1
    _assert_same(ours, meta_gradient(model, F.cross_entropy, xs, ys, xq, yq,
                                     cfg.replace(task_threads=1)))
    # the same step with products through a kept graph does run in two groups
    assert meta_gradient(model, F.cross_entropy, xs, ys, xq, yq,
                         cfg.replace(hvp="revrev")).task_threads == 2

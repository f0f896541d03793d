"""imaml_fast.compat.imaml_dev: the iMAML authors' implicit_maml API on imaml_fast.

The central test writes the authors' training loop against the published API and checks it
against imaml_fast.meta_gradient with the authors' operator and against the batched call.
"""
import copy
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import task_loss_fn
from imaml_fast import IMAMLConfig, compat, meta_gradient
from imaml_fast.compat.imaml_dev import dataset, learner_model, utils
from imaml_fast.compat.imaml_dev.learner_model import Learner, make_conv_network, make_fc_network
from imaml_fast.models import omniglot_conv

DT = torch.float64


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def tanh_net():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


loss_of_flat = task_loss_fn  # w -> loss, independent of the package's flat-layout code


def hessian_at(model, loss_fn, x, y, w):
    return torch.autograd.functional.hessian(loss_of_flat(model, loss_fn, x, y), w)


def small_task(n=6):
    return dict(x_train=torch.randn(n, 3, dtype=DT), y_train=torch.randint(0, 3, (n,)),
                x_val=torch.randn(n, 3, dtype=DT), y_val=torch.randint(0, 3, (n,)), task_def=None)


@pytest.fixture
def clean_aliases():
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "implicit_maml"}
    yield
    for k in [k for k in sys.modules if k.split(".")[0] == "implicit_maml"]:
        del sys.modules[k]
    sys.modules.update(saved)


# ---- the authors' training loop against the published API ---------------------------------------
def published_meta_gradient(meta_learner, fast_learner, tasks, lam, cg_steps, num_steps,
                            regu_coef, lam_damping):
    w0 = meta_learner.get_params()
    avg = 0.0
    for task in tasks:
        fast_learner.set_params(w0.clone())
        fast_learner.learn_task(task, num_steps=num_steps, add_regularization=True, w_0=w0, lam=lam)
        vloss = fast_learner.get_loss(task["x_val"], task["y_val"])
        vgrad = torch.cat([g.reshape(-1) for g in
                           torch.autograd.grad(vloss, fast_learner.model.parameters())])
        Ax = fast_learner.matrix_evaluator(task, lam, regu_coef, lam_damping)
        avg = avg + utils.cg_solve(Ax, vgrad, cg_steps) / len(tasks)
    return avg


def stack(tasks):
    return [torch.stack([t[k] for t in tasks]) for k in ("x_train", "y_train", "x_val", "y_val")]


def run_meta_training(model, loss_fn, task_batches, inner_lr, lam, cg_steps, num_steps,
                      regu_coef, lam_damping):
    loop_learner = Learner(model, loss_fn, inner_lr=inner_lr, outer_lr=1e-2)
    fast = Learner(copy.deepcopy(model), loss_fn, inner_lr=inner_lr)
    batched_learner = Learner(copy.deepcopy(model), loss_fn, inner_lr=inner_lr, outer_lr=1e-2)
    start = loop_learner.get_params()
    operator = (1.0 + regu_coef, 1.0 / (lam + lam_damping))
    config = IMAMLConfig(inner_solver="gd", inner_steps=num_steps, inner_lr=inner_lr, lam=lam,
                         cg_steps=cg_steps, cg_tol=0.0)
    for step, tasks in enumerate(task_batches):
        g_loop = published_meta_gradient(loop_learner, fast, tasks, lam, cg_steps, num_steps,
                                         regu_coef, lam_damping)
        native = meta_gradient(loop_learner.model, loss_fn, *stack(tasks), config, operator=operator)
        assert rel(native.grads_flat, g_loop) < 1e-8
        g_batch = batched_learner.meta_gradient_batch(tasks, lam, cg_steps, num_steps,
                                                      regu_coef, lam_damping)
        assert rel(g_batch, g_loop) < 1e-8
        if step == 0:  # the test can fail: the paper's operator gives another meta-gradient
            paper = meta_gradient(loop_learner.model, loss_fn, *stack(tasks), config)
            assert rel(paper.grads_flat, g_loop) > 1e-3
        loop_learner.outer_step_with_grad(g_loop, flat_grad=True)
        batched_learner.outer_step_with_grad(g_batch, flat_grad=True)
    assert rel(batched_learner.get_params(), loop_learner.get_params()) < 1e-8
    assert rel(loop_learner.get_params(), start) > 1e-4  # the meta-steps moved the parameters


def test_training_loop_matches_engine_sinusoid():
    ds = dataset.SinusoidDataset(num_tasks=12, train_inst=10, val_inst=10, seed=0, dtype=DT)
    model = make_fc_network(1, 1, (40, 40)).to(DT)
    batches = [[ds[i] for i in range(s, s + 4)] for s in (0, 4, 8)]
    run_meta_training(model, nn.MSELoss(), batches, inner_lr=0.02, lam=2.0, cg_steps=5,
                      num_steps=5, regu_coef=1.0, lam_damping=10.0)


def test_training_loop_matches_engine_conv():
    images = [torch.rand(4, 28, 28, dtype=DT) for _ in range(10)]
    ds = dataset.OmniglotFewShotDataset.from_arrays(images, num_tasks=6, num_cls=3, num_inst=1,
                                                    seed=0, dtype=DT)
    model = make_conv_network(1, 3, filter_size=8).to(DT)
    batches = [[ds[i] for i in range(s, s + 3)] for s in (0, 3)]
    run_meta_training(model, nn.CrossEntropyLoss(), batches, inner_lr=0.1, lam=1.0, cg_steps=4,
                      num_steps=3, regu_coef=0.5, lam_damping=2.0)


def test_meta_gradient_batch_checks():
    learner = Learner(tanh_net(), nn.CrossEntropyLoss())
    tasks = [small_task(), small_task()]
    with pytest.raises(ValueError, match="add_regularization"):
        learner.meta_gradient_batch(tasks, 1.0, 2, 2, add_regularization=False)
    with pytest.raises(ValueError, match="x_train shapes"):
        learner.meta_gradient_batch([small_task(6), small_task(5)], 1.0, 2, 2)
    with pytest.raises(ValueError, match="lam"):
        learner.meta_gradient_batch(tasks, 0.0, 2, 2)
    r = learner.meta_gradient_batch(tasks, torch.tensor(1.0), 2, 2, return_result=True)
    assert r.task_grads_flat.shape == (2, learner.get_params().numel())


# ---- conjugate gradient -----------------------------------------------------------------------
class Counted:
    def __init__(self, A):
        self.A, self.calls = A, 0

    def __call__(self, v):
        self.calls += 1
        return self.A @ v


def spd(n):
    M = torch.randn(n, n, dtype=DT)
    return M @ M.T + n * torch.eye(n, dtype=DT)


def authors_cg(f_Ax, b, cg_iters, residual_tol=1e-10):
    """The published algorithm: x = 0 and r = b - f_Ax(x), one product spent on x = 0."""
    x = torch.zeros_like(b)
    r = b - f_Ax(x)
    p = r.clone()
    for _ in range(cg_iters):
        rdotr = r.dot(r)
        Ap = f_Ax(p)
        alpha = rdotr / p.dot(Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        newrdotr = r.dot(r)
        p = r + (newrdotr / rdotr) * p
        if newrdotr < residual_tol:
            break
    return x


def test_cg_solve_exact_and_counts():
    A, b = spd(12), torch.randn(12, dtype=DT)
    exact = torch.linalg.solve(A, b)
    f = Counted(A)
    x = utils.cg_solve(f, b, cg_iters=12, residual_tol=1e-28)
    assert rel(x, exact) < 1e-10
    f = Counted(A)
    utils.cg_solve(f, b, cg_iters=5, residual_tol=0.0)
    assert f.calls == 5  # no product for x_init=None
    f = Counted(A)
    x = utils.cg_solve(f, b, cg_iters=12, residual_tol=1e-28, x_init=exact + 0.1)
    assert f.calls == 13 and rel(x, exact) < 1e-10
    # Same x as the published algorithm, which spends one more product.
    for iters in (1, 3, 5):
        g = Counted(A)
        ref = authors_cg(g, b, iters)
        assert g.calls == iters + 1
        assert torch.equal(utils.cg_solve(A.__matmul__, b, iters), ref)
    seen = []
    utils.cg_solve(A.__matmul__, b, cg_iters=4, residual_tol=0.0, callback=seen.append)
    assert len(seen) == 5
    xn = utils.cg_solve(lambda v: A.numpy() @ v, b.numpy(), cg_iters=12, residual_tol=1e-28)
    assert isinstance(xn, np.ndarray) and np.abs(xn - exact.numpy()).max() < 1e-10
    f = Counted(A)
    assert torch.equal(utils.cg_solve(f, torch.zeros(12, dtype=DT), 5), torch.zeros(12, dtype=DT))
    assert f.calls == 0


# ---- Hessians -----------------------------------------------------------------------------------
def test_matrix_evaluator_against_materialised_hessian():
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    learner, task = Learner(model, loss_fn), small_task()
    w = learner.get_params()
    H = hessian_at(model, loss_fn, task["x_train"], task["y_train"], w)
    lam, c, d = 1.5, 0.7, 3.0
    A = (1 + c) * torch.eye(len(w), dtype=DT) + H / (lam + d)
    Ax = learner.matrix_evaluator(task, lam, regu_coef=c, lam_damping=d)
    for _ in range(3):
        v = torch.randn(len(w), dtype=DT)
        assert rel(Ax(v), A @ v) < 1e-12
    assert Ax.builds == 1 and Ax.calls == 3  # one gradient graph for every product
    b = torch.randn(len(w), dtype=DT)
    x = utils.cg_solve(Ax, b, cg_iters=len(w), residual_tol=1e-28)
    assert rel(x, torch.linalg.solve(A, b)) < 1e-9
    # A vector lam divides elementwise; other data through x, y.
    lam_vec = torch.rand(len(w), dtype=DT) + 0.5
    xo, yo = torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,))
    Ho = hessian_at(model, loss_fn, xo, yo, w)
    Axv = learner.matrix_evaluator(task, lam_vec, c, d, x=xo, y=yo)
    v = torch.randn(len(w), dtype=DT)
    assert rel(Axv(v), (1 + c) * v + (Ho @ v) / (lam_vec + d)) < 1e-12
    # Parameters changed in place: the next product is at the new parameters.
    w2 = w + 0.3 * torch.randn_like(w)
    learner.set_params(w2)
    H2 = hessian_at(model, loss_fn, task["x_train"], task["y_train"], w2)
    assert rel(Ax(v), (1 + c) * v + H2 @ v / (lam + d)) < 1e-12 and Ax.builds == 2


def test_hessian_vector_product():
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    learner, task = Learner(model, loss_fn), small_task()
    w = learner.get_params()
    v = torch.randn(len(w), dtype=DT)
    H = hessian_at(model, loss_fn, task["x_train"], task["y_train"], w)
    assert rel(learner.hessian_vector_product(task, v), H @ v) < 1e-12
    w2 = w + torch.randn_like(w)
    H2 = hessian_at(model, loss_fn, task["x_train"], task["y_train"], w2)
    assert rel(learner.hessian_vector_product(task, v, params=w2), H2 @ v) < 1e-12
    assert torch.equal(learner.get_params(), w)  # params= does not overwrite the model
    with pytest.raises(ValueError, match="entries"):
        learner.hessian_vector_product(task, v[:-1])


# ---- Learner ------------------------------------------------------------------------------------
def test_params_regularization_and_steps():
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    learner, task = Learner(model, loss_fn, inner_lr=0.1, outer_lr=0.05, outer_alg="sgd"), small_task()
    w = learner.get_params()
    w2 = torch.randn_like(w)
    learner.set_params(w2)
    assert torch.equal(learner.get_params(), w2) and learner.get_params() is not w2
    with pytest.raises(ValueError, match="param_vals"):
        learner.set_params(w2[:-1])
    learner.set_params(w)
    w0, lam = torch.randn_like(w), 0.8
    reg = learner.regularization_loss(w0, lam)
    assert isinstance(reg, torch.Tensor)
    assert abs(reg.item() - 0.5 * lam * ((w - w0) ** 2).sum().item()) < 1e-12
    lam_vec = torch.rand_like(w)
    assert abs(learner.regularization_loss(w0, lam_vec).item()
               - 0.5 * (lam_vec * (w - w0) ** 2).sum().item()) < 1e-12
    # learn_on_data: w <- w - lr (grad L + lam (w - w0)), losses before each step.
    f = loss_of_flat(model, loss_fn, task["x_train"], task["y_train"])
    expect, losses = w.clone(), []
    for _ in range(3):
        wr = expect.clone().requires_grad_(True)
        loss = f(wr)
        losses.append(loss.item())
        expect = expect - 0.1 * (torch.autograd.grad(loss, wr)[0] + lam * (expect - w0))
    got = learner.learn_task(task, num_steps=3, add_regularization=True, w_0=w0, lam=lam)
    assert rel(learner.get_params(), expect) < 1e-13
    assert np.allclose(got, losses, rtol=1e-13) and all(isinstance(v, float) for v in got)
    # Numpy input works like tensors.
    learner.set_params(w)
    got_np = learner.learn_on_data(task["x_train"].numpy(), task["y_train"].numpy(), 3, True, w0, lam)
    assert np.allclose(got_np, losses, rtol=1e-13)
    # move_toward_target: one outer (SGD) step on lam/2 ||w - target||^2.
    learner.set_params(w)
    learner.move_toward_target(w0, lam=2.0)
    assert rel(learner.get_params(), w - 0.05 * 2.0 * (w - w0)) < 1e-14
    # outer_step_with_grad: flat vector or list of tensors.
    g = torch.randn_like(w)
    learner.set_params(w)
    learner.outer_step_with_grad(g, flat_grad=True)
    assert rel(learner.get_params(), w - 0.05 * g) < 1e-14
    learner.set_params(w)
    pieces = [c.view_as(p) for c, p in zip(torch.split(g, [p.numel() for p in model.parameters()]),
                                           model.parameters())]
    learner.outer_step_with_grad(pieces)
    assert rel(learner.get_params(), w - 0.05 * g) < 1e-14
    with pytest.raises(ValueError, match="flat_grad"):
        learner.outer_step_with_grad(pieces[:-1])


def test_learner_construction_predict_accuracy_and_pickle():
    with pytest.raises(NotImplementedError, match="sqp"):
        Learner(tanh_net(), nn.CrossEntropyLoss(), inner_alg="sqp")
    with pytest.raises(ValueError, match="outer_alg"):
        Learner(tanh_net(), nn.CrossEntropyLoss(), outer_alg="rmsprop")
    learner = Learner(tanh_net(), nn.CrossEntropyLoss(), outer_lr=0.3)
    assert learner.outer_opt.defaults["eps"] == 1e-3  # the authors' Adam
    learner.set_inner_lr(0.25)
    learner.set_outer_lr(0.5)
    assert learner.inner_opt.param_groups[0]["lr"] == 0.25
    assert learner.outer_opt.param_groups[0]["lr"] == 0.5
    task = small_task()
    out = learner.predict(task["x_val"], return_numpy=True)
    want = 100.0 * np.mean(out.argmax(1) == task["y_val"].numpy())
    assert utils.measure_accuracy(task, learner) == pytest.approx(want)
    assert utils.measure_accuracy(task, learner.model) == pytest.approx(want)
    assert isinstance(learner.get_loss(task["x_val"], task["y_val"], return_numpy=True), float)
    clone = pickle.loads(pickle.dumps(learner))
    assert torch.equal(clone.get_params(), learner.get_params())
    clone.learn_task(task, num_steps=2)
    assert not torch.equal(clone.get_params(), learner.get_params())


def test_networks():
    net = make_conv_network(1, 5)
    assert sum(p.numel() for p in net.parameters()) == 113221  # the authors' 64 filters
    assert [n for n, _ in net.named_children()][:3] == ["conv1", "BN1", "relu1"]
    ref = omniglot_conv(5)
    assert [p.shape for p in net.parameters()] == [p.shape for p in ref.parameters()]
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    assert all(0 <= m.bias.min() and m.bias.max() <= 0.05 for m in net if isinstance(m, nn.Conv2d))
    mini = make_conv_network(3, 5, task="MiniImageNet", filter_size=4)
    assert mini(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    fc = make_fc_network(2, 3, (7, 5))
    assert [n for n, _ in fc.named_children()] == ["fc_0", "nl_0", "fc_1", "nl_1", "fc_2"]
    assert make_fc_network(float16=True)[0].weight.dtype == torch.float16


# ---- utils ----------------------------------------------------------------------------------------
class Bad:
    """Pickles, but cannot be written to CSV."""

    def __str__(self):
        raise RuntimeError("cannot format")


def test_datalog_round_trip_and_atomic_save(tmp_path):
    log = utils.DataLog()
    for i in range(4):
        log.log_kv("loss", 1.0 / (i + 1))
        log.log_kv("step", i)
    log.log_kv("name", "run a")
    log.log_kv("shape", [2, 3])
    log.save_log(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["log.csv", "log.pickle"]
    with open(tmp_path / "log.pickle", "rb") as f:
        assert pickle.load(f) == log.log
    back = utils.DataLog()
    back.read_log(str(tmp_path / "log.csv"))
    assert back.log == log.log and back.max_len == 4
    assert back.get_current_log() == {"loss": 0.25, "step": 3, "name": "run a", "shape": [2, 3]}
    back.shrink_to(2)
    assert back.log["step"] == [0, 1] and back.max_len == 2

    before = (tmp_path / "log.csv").read_bytes()
    log.log_kv("bad", Bad())
    with pytest.raises(RuntimeError):
        log.save_log(str(tmp_path))
    assert (tmp_path / "log.csv").read_bytes() == before  # the old CSV is intact
    assert sorted(os.listdir(tmp_path)) == ["log.csv", "log.pickle"]  # no temporary left
    utils.save_data({"a": 1}, [1.0, 2.0], None, str(tmp_path / "run"), plot=False)
    with open(tmp_path / "run.pickle", "rb") as f:
        assert pickle.load(f) == {"agent": {"a": 1}, "losses": [1.0, 2.0], "other_data": None}


def test_small_utils():
    a = np.arange(12.0).reshape(6, 2)
    s = utils.smooth_vector(a, window_size=2)
    assert np.allclose(s[:2], a[:2]) and np.allclose(s[4], a[2:4].mean(0))
    assert np.isfinite(utils.smooth_vector(a, window_size=10)).all()
    t = utils.to_tensor(np.ones(3))
    assert t.dtype == torch.float32  # the authors' convention
    assert utils.to_device(np.ones(3), False).dtype == torch.float32
    assert isinstance(utils.to_numpy(torch.ones(2, requires_grad=True)), np.ndarray)
    with pytest.raises(TypeError):
        utils.to_tensor("text")


# ---- datasets and pickles -------------------------------------------------------------------------
def test_sinusoid_dataset_seeded():
    ds = dataset.SinusoidDataset(num_tasks=5, train_inst=7, val_inst=3, seed=4)
    np.random.seed(4)
    same = dataset.SinusoidDataset(num_tasks=5, train_inst=7, val_inst=3)
    for t, u in zip(ds, same):
        assert torch.equal(t["x_train"], u["x_train"]) and t["amp"] == u["amp"]
        assert t["x_train"].shape == (7, 1) and t["x_val"].shape == (3, 1)
        assert 0.1 <= t["amp"] <= 5 and 0 <= t["phase"] <= np.pi
        assert t["x_all"].abs().max() <= 5
        assert torch.allclose(t["y_train"], t["amp"] * torch.sin(t["x_train"] + t["phase"]), atol=1e-5)
    task = pickle.loads(pickle.dumps(ds[0]))
    assert torch.equal(task["y_val"], ds[0]["y_val"])
    t64 = dataset.SinusoidDataset(1, 7, 3, seed=4, dtype=DT)[0]  # no float32 round trip
    assert t64["x_train"].dtype == DT and torch.equal(t64["x_train"].float(), ds[0]["x_train"])
    assert (t64["y_val"] - t64["amp"] * torch.sin(t64["x_val"] + t64["phase"])).abs().max() < 1e-14


def _png(path, arr):
    from PIL import Image
    Image.fromarray(arr).save(path)


def test_omniglot_task_and_dataset_from_files(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.RandomState(0)
    for folder, langs in (("images_background", 2), ("images_evaluation", 1)):
        for l in range(langs):
            for c in range(2):
                d = tmp_path / folder / f"lang{l}" / f"char{c}"
                d.mkdir(parents=True)
                for i in range(3):
                    _png(d / f"{l}{c}_{i}.png", (rng.rand(105, 105) > 0.5).astype(np.uint8) * 255)
    import random
    td = dataset.OmniglotTask(list(range(6)), root=str(tmp_path), num_cls=2, num_inst=1,
                              num_train_classes=4, rng=random.Random(0))
    assert len(td.train_ids) == 2 and td.train_labels == [0, 1] and td.val_labels == [0, 1]
    for tr, va in zip(td.train_ids, td.val_ids):
        assert td.get_class(tr) == td.get_class(va) and tr != va
        assert "images_background" in tr  # characters 0..3 of this permutation: background
    back = pickle.loads(pickle.dumps([td]))[0]
    assert vars(back) == vars(td)
    ds = dataset.OmniglotFewShotDataset([td], rotate=False)
    task = ds[0]
    assert task["x_train"].shape == (2, 1, 28, 28) and task["y_train"].dtype == torch.long
    from PIL import Image
    lanczos = getattr(Image, "Resampling", Image).LANCZOS
    want = np.asarray(Image.open(td.val_ids[1]).convert("L").resize((28, 28), resample=lanczos),
                      dtype=np.float32) / 255.0
    assert np.array_equal(task["x_val"][1, 0].numpy(), want)


def test_omniglot_from_arrays_rotations():
    images = {f"c{k}": torch.rand(3, 28, 28) for k in range(5)}
    ds = dataset.OmniglotFewShotDataset.from_arrays(images, num_tasks=4, num_cls=3, num_inst=1,
                                                    seed=1)
    ks = set()
    for t in ds:
        td = t["task_def"]
        assert sorted(set(t["y_train"].tolist())) == [0, 1, 2]
        for split, ids in (("x_train", td.train_ids), ("x_val", td.val_ids)):
            for j, (key, i) in enumerate(ids):
                img = images[key][i].numpy()
                k = [q for q in range(4) if np.array_equal(np.rot90(img, q),
                                                           t[split][j, 0].numpy())]
                assert len(k) == 1
                ks.add(k[0])
        # one rotation per class, shared by its train and val images
        for j in range(3):
            tr = t["x_train"][j, 0].numpy()
            va_img = images[td.val_ids[j][0]][td.val_ids[j][1]].numpy()
            tr_img = images[td.train_ids[j][0]][td.train_ids[j][1]].numpy()
            ktr = next(q for q in range(4) if np.array_equal(np.rot90(tr_img, q), tr))
            assert np.array_equal(np.rot90(va_img, ktr), t["x_val"][j, 0].numpy())
    assert len(ks) > 1


# ---- module aliases ---------------------------------------------------------------------------------
def test_install_aliases(clean_aliases):
    # A pickle the authors' generate_task_defs.py would have written: it names
    # implicit_maml.dataset.OmniglotTask.
    fake_pkg, fake_ds = types.ModuleType("implicit_maml"), types.ModuleType("implicit_maml.dataset")
    OmniglotTask = type("OmniglotTask", (), {"__module__": "implicit_maml.dataset"})
    fake_ds.OmniglotTask, fake_pkg.dataset = OmniglotTask, fake_ds
    sys.modules.update({"implicit_maml": fake_pkg, "implicit_maml.dataset": fake_ds})
    old = OmniglotTask()
    attrs = dict(root1="/d/images_background", root2="/d/images_evaluation", num_cls=2,
                 num_inst=1, train_ids=["/d/images_background/a/c1/x.png",
                                        "/d/images_background/a/c2/y.png"],
                 val_ids=["/d/images_background/a/c1/z.png", "/d/images_background/a/c2/w.png"],
                 train_labels=[0, 1], val_labels=[0, 1])
    vars(old).update(attrs)
    blob = pickle.dumps([old])
    with pytest.raises(RuntimeError, match="force=True"):
        compat.install_aliases()  # a different implicit_maml is imported
    del sys.modules["implicit_maml"], sys.modules["implicit_maml.dataset"]

    assert "implicit_maml" not in sys.modules
    names = compat.install_aliases()
    assert compat.install_aliases() == names  # idempotent
    import implicit_maml.learner_model
    from implicit_maml.utils import DataLog
    import implicit_maml.dataset as ds_alias
    assert implicit_maml.learner_model.Learner is Learner and DataLog is utils.DataLog
    assert ds_alias is dataset
    loaded = pickle.loads(blob)[0]
    assert type(loaded) is dataset.OmniglotTask and vars(loaded) == attrs
    assert loaded.get_class(loaded.train_ids[1]) == "/d/images_background/a/c2"
    assert sorted(compat.remove_aliases()) == sorted(names)
    assert not any(k.split(".")[0] == "implicit_maml" for k in sys.modules)
    assert compat.remove_aliases() == []

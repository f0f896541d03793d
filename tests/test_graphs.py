"""CUDA-graph capture of the meta-gradient (imaml_fast.graphs).

On the CPU: the whole pipeline a graph captures runs on the meta device, where any read of a
device value by the host (.item(), bool(), .tolist()) raises, so capture cannot meet a host
synchronisation; and asking for graphs without a GPU fails clearly. On a GPU: replays equal
the uncaptured computation, for new data too, one capture per input signature.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from _helpers import class_episode, conv_bn
from imaml_fast import IMAML, IMAMLConfig
from imaml_fast.functional import FunctionalModel
from imaml_fast.implicit import meta_gradient_flat
from imaml_fast.models import omniglot_conv

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("solver", ["gd", "hf"])
@pytest.mark.parametrize("hvp", ["revrev", "fwdrev"])
def test_captured_pipeline_makes_no_host_sync(solver, hvp):
    fm = FunctionalModel(omniglot_conv(5).to("meta"), F.cross_entropy)
    xs = torch.empty(3, 5, 1, 28, 28, device="meta")
    ys = torch.empty(3, 5, dtype=torch.long, device="meta")
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2, cg_steps=3, hf_cg_steps=2,
                      backend="torch", task_batching="vmap", hvp=hvp)
    r = meta_gradient_flat(fm, xs, ys, xs, ys, cfg, validate_values=False)
    assert r.grads_flat.shape == (fm.num_params,) and r.task_grads_flat.shape == (3, fm.num_params)
    assert r.cg_status.shape == (3,)
    with pytest.raises(Exception):  # the device really refuses host reads
        bool(r.cg_status.sum() > 0)


@pytest.mark.parametrize("solver", ["gd", "hf"])
def test_captured_dense_path_makes_no_host_sync(solver):
    # A small model on CUDA takes the dense-Hessian path under cg_dense="auto": captured too.
    fm = FunctionalModel(conv_bn().float().to("meta"), F.cross_entropy)
    xs = torch.empty(3, 4, 1, 6, 6, device="meta")
    ys = torch.empty(3, 4, dtype=torch.long, device="meta")
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=2, cg_steps=3, hf_cg_steps=2,
                      backend="torch", task_batching="vmap", cg_dense="always")
    r = meta_gradient_flat(fm, xs, ys, xs, ys, cfg, validate_values=False)
    assert r.hvp == "dense" and r.grads_flat.shape == (fm.num_params,)


def test_cuda_graphs_need_a_cuda_model():
    model = conv_bn()
    with pytest.raises(ValueError, match="CUDA"):
        IMAML(model, F.cross_entropy, IMAMLConfig(), cuda_graphs=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("solver", ["gd", "hf"])
def test_replay_equals_uncaptured_for_new_data(solver):
    torch.manual_seed(0)
    model = conv_bn().float().cuda()
    cfg = IMAMLConfig(inner_solver=solver, inner_steps=3, cg_steps=4, hf_cg_steps=2)
    plain = IMAML(model, F.cross_entropy, cfg)
    graphed = IMAML(model, F.cross_entropy, cfg, cuda_graphs=True)
    for seed in range(3):
        torch.manual_seed(seed)
        ep = [t.cuda() for t in class_episode(6, 4, 4, (1, 6, 6), 3)]
        ep = [t.float() if t.is_floating_point() else t for t in ep]
        a, b = plain.meta_gradient(*ep), graphed.meta_gradient(*ep)
        torch.testing.assert_close(b.grads_flat, a.grads_flat, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.adapted_flat, a.adapted_flat, rtol=1e-5, atol=1e-6)
        assert torch.equal(b.cg_status, a.cg_status)
    assert graphed._graphed.captures == 1 and graphed._graphed.replays == 3
    ep = [t.cuda() for t in class_episode(5, 4, 4, (1, 6, 6), 3)]  # another T: a new graph
    graphed.meta_gradient(*[t.float() if t.is_floating_point() else t for t in ep])
    assert graphed._graphed.captures == 2


@pytest.mark.gpu
@needs_gpu
def test_graphed_meta_steps_equal_plain_meta_steps():
    torch.manual_seed(0)
    base = conv_bn().float().cuda()
    models = [base, copy.deepcopy(base)]
    cfg = IMAMLConfig(inner_steps=3, cg_steps=4)
    learners = [IMAML(m, F.cross_entropy, cfg, torch.optim.Adam(m.parameters(), 1e-2),
                      cuda_graphs=g) for m, g in zip(models, (False, True))]
    for seed in range(3):
        torch.manual_seed(seed)
        ep = [t.cuda() for t in class_episode(6, 4, 4, (1, 6, 6), 3)]
        ep = [t.float() if t.is_floating_point() else t for t in ep]
        for learner in learners:
            learner.meta_step(*ep)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)

"""imaml_fast.precision: the engine's model calls run under IMAMLConfig.tf32, whatever the
global flags say, and the global flags come back exactly as they were."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import DT, class_episode
from imaml_fast import IMAML, IMAMLConfig, meta_gradient
from imaml_fast.precision import _PRECISION_PATHS, _resolve, tf32_mode


def flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def precision_strings():
    return {p: getattr(*_resolve(p)) for p in _PRECISION_PATHS}


@pytest.fixture
def restore_global_flags():
    before = flags()
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


class Recorder(nn.Module):
    """Identity that notes the TF32 flags each time the model runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(flags())
        return x


def recording_mlp():
    rec = Recorder()
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), rec, nn.Linear(5, 2)).to(DT), rec


@pytest.mark.parametrize("allow", [True, False])
def test_tf32_mode_sets_both_flags_and_puts_them_back(allow, restore_global_flags):
    torch.backends.cudnn.allow_tf32 = not allow
    torch.backends.cuda.matmul.allow_tf32 = not allow
    with tf32_mode(allow):
        assert flags() == (allow, allow)
    assert flags() == (not allow, not allow)
    with pytest.raises(KeyError):
        with tf32_mode(allow):
            raise KeyError("inside")
    assert flags() == (not allow, not allow)


def test_tf32_mode_restores_settings_made_with_the_newer_api(restore_global_flags):
    # A conv precision set through fp32_precision, unlike cuDNN's RNN one: the legacy getter
    # refuses to read this mix, so the context must save and restore the strings.
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    before = precision_strings()
    with tf32_mode(True):
        assert flags() == (True, True)
    assert precision_strings() == before
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cudnn.allow_tf32  # still the user's mix, untouched


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("tf32", [False, True])
def test_every_model_call_of_a_meta_gradient_runs_under_the_config(backend, tf32,
                                                                    restore_global_flags):
    model, rec = recording_mlp()
    ep = class_episode(2, 4, 3, (3,), 2)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
    r = meta_gradient(model, F.cross_entropy, *ep,
                      IMAMLConfig(inner_steps=2, cg_steps=2, backend=backend, tf32=tf32))
    assert torch.isfinite(r.grads_flat).all()
    assert len(rec.seen) >= 3 and set(rec.seen) == {(tf32, tf32)}
    assert flags() == (not tf32, not tf32)


@pytest.mark.parametrize("tf32", [False, True])
def test_imaml_adapt_and_predict_run_under_the_config(tf32, restore_global_flags):
    model, rec = recording_mlp()
    xs, ys, xq, _ = class_episode(2, 4, 3, (3,), 2)
    learner = IMAML(model, F.cross_entropy, IMAMLConfig(inner_steps=2, tf32=tf32))
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
    adapted = learner.adapt(xs, ys)
    n_adapt = len(rec.seen)
    learner.predict(adapted, xq)
    assert n_adapt >= 1 and len(rec.seen) > n_adapt and set(rec.seen) == {(tf32, tf32)}
    assert flags() == (not tf32, not tf32)


def test_tf32_must_be_a_bool():
    with pytest.raises(ValueError, match="IMAMLConfig.tf32=1 .*expected True or False"):
        IMAMLConfig(tf32=1)
    assert IMAMLConfig().tf32 is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_on_a_gpu_the_default_float32_meta_gradient_stays_near_float64(cuda_graphs,
                                                                        restore_global_flags):
    """With torch's global TF32 flags on, the default config still runs full float32
    convolutions: on an H200 the Omniglot network's meta-gradient (T = 8, 16 inner steps,
    lr 0.03) was 7.8e-7 from float64 so, and 0.12 with TF32.

    Per task, the median: a task whose adapted point lies within float32 rounding of a ReLU
    kink has a Hessian that jumps there (task 4 of this episode: moving its float64 point by
    1e-7 relative changes the Hessian-vector product by 2.7%), so its float32 meta-gradient
    may differ by 4e-3 from float64 on any path, and which paths round across the kink is
    chance. TF32 moves every task (0.12 overall)."""
    from imaml_fast.models import omniglot_conv

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = omniglot_conv(5).cuda()
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(2, 8, 5, 1, 28, 28, generator=g).cuda()
    ys = yq = torch.arange(5).repeat(8, 1).cuda()
    cfg = IMAMLConfig(inner_steps=16, inner_lr=0.03, lam=2.0, cg_steps=5)
    exact = meta_gradient(model.double(), F.cross_entropy, xs.double(), ys, xq.double(), yq, cfg)
    model.float()
    r = IMAML(model, F.cross_entropy, cfg, cuda_graphs=cuda_graphs).meta_gradient(xs, ys, xq, yq)
    per_task = ((r.task_grads_flat.double() - exact.task_grads_flat).norm(dim=1)
                / exact.task_grads_flat.norm(dim=1))
    assert per_task.median() < 1e-5, per_task
    assert flags() == (True, True)

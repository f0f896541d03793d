import pytest
import torch
import torch.nn.functional as F

from _helpers import DT, class_episode, conv_bn, mlp
from imaml_fast import IMAMLConfig, meta_gradient

CFG = IMAMLConfig(inner_steps=1, cg_steps=1)


def episode():
    return list(class_episode(3, 4, 4, (3,), 2))


def run(model, xs, ys, xq, yq, loss=F.cross_entropy):
    return meta_gradient(model, loss, xs, ys, xq, yq, CFG)


@pytest.mark.parametrize("index,name", [(1, "y_support"), (2, "x_query"), (3, "y_query")])
def test_mismatched_task_counts(index, name):
    ep = episode()
    ep[index] = ep[index][:2]
    with pytest.raises(ValueError, match=rf"mismatched number of tasks.*{name} has T=2"):
        run(mlp(), *ep)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.float32])
def test_wrong_label_dtype(dtype):
    xs, ys, xq, yq = episode()
    with pytest.raises(ValueError, match=r"y_support has dtype"):
        run(mlp(), xs, ys.to(dtype), xq, yq.to(dtype))


def test_label_dtypes_must_agree():
    xs, ys, xq, yq = episode()
    with pytest.raises(ValueError, match="y_support is torch.int64 but y_query is torch.float64"):
        run(mlp(), xs, ys, xq, yq.to(DT), loss=lambda o, y: o.sum())


def test_float_labels_for_cross_entropy_fail_in_the_probe_with_context():
    xs, ys, xq, yq = episode()
    with pytest.raises(ValueError, match=r"loss_fn\(model\(x_support\[0\]\), y_support\[0\]\) failed"):
        run(mlp(), xs, ys.to(DT), xq, yq.to(DT))


def test_empty_support_set():
    xs, ys, xq, yq = episode()
    with pytest.raises(ValueError, match="x_support is empty"):
        run(mlp(), xs[:, :0], ys[:, :0], xq, yq)
    with pytest.raises(ValueError, match="x_query is empty"):
        run(mlp(), xs, ys, xq[:, :0], yq[:, :0])


def test_examples_and_labels_must_match():
    xs, ys, xq, yq = episode()
    with pytest.raises(ValueError, match="x_support has 4 examples per task but y_support has 3"):
        run(mlp(), xs, ys[:, :3], xq, yq)


@pytest.mark.parametrize("which", ["x_support", "x_query", "params"])
def test_nan_inputs(which):
    model = mlp()
    xs, ys, xq, yq = episode()
    if which == "x_support":
        xs[1, 2, 0] = float("nan")
    elif which == "x_query":
        xq[0, 0, 1] = float("inf")
    else:
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        run(model, xs, ys, xq, yq)


def test_wrong_input_dtype_and_missing_task_dim():
    xs, ys, xq, yq = episode()
    with pytest.raises(ValueError, match=r"x_support has dtype torch.float32 but the parameters are torch.float64"):
        run(mlp(), xs.float(), ys, xq, yq)
    with pytest.raises(ValueError, match=r"unsqueeze\(0\)"):
        run(mlp(), xs[0, 0], ys, xq, yq)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        run(mlp(), xs.numpy(), ys, xq, yq)


def test_loss_must_be_scalar():
    xs, ys, xq, yq = episode()
    with pytest.raises(ValueError, match="scalar"):
        run(mlp(), xs, ys, xq, yq, loss=lambda o, y: F.cross_entropy(o, y, reduction="none"))


def test_config_type_is_checked():
    xs, ys, xq, yq = episode()
    with pytest.raises(ValueError, match="IMAMLConfig"):
        meta_gradient(mlp(), F.cross_entropy, xs, ys, xq, yq, {"lam": 1.0})


def test_bad_model_inputs_for_conv():
    xs, ys, xq, yq = class_episode(2, 3, 3, (1, 7, 7), 3)
    xs = xs[..., :1, :1]  # too small a picture for the network's linear head
    with pytest.raises(ValueError, match="failed"):
        meta_gradient(conv_bn(), F.cross_entropy, xs, ys, xq, yq, CFG)

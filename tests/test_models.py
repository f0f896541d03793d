import pytest
import torch

from imaml_fast.functional import check_batchnorm
from imaml_fast.models import conv4_maxpool, omniglot_conv, sinusoid_mlp


@pytest.mark.parametrize("make,args,x_shape,n_params", [
    (omniglot_conv, (5,), (2, 1, 28, 28), 113_221),
    (omniglot_conv, (20,), (2, 1, 28, 28), 113_221 + 15 * 257),
    (conv4_maxpool, (5,), (2, 3, 84, 84), 32_901),
    (sinusoid_mlp, (), (2, 1), 1_761),
])
def test_shapes_and_sizes(make, args, x_shape, n_params):
    model = make(*args)
    check_batchnorm(model)  # batch statistics everywhere
    assert sum(p.numel() for p in model.parameters()) == n_params
    out = model(torch.randn(*x_shape))
    assert out.shape == (2, args[0] if args else 1)


def test_omniglot_feature_map_is_2x2():
    model = omniglot_conv(5)
    feats = model[:-2](torch.randn(3, 1, 28, 28))
    assert feats.shape == (3, 64, 2, 2)

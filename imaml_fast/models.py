"""The paper's networks. Every BatchNorm uses batch statistics (track_running_stats=False),
so each task normalises with its own support or query batch, as in the iMAML and MAML code."""
from __future__ import annotations

from torch import nn


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, track_running_stats=False)


def omniglot_conv(n_way: int, in_channels: int = 1, filters: int = 64) -> nn.Sequential:
    """The iMAML authors' Omniglot network for 28x28 inputs: 4 x [3x3 conv with stride 2 and
    padding 1, BatchNorm, ReLU], a zero pad (right and bottom) after block 2 so that
    28 -> 14 -> 7 -> 8 -> 4 -> 2, then a linear head on 2*2*filters features.
    113,221 parameters for 5-way."""
    layers = []
    c = in_channels
    for block in range(4):
        layers += [nn.Conv2d(c, filters, 3, stride=2, padding=1), _bn(filters), nn.ReLU()]
        if block == 1:
            layers.append(nn.ZeroPad2d((0, 1, 0, 1)))
        c = filters
    layers += [nn.Flatten(), nn.Linear(filters * 2 * 2, n_way)]
    return nn.Sequential(*layers)


def conv4_maxpool(n_way: int, in_channels: int = 3, filters: int = 32, image_size: int = 84) -> nn.Sequential:
    """MAML's conv4: 4 x [3x3 conv with padding 1, BatchNorm, ReLU, 2x2 max-pool], then a linear
    head (32 filters and 84x84 inputs for Mini-ImageNet: 5*5*32 features)."""
    layers = []
    c, s = in_channels, image_size
    for _ in range(4):
        layers += [nn.Conv2d(c, filters, 3, padding=1), _bn(filters), nn.ReLU(), nn.MaxPool2d(2)]
        c, s = filters, s // 2
    layers += [nn.Flatten(), nn.Linear(filters * s * s, n_way)]
    return nn.Sequential(*layers)


def sinusoid_mlp(hidden: int = 40) -> nn.Sequential:
    """The 1-40-40-1 ReLU network of MAML's sinusoid regression (1,761 parameters)."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))

"""Small test architectures, and the channel-duplication oracle.

``double(small, big)`` fills ``big`` (the same architecture at twice the width of every
hidden channel space) so that channel j + w is an exact duplicate of channel j: producer
rows and per-channel parameters are copied, consumer columns are split in halves. Folding
``big`` at ratio 0.5 must give back ``small``'s function. The rule is read off tensor
shapes alone (independent of modelfold's own group discovery): an axis that doubled is
a producer axis if it is axis 0 (or a vector), otherwise a consumer axis.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def double(small: nn.Module, big: nn.Module, split_overrides: dict | None = None) -> nn.Module:
    """Copy ``small``'s weights into ``big`` as duplicated channels (see module docstring)."""
    sd_small, sd_big = small.state_dict(), big.state_dict()
    out = {}
    for name, t in sd_small.items():
        target = sd_big[name]
        if split_overrides and name in split_overrides:
            out[name] = split_overrides[name](t)
            continue
        new = t.clone()
        for axis in range(t.ndim):
            if target.shape[axis] == 2 * new.shape[axis]:
                if axis == 0 or t.ndim == 1:
                    new = torch.cat([new, new], dim=axis)
                else:
                    new = torch.cat([new / 2, new / 2], dim=axis)
        assert new.shape == target.shape, (name, new.shape, target.shape)
        out[name] = new
    big.load_state_dict(out)
    return big


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean.data = 0.1 * torch.randn(n, generator=g)
            m.running_var.data = 0.5 + torch.rand(n, generator=g)
    return model


class MLP(nn.Module):
    def __init__(self, w: int = 16, d_in: int = 12, d_out: int = 5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, w), nn.ReLU(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, d_out))

    def forward(self, x):
        return self.net(x)


class VGGish(nn.Module):
    def __init__(self, w: int = 8, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 4 * 4, 4 * w), nn.ReLU(),
                                        nn.Linear(4 * w, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class Block(nn.Module):
    def __init__(self, w_in: int, w: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(w_in, w, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.short = nn.Sequential()
        if stride != 1 or w_in != w:
            self.short = nn.Sequential(nn.Conv2d(w_in, w, 1, stride, bias=False), nn.BatchNorm2d(w))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNetish(nn.Module):
    def __init__(self, w: int = 8, classes: int = 5, blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        layers = [Block(w, w) for _ in range(blocks)] + [Block(w, 2 * w, 2)]
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class CatNet(nn.Module):
    """Two branches concatenated along channels, read by a conv and a BN."""

    def __init__(self, w: int = 6, classes: int = 4):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 2 * w, 1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.bn = nn.BatchNorm2d(3 * w)
        self.conv = nn.Conv2d(3 * w, w, 3, padding=1)
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(self.conv(y).mean((2, 3)))


def double_catnet(small: CatNet, big: CatNet) -> CatNet:
    """``double`` for CatNet: the concatenated space is [a, a', b, b'] in the big net."""
    w = small.conv.out_channels

    def cat_vec(t: torch.Tensor) -> torch.Tensor:
        a, b = t[:w], t[w:]
        return torch.cat([a, a, b, b])

    def cat_cols(t: torch.Tensor) -> torch.Tensor:  # conv weight (out, in=3w, k, k): out dup, in split
        a, b = t[:, :w] / 2, t[:, w:] / 2
        cols = torch.cat([a, a, b, b], dim=1)
        return torch.cat([cols, cols], dim=0)

    overrides = {f"bn.{p}": cat_vec for p in ("weight", "bias", "running_mean", "running_var")}
    overrides["conv.weight"] = cat_cols
    return double(small, big, overrides)


class InvertedResidual(nn.Module):
    """MobileNetV2-style: 1x1 expand, depthwise 3x3, 1x1 linear projection, residual add."""

    def __init__(self, w: int = 4, classes: int = 5):
        super().__init__()
        h = 3 * w
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU6())
        self.block = nn.Sequential(
            nn.Conv2d(w, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, w, 1, bias=False), nn.BatchNorm2d(w))
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        return self.fc(x.mean((2, 3)))

"""Reference models: CIFAR-style ResNet18 / VGG11-BN (as in the model-folding paper) and a small MLP.

Pretrained Fashion-MNIST weights (trained by ``scripts/train_fmnist.py``) ship as fp16
safetensors files in ``modelfold/checkpoints/`` and are loaded by :func:`load_pretrained`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from modelfold.errors import CheckpointError

__all__ = [
    "BasicBlock",
    "CHECKPOINT_DIR",
    "PRETRAINED",
    "ResNetCIFAR",
    "checkpoint_path",
    "load_pretrained",
    "mlp",
    "resnet18_cifar",
    "vgg11_bn_cifar",
]

CHECKPOINT_DIR: Path = Path(__file__).resolve().parent / "checkpoints"


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut, ReLU after the add."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNetCIFAR(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem without max-pool, four stages, avg-pool, linear head."""

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages = []
        for i, (n, w) in enumerate(zip(num_blocks, widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, w, stride))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 1) -> ResNetCIFAR:
    """ResNet18 for 32x32 inputs (about 11.17M parameters for one input channel, 10 classes)."""
    return ResNetCIFAR((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)


_VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def vgg11_bn_cifar(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """VGG11 with batch norm for 32x32 inputs.

    ``features`` (3x3 conv with bias + BN + ReLU, 2x2 max-pool) ends at 512x1x1; then
    flatten and the classifier Linear(512,512)+ReLU+Linear(512,512)+ReLU+Linear(512,num_classes).
    There is no dropout. Returned as ``nn.Sequential(features, flatten, classifier)``.
    """
    layers: list[nn.Module] = []
    c = in_channels
    for v in _VGG11_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=True), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    features = nn.Sequential(*layers)
    classifier = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_classes)
    )
    from collections import OrderedDict

    return nn.Sequential(
        OrderedDict([("features", features), ("flatten", nn.Flatten()), ("classifier", classifier)])
    )


def mlp(in_features: int = 1024, hidden: Sequence[int] = (512, 256), num_classes: int = 10) -> nn.Sequential:
    """Flatten followed by Linear/ReLU layers of widths ``hidden`` and a final Linear to ``num_classes``."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


#: Pretrained model name -> constructor (10 classes, one input channel, 32x32 Fashion-MNIST).
PRETRAINED: dict[str, Callable[[], nn.Module]] = {
    "resnet18_fmnist": resnet18_cifar,
    "vgg11_bn_fmnist": vgg11_bn_cifar,
}


def checkpoint_path(name: str) -> Path:
    """Path of the committed fp16 checkpoint of pretrained model ``name``."""
    return CHECKPOINT_DIR / f"{name}.safetensors"


def load_pretrained(name: str) -> nn.Module:
    """Build pretrained model ``name`` (see :data:`PRETRAINED`), load its weights as float32, return it in eval mode."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {sorted(PRETRAINED)}")
    path = checkpoint_path(name)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is missing; train it with "
            f"`python scripts/train_fmnist.py --model {name.removesuffix('_fmnist')}`"
        )
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several exception types
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    model = PRETRAINED[name]()
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match model {name!r}: {exc}") from exc
    return model.eval()

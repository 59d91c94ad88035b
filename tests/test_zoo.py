"""Reference model definitions and the committed pretrained Fashion-MNIST checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelfold import zoo
from modelfold.errors import CheckpointError


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_resnet18_cifar_shape_and_size() -> None:
    m = zoo.resnet18_cifar().eval()
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert _n_params(m) == 11_172_810  # ~11.17M for one input channel
    assert _n_params(zoo.resnet18_cifar(num_classes=100, in_channels=3)) == 11_220_132
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    assert all(not r.inplace for r in m.modules() if isinstance(r, nn.ReLU))
    assert [m.layer1[0].conv1.stride, m.layer2[0].conv1.stride] == [(1, 1), (2, 2)]
    assert m.layer1[0].downsample is None and m.layer2[0].downsample is not None


def test_vgg11_bn_cifar_shape_and_size() -> None:
    m = zoo.vgg11_bn_cifar().eval()
    x = torch.randn(2, 1, 32, 32)
    assert m.features(x).shape == (2, 512, 1, 1)
    assert m(x).shape == (2, 10)
    assert sum(isinstance(c, nn.Conv2d) for c in m.modules()) == 8
    assert sum(isinstance(c, nn.Linear) for c in m.modules()) == 3
    assert _n_params(m) == 9_755_274
    assert zoo.vgg11_bn_cifar(num_classes=7, in_channels=3)(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_mlp() -> None:
    m = zoo.mlp()
    assert m(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    assert [layer.out_features for layer in m if isinstance(layer, nn.Linear)] == [512, 256, 10]
    assert zoo.mlp(in_features=8, hidden=(), num_classes=2)(torch.randn(4, 8)).shape == (4, 2)


def test_load_pretrained_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown pretrained"):
        zoo.load_pretrained("resnet50_imagenet")


def test_load_pretrained_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(zoo, "CHECKPOINT_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        zoo.load_pretrained("vgg11_bn_fmnist")


@pytest.mark.parametrize("name", sorted(zoo.PRETRAINED))
def test_load_pretrained_accuracy(name: str) -> None:
    if not zoo.checkpoint_path(name).is_file():
        pytest.skip(f"{zoo.checkpoint_path(name)} not trained yet (scripts/train_fmnist.py)")
    from modelfold import datasets

    try:
        x, y = datasets.fashion_mnist("test")
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    model = zoo.load_pretrained(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    with torch.inference_mode():  # the whole test set: the shipped models must reach 93%
        hits = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    acc = hits / len(x)
    assert acc >= 0.93, f"{name}: {acc:.4f} on the {len(x)} test images"

"""Real torchvision architectures (random weights): identity at ratio 0, smaller at 0.3.

The whole zoo runs in benchmarks/zoo.py; this keeps a representative, fast subset in CI.
"""

import pytest
import torch
import torchvision

import modelfold

MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "shufflenet_v2_x0_5"]


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_folds_or_is_refused(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    try:
        same = modelfold.fold(model, x, ratio=0.0)
    except modelfold.errors.UnsupportedModelError as e:
        assert "ignore" in str(e)
        return
    folded, report = modelfold.fold(model, x, ratio=0.3, return_report=True)
    with torch.no_grad():
        assert torch.equal(same(x), y)
        assert folded(x).shape == y.shape
    assert report.params_after < report.params_before


def test_paper_cifar_resnet18_and_vgg11_fold_to_half_width() -> None:
    from modelfold.zoo import resnet18_cifar, vgg11_bn_cifar

    for make in (resnet18_cifar, vgg11_bn_cifar):
        torch.manual_seed(0)
        model = make().eval()
        x = torch.randn(1, 1, 32, 32)
        folded, report = modelfold.fold(model, x, ratio=0.5, return_report=True)
        widths = [m.out_channels for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
        full = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert widths == [w // 2 for w in full]
        assert not report.kept_groups
        with torch.no_grad():
            assert folded(x).shape == (1, 10)

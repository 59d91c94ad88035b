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

"""The default self-calibration batch of traced CNNs (size, resolution) and the progress of compress()."""

import pytest
import torch
import torch.nn as nn

import modelfold
from modelfold.traced import sources
from modelfold.traced.sources import SELF_DEFAULTS, calibration_batches, default_self_shape
from tests.nets import VGGish, randomize_bn

BARS = ("DeepInversion", "automatic budget", "least-squares refit", "folding groups")


def _pooled() -> nn.Module:
    """Fully convolutional: adaptive pooling makes the output shape independent of the image size."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_default_self_shape_scales_fully_convolutional_models_only():
    side = SELF_DEFAULTS["side"]
    net = _pooled()
    assert default_self_shape(net, torch.zeros(1, 3, 224, 224)) == (3, side, side)
    assert default_self_shape(net, torch.zeros(1, 3, 224, 336)) == (3, side, round(336 * side / 224))
    assert default_self_shape(net, torch.zeros(1, 3, 64, 64)) == (3, 64, 64)  # already small
    fixed = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 120 * 120, 5)).eval()
    assert default_self_shape(fixed, torch.zeros(1, 3, 120, 120)) == (3, 120, 120)  # needs its input size
    assert default_self_shape(nn.Linear(6, 3), torch.zeros(1, 6)) == (6,)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    default_self_shape(net, torch.zeros(1, 3, 224, 224))
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched


def test_default_self_batch_is_what_is_synthesized(monkeypatch):
    got = {}

    def fake(model, shape, settings, progress, use_cache, info):
        got.update(shape=shape, batch=settings.batch, iters=settings.iters, progress=progress)
        info.update(source="synthesized", seconds=0.0)
        return torch.zeros(settings.batch, *shape)

    monkeypatch.setattr(sources, "synthetic_batch", fake)
    side = SELF_DEFAULTS["side"]
    batches, info = calibration_batches("self", _pooled(), torch.zeros(1, 3, 224, 224), progress=True)
    assert got == {"shape": (3, side, side), "batch": SELF_DEFAULTS["batch"], "iters": SELF_DEFAULTS["iters"],
                   "progress": True}
    assert info["samples"] == SELF_DEFAULTS["batch"] and info["self_shape"] == [3, side, side]
    assert torch.cat(batches).shape == (SELF_DEFAULTS["batch"], 3, side, side)
    calibration_batches("self", _pooled(), torch.zeros(1, 3, 224, 224), self_batch=4, self_iters=3,
                        self_shape=(3, 40, 40))
    assert (got["shape"], got["batch"], got["iters"]) == ((3, 40, 40), 4, 3)


@pytest.mark.parametrize("progress", [True, False])
def test_compress_shows_its_stages_when_asked(progress, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))  # nothing cached: the synthesis runs
    net = randomize_bn(VGGish(8).eval(), 3)
    x = torch.zeros(1, 3, 16, 16)
    out, rep = modelfold.compress(net, x, sparsity=0.3, calibration_kwargs={"self_batch": 4, "self_iters": 2},
                                  progress=progress, return_report=True)
    err = capsys.readouterr().err
    if progress:
        assert all(bar in err for bar in BARS), err
    else:
        assert not any(bar in err for bar in BARS), err
    assert abs(rep.param_sparsity - 0.3) <= 0.01 and rep.repair_info["budget_seconds"] >= 0
    assert rep.repair_info["self_source"] == "synthesized" and out(x).shape == net(x).shape

"""Calibrated compression of traced CNNs: least-squares refit, activation-aware plans, sources."""

import copy

import pytest
import torch

import modelfold
from modelfold.errors import InputShapeError
from modelfold.traced.calibrator import CNNCalibrator
from modelfold.traced.engine import compress
from modelfold.traced.planners import first_k_planner, magnitude_planner
from modelfold.traced.sources import CalibrationError
from tests.nets import InvertedResidual, ResNetish, VGGish, double, randomize_bn

NETS = [VGGish, ResNetish, InvertedResidual]


def _doubled(cls, seed=0):
    torch.manual_seed(seed)
    small = randomize_bn(cls(4).eval(), seed + 1)
    return double(small, randomize_bn(cls(8).eval(), seed + 2)).eval()


def _err(a, b, x):
    """Mean squared output difference relative to the mean square of ``b``'s output."""
    with torch.no_grad():
        ref = b(x)
        return float((a(x) - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("cls", NETS)
def test_refit_is_exact_on_duplicated_channels(cls):
    # Pruning keeps the first copy of every duplicated channel and drops the second (first_k):
    # without compensation the consumers lose half their input; the refit restores it exactly.
    big = _doubled(cls)
    x = torch.randn(16, 3, 16, 16)
    plain, refit = copy.deepcopy(big), copy.deepcopy(big)
    compress(plain, x[:1], 0.5, first_k_planner, verify=False)
    compress(refit, x[:1], 0.5, first_k_planner, verify=False, calib=CNNCalibrator(list(x.split(8)), lam=0.0))
    assert _err(plain, big, x) > 1e-3
    assert _err(refit, big, x) < 1e-8


@pytest.mark.parametrize("cls", [VGGish, InvertedResidual])
def test_calibrated_fold_stays_exact_on_duplicates(cls):
    big = _doubled(cls, 3)
    x = torch.randn(16, 3, 16, 16)
    out = modelfold.fold(big, x[:1], 0.5, calibration=x, calibration_kwargs={"lam": 0.0}, verify=False)
    assert _err(out, big, x) < 1e-8


@pytest.mark.parametrize("make,seed", [(lambda: VGGish(8), 0), (lambda: ResNetish(8, blocks=1), 1)])
def test_refit_with_evaluation_inputs_never_increases_error(make, seed):
    torch.manual_seed(seed)
    net = randomize_bn(make().eval(), seed)
    x = torch.randn(32, 3, 16, 16)
    kw = {"verify": False, "calibration": x}
    plain = copy.deepcopy(net)
    compress(plain, x[:1], 0.5, magnitude_planner(), verify=False)
    calibrated = modelfold.prune(net, x[:1], 0.5, calibration_kwargs={"selection": "magnitude"}, **kw)
    assert _err(calibrated, net, x) <= _err(plain, net, x)
    folded = modelfold.fold(net, x[:1], 0.5, verify=False)
    cal_fold = modelfold.fold(net, x[:1], 0.5, calibration_kwargs={"grouping": "weight"}, **kw)
    assert _err(cal_fold, net, x) <= _err(folded, net, x)


def test_calibrated_compression_is_deterministic_and_leaves_model_alone():
    net = randomize_bn(ResNetish(6, blocks=1).eval(), 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 3, 16, 16)
    a = modelfold.fold(net, x[:1], 0.4, calibration=x, verify=False)
    b = modelfold.fold(net, x[:1], 0.4, calibration=x, verify=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_ratio_zero_is_identity():
    net = randomize_bn(VGGish(6).eval(), 5)
    x = torch.randn(8, 3, 16, 16)
    out = modelfold.prune(net, x[:1], 0.0, calibration=x)
    with torch.no_grad():
        assert torch.equal(out(x), net(x))


def test_activation_selection_keeps_the_channels_that_carry_signal():
    # Hidden channels 0..7 of an MLP are silent on the calibration inputs (their ReLU input is
    # always negative) but have the largest weights: magnitude keeps them, activation scores do not.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    with torch.no_grad():
        net[0].weight[:8] = 0.0
        net[0].bias[:8] = -10.0
        net[0].weight[8:] *= 0.1
        net[0].bias[8:] = 0.5
    x = torch.randn(64, 6)
    mag = modelfold.prune(net, x[:1], 0.5)
    act = modelfold.prune(net, x[:1], 0.5, calibration=x, calibration_kwargs={"compensate": False})
    assert _err(act, net, x) < 1e-12 < _err(mag, net, x)


def test_self_calibration_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path))
    net = randomize_bn(VGGish(4).eval(), 6)
    x = torch.zeros(1, 3, 16, 16)
    kw = {"self_batch": 8, "self_iters": 2}
    _, r1 = modelfold.fold(net, x, 0.5, calibration="self", calibration_kwargs=kw, return_report=True)
    out, r2 = modelfold.fold(net, x, 0.5, calibration="self", calibration_kwargs=kw, return_report=True)
    assert r1.repair_info["self_source"] == "synthesized" and r2.repair_info["self_source"] == "cache"
    assert r2.repair_info["calibration"] == "self" and r2.repair_info["samples"] == 8
    assert r2.repair_info["refit"] > 0 and out(x).shape == net(x).shape


def test_bad_calibration_arguments():
    net = VGGish(4).eval()
    x = torch.zeros(2, 3, 16, 16)
    with pytest.raises(CalibrationError, match="'self'"):
        modelfold.fold(net, x, 0.5, calibration="imagenet")
    with pytest.raises(CalibrationError, match="replaces repair"):
        modelfold.fold(net, x, 0.5, calibration=x, repair="ar")
    with pytest.raises(CalibrationError, match="unknown calibration_kwargs"):
        modelfold.prune(net, x, 0.5, calibration=x, calibration_kwargs={"lamda": 1})
    with pytest.raises(CalibrationError, match="needs calibration"):
        modelfold.prune(net, x, 0.5, calibration_kwargs={"lam": 1})
    with pytest.raises(InputShapeError, match="calibration inputs"):
        modelfold.prune(net, x, 0.5, calibration=torch.zeros(4, 1, 16, 16))


def test_auto_budget_spares_the_fragile_group():
    # Hidden layer 2 has 8 channels that are silent on the calibration inputs; layer 1 has none.
    # Asked for the parameters those 8 channels hold, the budget takes them and leaves layer 1 alone.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 3)).eval()
    with torch.no_grad():
        net[2].bias[:8] = -100.0
    x = torch.randn(64, 6)
    out, rep = modelfold.prune(net, x[:1], sparsity=0.365, calibration=x, calibration_kwargs={"lam": 0.0},
                               return_report=True)  # the 8 silent channels hold 160 of the 435 parameters
    plan = rep.repair_info["plan"]
    assert plan == {"0": 0.0, "2": 0.5} and abs(rep.param_sparsity - 0.365) <= 0.01
    assert _err(out, net, x) < 1e-10
    uniform = modelfold.prune(net, x[:1], sparsity=0.365, calibration=x, calibration_kwargs={"budget": "uniform"})
    assert _err(uniform, net, x) > 1e-4


def test_activation_grouping_behind_flatten():
    # The classifier reads each channel at 16 positions (flatten): activation samples keep that layout.
    net = randomize_bn(VGGish(4).eval(), 7)
    x = torch.randn(64, 3, 16, 16)
    out = modelfold.fold(net, x[:1], 0.5, calibration=x, verify=False)
    assert out.classifier[1].in_features == 4 * 16 and out(x).shape == (64, 5)

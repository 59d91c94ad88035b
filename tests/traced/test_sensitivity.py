"""Refit-aware sensitivity of CNN channel groups (calibration_kwargs={"budget_refit": True})."""

import torch

import modelfold
from modelfold.traced.budget import sensitivity_curves
from modelfold.traced.calibrator import CNNCalibrator
from tests.nets import InvertedResidual, double, randomize_bn


def _doubled(seed=0):
    torch.manual_seed(seed)
    small = randomize_bn(InvertedResidual(4).eval(), seed + 1)
    return double(small, randomize_bn(InvertedResidual(8).eval(), seed + 2)).eval()


def test_refit_aware_curves_see_what_the_refit_repairs_and_leave_the_model_untouched():
    net = _doubled()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(64, 3, 16, 16)
    calib = CNNCalibrator(list(x.split(32)))
    plain, _ = sensitivity_curves(net, x[:1], calib, set(), set())
    refit, sizes = sensitivity_curves(net, x[:1], calib, set(), set(), refit=True)
    assert set(plain) == set(refit) and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for root in refit:
        assert [c[:2] for c in refit[root]] == [c[:2] for c in plain[root]]  # same ratios and parameters
        assert refit[root][0][2] == 0.0
    # the block's projection reads duplicated hidden channels: the refit recovers what silencing loses
    worst = max(plain, key=lambda r: plain[r][-1][2])
    assert plain[worst][-1][2] > 1e-2 and refit[worst][-1][2] < 0.2 * plain[worst][-1][2]


def test_budget_refit_keeps_sparsity_exact_and_is_deterministic():
    net = _doubled(1)
    x = torch.randn(48, 3, 16, 16)
    kw = {"budget_refit": True}
    a, rep = modelfold.compress(net, x[:1], sparsity=0.3, calibration=x, calibration_kwargs=kw, return_report=True)
    b = modelfold.compress(net, x[:1], sparsity=0.3, calibration=x, calibration_kwargs=kw)
    assert abs(rep.param_sparsity - 0.3) <= 0.01 and rep.repair_info["budget"] == "auto"
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

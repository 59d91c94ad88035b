"""Folding oracles: duplicated channels fold back exactly; nothing to fold is identity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from nets import MLP, CatNet, InvertedResidual, ResNetish, VGGish, double, double_catnet, randomize_bn

import modelfold

CASES = {
    "mlp": (lambda w: MLP(w), 8, (4, 12)),
    "vgg": (lambda w: VGGish(w), 4, (2, 3, 16, 16)),
    "resnet": (lambda w: ResNetish(w), 4, (2, 3, 16, 16)),
    "depthwise": (lambda w: InvertedResidual(w), 4, (2, 3, 8, 8)),
}


def _pair(name: str, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    make, w, shape = CASES[name]
    torch.manual_seed(seed)
    small = randomize_bn(make(w), seed).eval()
    big = double(small, make(2 * w)).eval()
    return small, big, torch.randn(*shape)


@pytest.mark.parametrize("name", sorted(CASES))
def test_duplicated_channels_fold_back_exactly(name: str) -> None:
    small, big, x = _pair(name)
    with torch.no_grad():
        assert (big(x) - small(x)).abs().max() < 1e-5  # the doubling itself is exact
        folded, report = modelfold.fold(big, x, ratio=0.5, return_report=True)
        err = (folded(x) - small(x)).abs().max().item()
    assert err <= 1e-5, err
    assert report.params_after == sum(p.numel() for p in small.parameters())
    assert all(g.rel_error is None or g.rel_error < 1e-6 for g in report.groups)


def test_concatenation_folds_back_exactly() -> None:
    torch.manual_seed(1)
    small = randomize_bn(CatNet(3)).eval()
    big = double_catnet(small, randomize_bn(CatNet(6))).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert (big(x) - small(x)).abs().max() < 1e-5
        folded = modelfold.fold(big, x, ratio=0.5)
        assert (folded(x) - small(x)).abs().max() <= 1e-5
    assert folded.bn.num_features == 9 and folded.conv.in_channels == 9


@pytest.mark.parametrize("name", sorted(CASES))
def test_ratio_zero_is_identity(name: str) -> None:
    _, big, x = _pair(name, seed=3)
    folded = modelfold.fold(big, x, ratio=0.0)
    with torch.no_grad():
        assert torch.equal(folded(x), big(x))
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in big.parameters())


def test_random_net_folds_smaller_and_consistent() -> None:
    torch.manual_seed(0)
    model = randomize_bn(ResNetish(8)).eval()
    x = torch.randn(2, 3, 16, 16)
    before = copy.deepcopy(model.state_dict())
    folded, report = modelfold.fold(model, x, ratio=0.5, return_report=True)
    # the user's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        y = folded(x)
    assert y.shape == (2, 5) and y.dtype == torch.float32
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    assert report.params_after == sum(p.numel() for p in folded.parameters())
    # module attributes agree with tensor shapes
    for m in folded.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape == m.running_mean.shape == (m.num_features,)
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
    assert folded.stem[0].out_channels == 4  # 8 channels, ratio 0.5
    assert folded.fc.out_features == 5  # the output is never folded


def test_deterministic_given_seed() -> None:
    _, big, x = _pair("vgg")
    torch.manual_seed(0)
    big = randomize_bn(VGGish(8), 5).eval()
    a = modelfold.fold(big, x, ratio=0.4, seed=7)
    b = modelfold.fold(big, x, ratio=0.4, seed=7)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_save_load_and_export(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(ResNetish(8)).eval()
    x = torch.randn(2, 3, 16, 16)
    folded = modelfold.fold(model, x, ratio=0.5)
    path = modelfold.io.save_model(folded, tmp_path / "folded.pt")
    again = torch.load(path, weights_only=False)
    exported = torch.export.export(folded, (x,))
    with torch.no_grad():
        y = folded(x)
        assert torch.equal(again(x), y)
        assert (exported.module()(x) - y).abs().max() < 1e-6


def test_ignore_keeps_layers_intact() -> None:
    torch.manual_seed(0)
    model = randomize_bn(VGGish(8)).eval()
    x = torch.randn(1, 3, 16, 16)
    folded, report = modelfold.fold(model, x, ratio=0.5, ignore=["features.4"], return_report=True)
    # features.4 keeps its input and output channels, so the groups around it stay intact
    assert (folded.features[4].in_channels, folded.features[4].out_channels) == (8, 16)
    assert folded.features[0].out_channels == 8
    assert folded.classifier[1].out_features == 16  # 32 -> 16, not touched by the ignore
    assert any(g.status == "kept" and g.reason == "ignored by the user" for g in report.groups)


def test_keep_outputs_keeps_a_residual_stream_and_folds_the_rest() -> None:
    torch.manual_seed(0)
    model = randomize_bn(ResNetish(8)).eval()
    x = torch.randn(2, 3, 16, 16)
    for compress in (modelfold.fold, modelfold.prune):
        out, report = compress(model, x[:1], ratio=0.5, keep_outputs=["stem.0"], strict=True, return_report=True)
        # the stem writes the first residual stream: every producer of it keeps its width ...
        assert out.stem[0].out_channels == 8 and out.layers[1].conv2.out_channels == 8
        # ... while the convs inside the blocks and the second stream still fold
        assert out.layers[0].conv1.out_channels == 4 and out.layers[2].conv2.out_channels == 8
        assert out.stem[0].in_channels == 3 and out.layers[0].conv1.in_channels == 8
        kept = [g for g in report.groups if g.status == "kept"]
        assert len(kept) == 1 and kept[0].reason.startswith("output channels kept")
        assert out(x).shape == model(x).shape
    with pytest.raises(ValueError, match="keep_outputs entry 'nope'"):
        modelfold.fold(model, x[:1], ratio=0.5, keep_outputs=["nope"])


def test_prune_keeps_largest_rows() -> None:
    torch.manual_seed(0)
    model = MLP(8).eval()
    with torch.no_grad():
        model.net[0].weight[3] *= 100  # obviously important neuron
    x = torch.randn(3, 12)
    pruned = modelfold.prune(model, x, ratio=0.875, norm=2)  # keep 1 of 8 in the first layer
    assert pruned.net[0].out_features == 1
    assert torch.equal(pruned.net[0].weight[0], model.net[0].weight[3])


def test_sparsity_target_is_met() -> None:
    torch.manual_seed(0)
    model = randomize_bn(VGGish(8)).eval()
    x = torch.randn(1, 3, 16, 16)
    _, report = modelfold.fold(model, x, sparsity=0.5, return_report=True)
    assert abs(report.param_sparsity - 0.5) <= 0.01 and report.info["sparsity"] == 0.5
    assert 0 < report.ratio < 1


# round_to: hardware-friendly kept widths (multiples of N) on the traced engine

def _widths(model: nn.Module) -> list[int]:
    """Output widths of every conv / linear but the classifier."""
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)][:-1]


def test_kept_width_is_a_multiple_never_zero_never_above_n() -> None:
    from modelfold.checks import kept_width

    for n in range(1, 300, 7):
        for ratio in (0.0, 0.01, 0.3, 0.5, 0.9, 0.99):
            plain = kept_width(n, ratio)
            assert plain == max(1, round(n * (1 - ratio))) == kept_width(n, ratio, 1)
            for r in (8, 16, 64):
                k = kept_width(n, ratio, r)
                if plain == n or n < r:
                    assert k == n  # nothing removed stays whole; so does a group narrower than r
                else:
                    assert k % r == 0 and r <= k <= n  # a multiple, at least one, never above n
                    assert abs(k - plain) <= r / 2 or k in (r, n // r * r)  # the nearest one that fits
    assert kept_width(100, 0.3, 8) == 72 and kept_width(100, 0.3, 64) == 64 and kept_width(100, 0.3, 16) == 64
    assert kept_width(100, 0.02, 16) == 96  # 98: the nearest multiple, 96, not 112 > 100


@pytest.mark.parametrize("method", ["fold", "prune"])
def test_round_to_cnn_widths_are_multiples_and_the_result_runs_and_reloads(method: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(ResNetish(24)).eval()  # widths 24 (stem, blocks) and 48 (downsampling block)
    x = torch.randn(2, 3, 16, 16)
    fn = modelfold.fold if method == "fold" else modelfold.prune
    out, report = fn(model, x, ratio=0.3, round_to=8, return_report=True)
    assert sorted({g.channels_after for g in report.groups}) == [16, 32]  # 16.8 -> 17 -> 16, 33.6 -> 34 -> 32
    assert all(w % 8 == 0 for w in _widths(out)) and report.info == {"round_to": 8}
    assert sorted({g.channels_after for g in fn(model, x, ratio=0.3, return_report=True)[1].groups}) == [17, 34]
    torch.save(out, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert out(x).shape == model(x).shape and torch.equal(again(x), out(x))


@pytest.mark.parametrize("method", ["fold", "prune"])
def test_round_to_one_is_the_default(method: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(VGGish(12)).eval()
    x = torch.randn(2, 3, 16, 16)
    fn = modelfold.fold if method == "fold" else modelfold.prune
    a, b = fn(model, x, ratio=0.3), fn(model, x, ratio=0.3, round_to=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_to_with_sparsity_reaches_the_target() -> None:
    torch.manual_seed(0)
    model = randomize_bn(VGGish(16)).eval()  # widths 16, 32, 64
    x = torch.randn(2, 3, 16, 16)
    out, report = modelfold.fold(model, x, sparsity=0.4, round_to=8, return_report=True)
    assert all(w % 8 == 0 for w in _widths(out))
    assert abs(report.param_sparsity - 0.4) <= 0.01


def test_round_to_with_calibration_and_an_automatic_budget() -> None:
    torch.manual_seed(0)
    model = randomize_bn(VGGish(16)).eval()
    x = torch.randn(2, 3, 16, 16)
    out, report = modelfold.prune(model, x, sparsity=0.32, round_to=8, calibration=torch.randn(32, 3, 16, 16),
                                  return_report=True)  # multiples of 8 of widths 16/32/64: 0.3 is not reachable
    assert all(w % 8 == 0 for w in _widths(out))
    assert abs(report.param_sparsity - 0.32) <= 0.01

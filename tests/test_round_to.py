"""round_to: kept widths at multiples of 8/16/64 for the traced CNN engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import modelfold
from modelfold.checks import kept_width
from modelfold.errors import InvalidRatioError
from tests.nets import VGGish, randomize_bn


def test_kept_width_is_a_multiple_never_above_n() -> None:
    for n in range(1, 300, 7):
        for ratio in (0.0, 0.05, 0.3, 0.5, 0.9):
            plain = kept_width(n, ratio)
            for r in (8, 16, 64):
                k = kept_width(n, ratio, r)
                assert 1 <= k <= n
                assert k == n or k % r == 0
                if ratio == 0.0 or n <= r:
                    assert k == n  # identity at ratio 0; groups narrower than r stay whole
                elif k != n:
                    assert abs(k - plain) <= r / 2 or k == r  # at least one multiple
    assert kept_width(100, 0.3, None) == kept_width(100, 0.3, 1) == 70
    assert kept_width(100, 0.3, 8) == 72 and kept_width(100, 0.3, 64) == 64


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)][:-1]  # last layer: the classes


@pytest.mark.parametrize("method", ["fold", "prune"])
def test_cnn_widths_are_multiples(method: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(VGGish(w=16).eval())  # widths 16, 32, 64
    x = torch.randn(2, 3, 16, 16)
    fn = modelfold.fold if method == "fold" else modelfold.prune
    out = fn(model, x, ratio=0.3, round_to=8)
    assert _widths(out) == [8, 24, 48]  # 11 -> 8, 22 -> 24, 45 -> 48
    assert out(x).shape == model(x).shape
    plain = fn(model, x, ratio=0.3)
    assert _widths(plain) == [11, 22, 45]


def test_cnn_sparsity_with_round_to_reaches_the_target() -> None:
    torch.manual_seed(0)
    model = randomize_bn(VGGish(w=16).eval())
    x = torch.randn(2, 3, 16, 16)
    out, report = modelfold.fold(model, x, sparsity=0.4, round_to=8, return_report=True)
    assert all(w % 8 == 0 for w in _widths(out))
    total = sum(p.numel() for p in model.parameters())
    assert 1 - sum(p.numel() for p in out.parameters()) / total >= 0.4


@pytest.mark.parametrize("bad", [0, -8, 2.5, True])
def test_bad_round_to_is_refused(bad) -> None:
    with pytest.raises(InvalidRatioError, match="round_to"):
        modelfold.fold(VGGish(w=8).eval(), torch.randn(1, 3, 16, 16), ratio=0.3, round_to=bad)

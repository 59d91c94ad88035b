"""Property tests over randomly generated small architectures (widths, depths, residuals, concats)."""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nets import double, randomize_bn

import modelfold


class RandomNet(nn.Module):
    """conv-BN-ReLU stages; each stage optionally residual (two convs) or a concat of two branches."""

    def __init__(self, widths: list[int], kinds: list[str], scale: int = 1):
        super().__init__()
        self.kinds = kinds
        self.stages = nn.ModuleList()
        c_in = 3
        for w, kind in zip(widths, kinds, strict=True):
            w = w * scale
            if kind == "residual":
                stage = nn.ModuleDict({
                    "proj": nn.Sequential(nn.Conv2d(c_in, w, 1), nn.BatchNorm2d(w)),
                    "body": nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                                          nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w))})
            elif kind == "concat":
                stage = nn.ModuleDict({"left": nn.Conv2d(c_in, w, 3, padding=1), "right": nn.Conv2d(c_in, w, 1)})
                w = 2 * w
            else:
                stage = nn.ModuleDict({"body": nn.Sequential(nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w))})
            self.stages.append(stage)
            c_in = w
        self.head = nn.Linear(c_in, 3)

    def forward(self, x):
        for kind, s in zip(self.kinds, self.stages, strict=True):
            if kind == "residual":
                p = s["proj"](x)
                x = torch.relu(p + s["body"](p))
            elif kind == "concat":
                x = torch.relu(torch.cat([s["left"](x), s["right"](x)], 1))
            else:
                x = torch.relu(s["body"](x))
        return self.head(x.mean((2, 3)))


arch = st.integers(1, 3).flatmap(lambda d: st.tuples(
    st.lists(st.integers(1, 4), min_size=d, max_size=d),
    st.lists(st.sampled_from(["plain", "residual", "concat"]), min_size=d, max_size=d),
    st.integers(0, 1000)))


def _double_concat_aware(small: RandomNet, big: RandomNet) -> RandomNet:
    """Duplicate channels; the space after a concat is [l, l', r, r'] in the big net."""
    overrides = {}
    c_prev = 3
    for i, (kind, s) in enumerate(zip(small.kinds, small.stages, strict=True)):
        if i > 0 and small.kinds[i - 1] == "concat":
            half = c_prev // 2

            def cols(t, half=half):
                a, b = t[:, :half] / 2, t[:, half:] / 2
                t = torch.cat([a, a, b, b], 1)
                return torch.cat([t, t], 0)

            first = {"residual": "proj.0", "concat": None, "plain": "body.0"}[kind]
            for name in ([f"stages.{i}.{first}.weight"] if first else
                         [f"stages.{i}.left.weight", f"stages.{i}.right.weight"]):
                overrides[name] = cols
        c_prev = sum(m.out_channels for m in s.values() if isinstance(m, nn.Conv2d)) if kind == "concat" \
            else [m for m in s.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    if small.kinds[-1] == "concat":
        half = c_prev // 2

        def head_cols(t, half=half):
            a, b = t[:, :half] / 2, t[:, half:] / 2
            return torch.cat([a, a, b, b], 1)

        overrides["head.weight"] = head_cols
    return double(small, big, overrides)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch)
def test_random_duplicated_architectures_fold_back(spec) -> None:
    widths, kinds, seed = spec
    torch.manual_seed(seed)
    small = randomize_bn(RandomNet(widths, kinds), seed).eval()
    big = _double_concat_aware(small, RandomNet(widths, kinds, scale=2)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = small(x)
        assert (big(x) - ref).abs().max() < 1e-5
        folded = modelfold.fold(big, x, ratio=0.5, seed=seed)
        assert (folded(x) - ref).abs().max() < 1e-4
        same = modelfold.fold(big, x, ratio=0.0)
        assert torch.equal(same(x), big(x))

"""SP-L1/SP-L2 cross-checked against Torch-Pruning: same groups, same scores, same model.

Torch-Pruning's dependency graph visits the groups; each is scored on the weights left by the
groups pruned before it (as modelfold's engine does) by the p-norm of its producer rows, and
the n - round(n(1 - ratio)) lowest-scoring channels are removed. modelfold.prune must give a
model with bit-identical outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from nets import ResNetish, VGGish, randomize_bn

import modelfold


def _producer_norm(group, p: int) -> torch.Tensor:
    total = None
    for dep, idxs in group:
        if dep.handler not in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
            continue
        mod = dep.target.module
        s = mod.weight.detach()[idxs].flatten(1).abs().pow(p).sum(1)
        if mod.bias is not None:
            s = s + mod.bias.detach()[idxs].abs().pow(p)
        total = s if total is None else total + s
    return total.pow(1.0 / p)


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float, p: int) -> nn.Module:
    m = copy.deepcopy(model)
    last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    with torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=x)
        for g in dg.get_all_groups(ignored_layers=[last], root_module_types=[nn.Conv2d, nn.Linear]):
            n = len(g[0].idxs)
            k = max(1, round(n * (1 - ratio)))
            score = _producer_norm(g, p)
            g.prune(idxs=torch.argsort(score, stable=True)[: n - k].tolist())
    return m.eval()


@pytest.mark.parametrize("make", [ResNetish, VGGish])
@pytest.mark.parametrize("norm", [1, 2])
def test_sp_matches_torch_pruning_group_by_group(make, norm):
    torch.manual_seed(0)
    model = randomize_bn(make(12), 2).eval()
    x = torch.randn(4, 3, 16, 16)
    ours = modelfold.prune(model, x[:1], ratio=0.4, norm=norm)
    theirs = tp_prune(model, x[:1], 0.4, norm)
    assert sum(q.numel() for q in ours.parameters()) == sum(q.numel() for q in theirs.parameters())
    assert sum(q.numel() for q in ours.parameters()) < sum(q.numel() for q in model.parameters())
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))

"""Fold-R: BN statistics on data; REPAIR per-channel correction where there is no BN."""

from __future__ import annotations

import copy

import pytest
import torch
from nets import MLP
from repair_helpers import TinyCNN, accuracy, tiny_task, train

import modelfold
from modelfold.merge import representatives
from modelfold.traced.engine import compress
from modelfold.traced.planners import kmeans_planner
from modelfold.traced.repair import RepairError, make_repair
from modelfold.traced.repair.data import channel_stats


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return train(TinyCNN(16))


def test_fold_r_recovers_corrupted_bn_statistics(trained):
    x, y = tiny_task(1000, seed=7)
    base = accuracy(trained, x, y)
    bad = copy.deepcopy(trained)
    g = torch.Generator().manual_seed(0)
    for m in bad.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean += 3 * torch.randn(m.num_features, generator=g)
            m.running_var *= 0.05 + 5 * torch.rand(m.num_features, generator=g)
    assert accuracy(bad, x, y) < base - 0.2  # the corruption matters
    data, _ = tiny_task(512, seed=3)
    naive = modelfold.fold(bad, x[:1], ratio=0.25, repair="none")
    fixed = modelfold.fold(bad, x[:1], ratio=0.25, repair="data", data=data)
    assert accuracy(naive, x, y) < base - 0.2
    assert accuracy(fixed, x, y) > base - 0.05


def test_fold_r_accepts_a_dataloader(trained):
    x, y = tiny_task(256, seed=5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    a = modelfold.fold(trained, x[:1], ratio=0.25, repair="data", data=loader)
    b = modelfold.fold(trained, x[:1], ratio=0.25, repair="data", data=x)
    assert torch.allclose(a(x[:8]), b(x[:8]), rtol=1e-3, atol=2e-3)  # batch split changes BN averages


def test_repair_without_bn_moves_channel_stats_to_targets():
    torch.manual_seed(0)
    model = MLP(32, d_in=12, d_out=5).eval()
    data = torch.randn(512, 12)
    fixer = make_repair("data", model=model, example_inputs=data[:1], data=data)
    work = copy.deepcopy(model)
    compress(work, data[:1], 0.5, fixer.wrap(kmeans_planner(0)))
    naive = copy.deepcopy(work)
    repaired = fixer.after(work)
    assert sorted(fixer.summary["repair_corrected"]) == ["net.0", "net.2"]
    ref = channel_stats(model, ["net.0"], [data])["net.0"]
    fg = next(g for g in fixer.log.groups if g.cg.root == "net.0")
    order = torch.argsort(representatives(fg.labels, fg.k))
    tgt = [torch.stack([s[fg.labels == c].mean() for c in range(fg.k)])[order] for s in ref]
    got = channel_stats(repaired, ["net.0"], [data])["net.0"]
    before = channel_stats(naive, ["net.0"], [data])["net.0"]
    for t, a in zip(tgt, got, strict=True):
        assert (a - t).abs().max() < 1e-4  # repaired mean and std hit the targets
    # a merged linear output's mean is already the members' mean; its std collapsed
    assert (before[0] - tgt[0]).abs().max() < 1e-4
    assert (before[1] < tgt[1] - 1e-3).float().mean() > 0.5
    # deeper layer: corrected on its (already corrected) inputs
    x = torch.randn(64, 12)
    assert not torch.allclose(repaired(x), naive(x))


def test_repair_data_errors(trained):
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(RepairError, match="needs data="):
        modelfold.fold(trained, x, ratio=0.5, repair="data")
    with pytest.raises(modelfold.errors.ModelFoldError, match="unknown repair|must be one of"):
        modelfold.fold(trained, x, ratio=0.5, repair="magic")
    with pytest.raises(RepairError, match="unknown repair"):
        make_repair("magic")
    with pytest.raises(RepairError, match="empty"):
        modelfold.fold(trained, x, ratio=0.5, repair="data", data=torch.empty(0, 1, 8, 8))
    with pytest.raises(RepairError, match="ar_rho"):
        modelfold.fold(trained, x, ratio=0.5, repair="ar", repair_kwargs={"ar_rho": "bogus"})
    with pytest.raises(RepairError, match="unknown options"):
        modelfold.fold(trained, x, ratio=0.5, repair="ar", data=x)

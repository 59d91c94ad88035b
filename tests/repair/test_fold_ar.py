"""Fold-AR: BN absorption, ρ̄-scaled γ, exactness on duplicates, documented fallback without BN."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from nets import MLP, CatNet, ResNetish, VGGish, double, randomize_bn

import modelfold
from modelfold.engine import Plan, compress
from modelfold.merge import representatives
from modelfold.policies import kmeans_planner
from modelfold.repair import make_repair
from modelfold.repair.ar import ar_scale, cluster_rho
from modelfold.repair.stats import PlanLog, reset_bn_stats
from modelfold.report import count_params


def test_cluster_rho_matches_pairwise_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    rho = cluster_rho([x], labels, 3)
    u = torch.nn.functional.normalize(x.double(), dim=1)
    for c in range(3):
        idx = (labels == c).nonzero().flatten()
        cos = [float(u[i] @ u[j]) for i in idx for j in idx if i != j]
        assert rho[c].item() == pytest.approx(sum(cos) / len(cos), abs=1e-9)


def test_ar_scale_formula():
    labels = torch.tensor([0, 0, 0, 0, 1])
    s = ar_scale(torch.tensor([0.0, 1.0], dtype=torch.float64), labels, 2)
    assert s[0].item() == pytest.approx(2.0)  # uncorrelated members: sqrt(4 / 1)
    assert s[1].item() == pytest.approx(1.0)  # singleton
    s = ar_scale(torch.tensor([1.0]), torch.tensor([0, 0, 0]), 1)
    assert s.item() == pytest.approx(1.0)  # identical members: no change


def test_absorption_keeps_function_and_standardizes():
    model = randomize_bn(ResNetish(6), 3).eval()
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    fixer = make_repair("ar", model=model, example_inputs=x[:1])
    work = fixer.before(copy.deepcopy(model))
    assert len(fixer.absorbed) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for name in fixer.absorbed:
        bn = work.get_submodule(name)
        assert torch.all(bn.running_mean == 0)
        assert torch.allclose(bn.running_var + bn.eps, torch.ones_like(bn.running_var))
    assert torch.allclose(work(x), ref, atol=1e-5)


@pytest.mark.parametrize("make", [ResNetish, VGGish])
def test_fold_ar_exact_on_duplicated_network(make):
    small = randomize_bn(make(4), 1).eval()
    big = double(small, make(8)).eval()
    x = torch.randn(5, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VGGish's classifier has no BN (documented fallback)
        folded = modelfold.fold(big, x[:1], ratio=0.5, repair="ar", seed=0)
    assert count_params(folded) == count_params(small)  # created biases moved back into BN
    assert torch.allclose(folded(x), small(x), atol=1e-4)


def _bn_out_std(model, name, x):
    out = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["y"].transpose(0, 1).flatten(1).std(1)


def test_fold_ar_restores_variance_of_merged_channels():
    """On iid inputs the stem's pre-activation correlation is the cosine of its filters, so AR's
    merged channels must get (close to) the members' average std back; naive merging shrinks it."""
    torch.manual_seed(0)
    model = VGGish(16).eval()
    calib = torch.randn(256, 3, 16, 16)
    reset_bn_stats(model, [calib])
    fixer = make_repair("ar", model=model, example_inputs=calib[:1])
    log = PlanLog()
    work = fixer.before(copy.deepcopy(model))
    compress(work, calib[:1], 0.5, fixer.wrap(log.wrap(kmeans_planner(0))))
    ar = fixer.after(work).eval()
    labels = iter([g.labels for g in log.groups])
    naive = copy.deepcopy(model)
    compress(naive, calib[:1], 0.5, lambda cg, f, k: Plan(k, labels=next(labels)))
    stem = next(g for g in log.groups if g.cg.root == "features.0")
    x = torch.randn(256, 3, 16, 16)
    assert stem.labels.unique().numel() < stem.labels.numel()
    std_o = _bn_out_std(model, "features.1", x)
    target = torch.stack([std_o[stem.labels == c].mean() for c in range(stem.k)])
    order = torch.argsort(representatives(stem.labels, stem.k))  # folded channel order
    err_ar = (_bn_out_std(ar, "features.1", x) - target[order]).abs().mean()
    err_naive = (_bn_out_std(naive, "features.1", x) - target[order]).abs().mean()
    assert err_ar < 0.5 * err_naive, (err_ar, err_naive)


def test_fold_ar_without_bn_is_naive_and_says_so():
    model = MLP(16).eval()
    x = torch.randn(3, 12)
    with pytest.warns(UserWarning, match="without correction.*no BatchNorm"):
        ar = modelfold.fold(model, x[:1], ratio=0.5, repair="ar", seed=0)
    naive = modelfold.fold(model, x[:1], ratio=0.5, repair="none", seed=0)
    assert torch.equal(ar(x), naive(x))


def test_fold_ar_bn_not_behind_conv_falls_back():
    model = randomize_bn(CatNet(6)).eval()
    x = torch.randn(2, 3, 8, 8)
    fixer = make_repair("ar", model=model, example_inputs=x[:1])
    work = fixer.before(copy.deepcopy(model))
    assert "bn" not in fixer.absorbed and "a.1" in fixer.absorbed
    assert torch.allclose(work(x), model(x), atol=1e-5)
    with pytest.warns(UserWarning, match="not directly behind a conv"):
        modelfold.fold(model, x[:1], ratio=0.5, repair="ar")


def test_fold_ar_rows_option_for_bn_free_groups():
    """ar_no_bn="rows" scales merged producer rows of BN-free groups; exact on duplicates (ρ̄ = 1)."""
    small = MLP(6).eval()
    big = double(small, MLP(12)).eval()
    x = torch.randn(4, 12)
    out = modelfold.fold(big, x[:1], ratio=0.5, repair="ar", repair_kwargs={"ar_no_bn": "rows"})
    assert torch.allclose(out(x), small(x), atol=1e-4)
    model = MLP(16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "without correction" warning in rows mode
        rows = modelfold.fold(model, x[:1], ratio=0.5, repair="ar", repair_kwargs={"ar_no_bn": "rows"})
    naive = modelfold.fold(model, x[:1], ratio=0.5, seed=0)
    w_rows, w_naive = rows.net[0].weight.norm(dim=1), naive.net[0].weight.norm(dim=1)
    assert torch.all(w_rows >= w_naive - 1e-6) and torch.any(w_rows > w_naive * 1.05)
    assert torch.equal(rows.net[0].bias, naive.net[0].bias)


def _ar_fold(model, calib, rho):
    fixer = make_repair("ar", model=model, example_inputs=calib[:1], ar_rho=rho)
    log = PlanLog()
    work = fixer.before(copy.deepcopy(model))
    compress(work, calib[:1], 0.5, fixer.wrap(log.wrap(kmeans_planner(0))))
    return fixer.after(work).eval(), log


def test_fold_ar_bn_mode_gives_each_producer_its_own_factor():
    """In a residual group (stem + blocks' last convs) ar_rho="bn" scales each BN by its own conv's
    ρ̄. The stem sees iid inputs, where filter cosine = activation correlation, so its merged
    channels must get the members' std back better than with the group-averaged factor."""
    torch.manual_seed(0)
    model = ResNetish(16).eval()
    calib = torch.randn(256, 3, 16, 16)
    reset_bn_stats(model, [calib])
    by_bn, log = _ar_fold(model, calib, "bn")
    grouped, _ = _ar_fold(model, calib, "producer")
    res = next(g for g in log.groups if any(s.module == "stem.1" for s in g.cg.slices))
    assert any(s.module == "layers.0.bn2" for s in res.cg.slices)  # really a residual group
    x = torch.randn(256, 3, 16, 16)
    std_o = _bn_out_std(model, "stem.1", x)
    target = torch.stack([std_o[res.labels == c].mean() for c in range(res.k)])
    order = torch.argsort(representatives(res.labels, res.k))
    err_bn = (_bn_out_std(by_bn, "stem.1", x) - target[order]).abs().mean()
    err_grouped = (_bn_out_std(grouped, "stem.1", x) - target[order]).abs().mean()
    assert err_bn < err_grouped, (err_bn, err_grouped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = randomize_bn(ResNetish(4), 1).eval()
        big = double(small, ResNetish(8)).eval()
        out = modelfold.fold(big, x[:1], ratio=0.5, repair="ar", repair_kwargs={"ar_rho": "bn"})
    assert torch.allclose(out(x[:5]), small(x[:5]), atol=1e-4)

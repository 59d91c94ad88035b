"""Fold-AR: BN absorption, ρ̄-scaled γ, exactness on duplicates, documented fallback without BN."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from nets import MLP, CatNet, ResNetish, VGGish, double, randomize_bn

import modelfold
from modelfold.merge import representatives
from modelfold.report import count_params
from modelfold.traced.engine import Plan, compress
from modelfold.traced.planners import kmeans_planner
from modelfold.traced.repair import make_repair
from modelfold.traced.repair.ar import ar_scale, cluster_rho, pool_spatial, spatial_taps
from modelfold.traced.repair.stats import PlanLog, reset_bn_stats


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


@pytest.mark.parametrize("rho", ["pooled", "producer", "all", "bn"])
@pytest.mark.parametrize("make", [ResNetish, VGGish])
def test_fold_ar_exact_on_duplicated_network(make, rho):
    small = randomize_bn(make(4), 1).eval()
    big = double(small, make(8)).eval()
    x = torch.randn(5, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VGGish's classifier has no BN (documented fallback)
        folded = modelfold.fold(big, x[:1], ratio=0.5, repair="ar", seed=0, repair_kwargs={"ar_rho": rho})
    assert count_params(folded) == count_params(small)  # created biases moved back into BN
    assert torch.allclose(folded(x), small(x), atol=1e-4)


def _bn_out_std(model, name, x, crop=0):
    out = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    with torch.no_grad():
        model(x)
    h.remove()
    y = out["y"]
    if crop:
        y = y[..., crop:-crop, crop:-crop]
    return y.transpose(0, 1).flatten(1).std(1)


def _stem_std_errors(make_inputs, modes, crop=0):
    """Mean |std(merged stem channel) - mean std of its members| for each ρ̄ mode, and for naive."""
    torch.manual_seed(0)
    model = VGGish(16).eval()
    calib = make_inputs(256)
    reset_bn_stats(model, [calib])
    x = make_inputs(256)
    std_o = _bn_out_std(model, "features.1", x, crop)
    errs = {}
    for mode in modes:
        fixer = make_repair("ar", model=model, example_inputs=calib[:1], ar_rho=mode)
        log = PlanLog()
        work = fixer.before(copy.deepcopy(model))
        compress(work, calib[:1], 0.5, fixer.wrap(log.wrap(kmeans_planner(0))))
        ar = fixer.after(work).eval()
        stem = next(g for g in log.groups if g.cg.root == "features.0")
        assert stem.labels.unique().numel() < stem.labels.numel()
        target = torch.stack([std_o[stem.labels == c].mean() for c in range(stem.k)])
        order = torch.argsort(representatives(stem.labels, stem.k))  # folded channel order
        errs[mode] = float((_bn_out_std(ar, "features.1", x, crop) - target[order]).abs().mean())
    labels = iter([g.labels for g in log.groups])
    naive = copy.deepcopy(model)
    compress(naive, calib[:1], 0.5, lambda cg, f, k: Plan(k, labels=next(labels)))
    errs["naive"] = float((_bn_out_std(naive, "features.1", x, crop) - target[order]).abs().mean())
    return errs


def test_fold_ar_restores_variance_of_merged_channels():
    """On iid pixels the stem's pre-activation correlation is the cosine of its full filters, so
    AR with ρ̄ from producer rows must give merged channels (close to) the members' average std
    back; naive merging shrinks it, and pooling the taps (which assumes smooth inputs) over-estimates ρ̄."""
    errs = _stem_std_errors(lambda n: torch.randn(n, 3, 16, 16), ("producer", "pooled"))
    assert errs["producer"] < 0.5 * errs["naive"], errs
    assert errs["producer"] < errs["pooled"], errs


def test_fold_ar_pooled_rho_exact_for_spatially_smooth_inputs():
    """If every input channel is constant across the kernel window, a channel's output is the
    pooled (tap-summed) filter times the input, so ρ̄ from pooled rows restores the members' std
    (interior pixels, away from the zero padding) far better than ρ̄ from the full rows. (Not
    exactly: BN statistics also cover the border pixels.)"""
    errs = _stem_std_errors(lambda n: torch.randn(n, 3, 1, 1).expand(n, 3, 16, 16).contiguous(),
                            ("pooled", "producer"), crop=1)
    assert errs["pooled"] < 0.5 * errs["naive"], errs
    assert errs["pooled"] < 0.6 * errs["producer"], errs


def test_pooled_rho_equals_output_correlation_for_smooth_inputs():
    """Oracle for the "pooled" estimate: iid channels, constant across the window -> the mean
    pairwise correlation of a cluster's outputs is the mean cosine of the tap-summed filters."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 12, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(12, 6, 3, 3, generator=g) + 0.7)  # correlated filters
    x = torch.randn(20000, 6, 1, 1, generator=g).expand(-1, -1, 3, 3)
    with torch.no_grad():
        y = conv(x).flatten(1).T  # (12, samples)
    corr = torch.corrcoef(y.double())
    labels = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
    rows = conv.weight.detach().flatten(1)
    pooled = cluster_rho([pool_spatial(rows, spatial_taps(conv))], labels, 3)
    full = cluster_rho([rows], labels, 3)
    for c in range(3):
        idx = (labels == c).nonzero().flatten()
        sub = corr[idx][:, idx]
        data = float((sub.sum() - len(idx)) / (len(idx) * (len(idx) - 1)))
        assert pooled[c].item() == pytest.approx(data, abs=0.02)
        assert abs(full[c].item() - data) > 0.05  # the full rows' cosine is a different quantity


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

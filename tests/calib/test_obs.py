"""Greedy structured OBS selection: exact first choice, duplicates, heads, bias protection."""

from __future__ import annotations

import itertools

import torch

from modelfold.calib.compensate import output_error, ridge_refit
from modelfold.calib.obs import obs_rank


def _data(n: int = 8, d: int = 5, samples: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(samples, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return h, torch.randn(d, n, generator=g, dtype=torch.float64)


def _refit_error(w: torch.Tensor, gram: torch.Tensor, keep: list[int]) -> float:
    k = torch.tensor(keep)
    new_w, _ = ridge_refit(w, gram[k][:, k], gram[k], lam=0.0)
    return output_error(w, gram, new_w, gram[k][:, k], gram[k])


def test_first_removal_is_the_exact_best_single_removal():
    h, w = _data()
    gram = h.T @ h
    rank = obs_rank(w, gram, lam=0.0, steps=8)
    errs = [_refit_error(w, gram, [j for j in range(8) if j != i]) for i in range(8)]
    assert int(torch.argmin(rank)) == min(range(8), key=errs.__getitem__)


def test_greedy_pair_is_near_the_brute_force_optimum_and_beats_activation_norm():
    h, w = _data(n=10, seed=3)
    gram = h.T @ h
    rank = obs_rank(w, gram, lam=0.0, steps=10)
    keep = sorted(torch.topk(rank, 6).indices.tolist())
    best = min(_refit_error(w, gram, list(c)) for c in itertools.combinations(range(10), 6))
    act = (h.pow(2).sum(0).sqrt() * w.norm(dim=0))
    by_act = sorted(torch.topk(act, 6).indices.tolist())
    got = _refit_error(w, gram, keep)
    assert got <= 1.5 * best + 1e-9
    assert got <= _refit_error(w, gram, by_act) + 1e-9


def test_duplicated_features_go_first_and_cost_nothing():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300, 4, generator=g, dtype=torch.float64)
    h = torch.cat([base, base], 1)  # features 4..7 copy 0..3
    w = torch.randn(3, 8, generator=g, dtype=torch.float64)
    gram = h.T @ h
    rank = obs_rank(w, gram, lam=1e-9, steps=8, n_remove=4)
    keep = sorted(torch.topk(rank, 4).indices.tolist())
    assert sorted(j % 4 for j in keep) == [0, 1, 2, 3]  # one of each pair
    assert _refit_error(w, gram + 1e-9 * torch.eye(8, dtype=torch.float64), keep) < 1e-6 * float((w @ gram * w).sum())


def test_heads_are_removed_as_blocks():
    h, w = _data(n=8, seed=2)
    gram = h.T @ h
    rank = obs_rank(w, gram, lam=0.0, width=2, steps=4)
    assert rank.shape == (4,)
    errs = [_refit_error(w, gram, [j for j in range(8) if j // 2 != u]) for u in range(4)]
    assert int(torch.argmin(rank)) == min(range(4), key=errs.__getitem__)


def test_protected_bias_feature_is_never_ranked_and_shapes_are_checked():
    h, w = _data(n=6)
    hb = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
    wb = torch.cat([w, torch.randn(w.shape[0], 1, dtype=w.dtype)], 1)
    assert obs_rank(wb, hb.T @ hb, protect=1).shape == (6,)
    try:
        obs_rank(w, hb.T @ hb)
    except ValueError as e:
        assert "do not fit" in str(e)
    else:
        raise AssertionError("mismatched weight and Gram matrix accepted")

"""The AR repair for MLP folds: factor formula and its effect on merged rows."""

from __future__ import annotations

import pytest
import torch
from hf_models import make_model

import modelfold
from modelfold.hf.adapters import find_adapter
from modelfold.merge import ar_scale, cluster_rho


def test_ar_scale_formula():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [2.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 2])
    s = ar_scale(cluster_rho([rows], labels, 3), labels, 3)
    # cluster 0: orthogonal rows (rho=0) -> sqrt(2); singletons -> 1
    assert torch.allclose(s, torch.tensor([2 ** 0.5, 1.0, 1.0], dtype=s.dtype))
    rows, labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 0])
    s = ar_scale(cluster_rho([rows], labels, 1), labels, 1)
    rho = 2 ** -0.5
    assert torch.allclose(s, torch.tensor([(2 / (1 + rho)) ** 0.5], dtype=s.dtype))


def test_ar_restores_row_norm_and_leaves_exact_duplicates():
    m = make_model("llama")
    f0 = modelfold.fold(m, ratio=0.5, seed=1)
    with pytest.warns(UserWarning, match="SwiGLU"):
        f1 = modelfold.fold(m, ratio=0.5, seed=1, repair="ar")
    a = find_adapter(m)
    g_orig = a.mlp(m, 0).producers[0]
    n_orig = getattr(*g_orig).weight.norm(dim=1).mean()
    n0 = getattr(*a.mlp(f0, 0).producers[0]).weight.norm(dim=1).mean()
    n1 = getattr(*a.mlp(f1, 0).producers[0]).weight.norm(dim=1).mean()
    assert n0 < n1  # averaging shrank the rows, AR grew them back
    assert abs(n1 - n_orig) < abs(n0 - n_orig)
    # down projections are identical (AR only rescales producer rows)
    assert torch.equal(getattr(*a.mlp(f0, 0).consumer).weight, getattr(*a.mlp(f1, 0).consumer).weight)

"""Neuron Merging: exact on positively scaled duplicates behind a ReLU; threshold respected."""

import torch

import modelfold
from modelfold.traced.baselines.neuron_merging import merge_columns, plan_merge


def _scaled_duplicates(seed=0, n=6, d=5, e=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d + 1, generator=g)
    w = w / w.norm(dim=1, keepdim=True) * (1 + 0.1 * torch.rand(n, 1, generator=g))  # norms in [1, 1.1]
    w, b = w[:, :d], w[:, d]
    s = 0.3 + 0.3 * torch.rand(n, generator=g)  # positive scales < 1: magnitude keeps the originals
    w2 = torch.cat([w, w * s[:, None]])
    b2 = torch.cat([b, b * s])
    z = torch.randn(e, 2 * n, generator=g)
    return w2, b2, z


def test_pure_function_exact_on_scaled_duplicates():
    w, b, z = _scaled_duplicates()
    x = torch.randn(100, w.shape[1])
    ref = torch.relu(x @ w.T + b) @ z.T
    rows = torch.cat([w, b[:, None]], 1)
    plan = plan_merge(rows, 6, threshold=0.9)
    assert plan.src.numel() == 6 and bool((plan.similarity > 0.999).all())
    out = torch.relu(x @ w[plan.keep].T + b[plan.keep]) @ merge_columns(z, plan, dim=1).T
    assert torch.allclose(out, ref, atol=1e-5)


def test_dissimilar_neurons_are_only_pruned():
    g = torch.Generator().manual_seed(1)
    rows = torch.eye(6) * torch.arange(1, 7)[:, None]  # orthogonal rows: cosine 0
    plan = plan_merge(rows, 3, threshold=0.1)
    assert plan.keep.tolist() == [3, 4, 5] and plan.src.numel() == 0
    z = torch.randn(2, 6, generator=g)
    assert torch.equal(merge_columns(z, plan, 1), z[:, 3:])


def test_engine_neuron_merging_exact_on_scaled_duplicates():
    w, b, z = _scaled_duplicates(2, n=8, d=6, e=3)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    with torch.no_grad():
        net[0].weight.copy_(w)
        net[0].bias.copy_(b)
        net[2].weight.copy_(z)
    x = torch.randn(64, 6)
    merged = modelfold.prune(net, x[:1], 0.5, merge="neuron")
    pruned = modelfold.prune(net, x[:1], 0.5)
    with torch.no_grad():
        assert torch.allclose(merged(x), net(x), atol=1e-5)
        assert not torch.allclose(pruned(x), net(x), atol=1e-2)

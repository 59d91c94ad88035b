import pytest
import torch

from modelfold.cluster import inertia, kmeans, project


def test_finds_exact_duplicates() -> None:
    base = torch.randn(10, 7)
    x = torch.cat([base, base, base])[torch.randperm(30)]
    res = kmeans(x, 10, seed=1)
    assert res.relative_error < 1e-6
    for c in range(10):
        members = x[res.labels == c]
        assert len(members) == 3 and torch.allclose(members, members[0].expand_as(members))


def test_no_empty_clusters_and_deterministic() -> None:
    x = torch.randn(200, 5)
    x[:150] = 0.0  # many identical points make empty clusters likely in Lloyd steps
    a, b = kmeans(x, 60, seed=3), kmeans(x, 60, seed=3)
    assert torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels, minlength=60).min() >= 1


def test_full_space_moves_never_increase_inertia() -> None:
    import modelfold.cluster as cl

    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    g = cl._grid(x)
    g_sq = (g * g).sum(1)
    start = torch.arange(300) % 20  # a poor labelling: many improving moves
    moved, rounds = cl._hartigan(g, g_sq, start, None, 20)
    assert rounds > 1 and inertia(x, moved, 20) < 0.9 * inertia(x, start, 20)
    lloyd, _ = cl._lloyd(g, g_sq, None, g[:20], 20, 50)
    refined, _ = cl._hartigan(g, g_sq, lloyd, None, 20)
    assert inertia(x, refined, 20) <= inertia(x, lloyd, 20) + 1e-9
    res = kmeans(x, 20, seed=0, n_init=5)
    assert abs(inertia(x, res.labels, 20) - res.inertia) < 1e-9 * res.inertia


def test_edge_k_values() -> None:
    x = torch.randn(9, 3)
    assert torch.equal(kmeans(x, 9).labels, torch.arange(9))
    assert kmeans(x, 1).labels.unique().tolist() == [0]
    with pytest.raises(ValueError):
        kmeans(x, 0)
    with pytest.raises(ValueError):
        kmeans(torch.full((4, 2), float("nan")), 2)


def test_projection_keeps_duplicates_and_top_components() -> None:
    torch.manual_seed(0)
    low = torch.randn(64, 5) @ torch.randn(5, 400)  # rank 5
    x = torch.cat([low, low[:8]])
    p = project(x, 16)
    assert p.shape == (72, 16)
    assert torch.allclose(p[64:], p[:8], atol=1e-4)
    xc = x - x.mean(0)
    d_full, d_proj = torch.cdist(xc, xc), torch.cdist(p, p)
    assert (d_full - d_proj).abs().max() < 1e-2 * d_full.max()


def test_blocked_assignment_gives_the_same_clustering(monkeypatch):
    import modelfold.cluster as cl

    g = torch.Generator().manual_seed(3)
    centers = torch.randn(60, 40, generator=g) * 5
    x = centers.repeat(5, 1) + 0.05 * torch.randn(300, 40, generator=g)
    full = cl.kmeans(x, 60, seed=1)
    monkeypatch.setattr(cl, "ASSIGN_BLOCK", 7 * 60)  # 7 rows per block: many blocks, a ragged last one
    blocked = cl.kmeans(x, 60, seed=1)
    assert torch.equal(full.labels, blocked.labels)
    assert blocked.inertia == pytest.approx(full.inertia, rel=1e-9)
    labels, own = cl._assign(x, (x * x).sum(1), x[:60])
    assert labels.shape == own.shape == (300, 1) and bool((own >= 0).all())


@pytest.mark.parametrize("block", [None, 100])
def test_candidate_moves_with_every_cluster_equal_the_dense_moves(monkeypatch, block) -> None:
    """The candidate refinement updates only the (row, cluster) pairs whose cluster changed; given every
    cluster as a candidate it must take exactly the dense refinement's moves, at less than a full
    product per round."""
    import modelfold.cluster as cl

    x = torch.randn(240, 30, generator=torch.Generator().manual_seed(4))
    g = cl._grid(x)
    g_sq = (g * g).sum(1)
    start = torch.arange(240) % 60
    dense, r_dense = cl._hartigan(g, g_sq, start, None, 60)
    real = cl._sq_dists
    entries = []

    def spy(xs, xs_sq, c):
        entries.append(xs.shape[0] * c.shape[0])
        return real(xs, xs_sq, c)

    monkeypatch.setattr(cl, "_sq_dists", spy)
    if block:  # products in blocks of a few rows
        monkeypatch.setattr(cl, "ASSIGN_BLOCK", block)
    every = torch.arange(60).expand(240, 60).contiguous()
    cand, r_cand = cl._hartigan(g, g_sq, start, every, 60)
    assert r_dense > 2 and r_cand == r_dense and torch.equal(cand, dense)
    assert inertia(x, dense, 60) < inertia(x, start, 60)
    assert sum(entries) < (r_cand - 1) * 240 * 60

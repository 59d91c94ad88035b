import torch

from modelfold.merge import merge_tensor, position_table, representatives


def test_merge_matches_dense_assignment_matrix() -> None:
    n, k = 6, 3
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    w = torch.randn(n, 4)  # producer rows
    c = torch.zeros(n, k)
    c[torch.arange(n), labels] = 1
    mean = (c / c.sum(0)).T @ w  # cluster means
    table = torch.arange(n)[:, None]
    out = merge_tensor(w, 0, table, labels, k, "mean")
    rep = representatives(labels, k)
    assert rep.tolist() == [1, 3, 0]
    assert torch.allclose(out[rep], mean, atol=1e-6)
    v = torch.randn(5, n)  # consumer columns
    out = merge_tensor(v, 1, table, labels, k, "sum")
    assert torch.allclose(out[:, rep], v @ c, atol=1e-6)


def test_position_table_blocks() -> None:
    # channel c owns features 4c..4c+3 (flatten into a linear), listed out of order
    idxs = list(range(12))[::-1]
    root = [i // 4 for i in idxs]
    t = position_table(idxs, root, 3)
    assert t.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]

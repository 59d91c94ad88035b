import torch

from modelfold.calib.compensate import Gram, output_error, ridge_refit, with_ones


def _grams(h, h_new, ones=False):
    if ones:
        h, h_new = with_ones(h), with_ones(h_new)
    g, c = Gram(), Gram()
    g.add(h_new)
    c.add(h_new, h, block=7)  # several blocks
    return g.aa, c.ab


def test_gram_blocks_equal_full_product():
    torch.manual_seed(0)
    a, b = torch.randn(50, 4), torch.randn(50, 6)
    g = Gram()
    g.add(a[:20], b[:20], block=3)
    g.add(a[20:], b[20:], block=64)
    assert torch.allclose(g.ab, a.double().T @ b.double())
    assert g.n == 50


def test_refit_exact_on_duplicated_features():
    # h has 3 distinct features, each duplicated: keeping one copy and refitting loses nothing.
    torch.manual_seed(1)
    base = torch.randn(200, 3)
    h = torch.cat([base, base], 1)
    w = torch.randn(5, 6)
    keep = torch.tensor([0, 1, 2])
    g, c = _grams(h, h[:, keep])
    w2, _ = ridge_refit(w, g, c, lam=0.0)
    assert torch.allclose(h[:, keep] @ w2.T, h @ w.T, atol=1e-4)


def test_refit_never_worse_than_plain_selection():
    torch.manual_seed(2)
    h = torch.randn(300, 10) @ torch.randn(10, 10)
    w = torch.randn(4, 10)
    keep = torch.tensor([0, 3, 5, 7])
    g, c = _grams(h, h[:, keep])
    w2, _ = ridge_refit(w, g, c, lam=0.0)
    full = Gram()
    full.add(h)
    plain = output_error(w, full.aa, w[:, keep], g, c)
    fitted = output_error(w, full.aa, w2, g, c)
    direct = float(((h @ w.T - h[:, keep] @ w2.T).double() ** 2).sum())
    assert fitted <= plain
    assert abs(fitted - direct) <= 1e-6 * max(1.0, direct)


def test_bias_absorbs_mean_shift():
    torch.manual_seed(3)
    h = torch.randn(400, 6) + torch.tensor([0.0, 0.0, 0.0, 5.0, -3.0, 2.0])
    w, b = torch.randn(3, 6), torch.randn(3)
    keep = torch.tensor([0, 1, 2])
    g, c = _grams(h, h[:, keep], ones=True)
    w2, b2 = ridge_refit(w, g, c, lam=0.0, bias=b, fit_bias=True)
    err_fit = ((h @ w.T + b - (h[:, keep] @ w2.T + b2)) ** 2).mean()
    g0, c0 = _grams(h, h[:, keep])
    w3, b3 = ridge_refit(w, g0, c0, lam=0.0, bias=b)
    err_nobias = ((h @ w.T + b - (h[:, keep] @ w3.T + b3)) ** 2).mean()
    assert torch.equal(b3, b)
    assert err_fit < 0.5 * err_nobias

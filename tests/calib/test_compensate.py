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


def _held_out_case(rows: int, related: bool, seed: int = 0):
    """A consumer of 40 features keeping the first 30; the 10 removed ones are linear in the kept ones
    (``related``) or independent noise. Returns (weight, fit Grams, held-out Grams, prior, idx)."""
    gen = torch.Generator().manual_seed(seed)
    kept = torch.randn(rows, 30, generator=gen, dtype=torch.float64)
    gone = kept @ torch.randn(30, 10, generator=gen, dtype=torch.float64) if related else \
        torch.randn(rows, 10, generator=gen, dtype=torch.float64)
    h = torch.cat([kept, gone], 1)
    w = torch.randn(4, 40, generator=gen, dtype=torch.float64)
    idx = torch.arange(30)

    def grams(x):
        g = x.T @ x
        return g[idx][:, idx], g[idx]

    half = rows // 2
    return w, grams(h[:half]), grams(h[half:]), w[:, idx], idx, h[half:]


def _held_out_error(w, v, h, idx):
    return float(((h @ w.T - h[:, idx] @ v.T) ** 2).sum())


def test_choose_lam_refuses_a_refit_that_only_interpolates_the_fit_rows():
    """Fewer fit rows (20) than kept features (30) and removed features unrelated to the kept ones: any
    refit just interpolates the fit rows, so the held-out rows choose no refit (inf)."""
    from modelfold.calib.compensate import choose_lam

    w, fit, val, prior, idx, h_val = _held_out_case(40, related=False)
    lam = choose_lam(w, fit, val, prior)
    assert lam == float("inf")
    weak, _ = ridge_refit(w, *fit, lam=1e-3, prior=prior)
    assert _held_out_error(w, weak, h_val, idx) > _held_out_error(w, prior, h_val, idx)


def test_choose_lam_takes_the_refit_when_the_removed_features_are_predictable():
    from modelfold.calib.compensate import choose_lam

    w, fit, val, prior, idx, h_val = _held_out_case(400, related=True)
    lam = choose_lam(w, fit, val, prior)
    assert lam <= 1e-2
    chosen, _ = ridge_refit(w, *fit, lam=lam, prior=prior)
    assert _held_out_error(w, chosen, h_val, idx) < 1e-3 * _held_out_error(w, prior, h_val, idx)


def test_refit_towards_the_prior_never_increases_the_calibration_error():
    """With the evaluation rows as calibration, a refit pulled towards the plainly pruned consumer errs
    no more than that consumer, at every ridge (the objective at the prior is its error)."""
    torch.manual_seed(3)
    h = torch.randn(25, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    w = torch.randn(6, 40, dtype=torch.float64)
    idx = torch.randperm(40)[:28]
    g = h.T @ h
    plain = float(((h @ w.T - h[:, idx] @ w[:, idx].T) ** 2).sum())
    for lam in (0.0, 1e-3, 1e-1, 10.0, float("inf")):
        v, _ = ridge_refit(w, g[idx][:, idx], g[idx], lam=lam, prior=w[:, idx])
        assert float(((h @ w.T - h[:, idx] @ v.T) ** 2).sum()) <= plain * (1 + 1e-9)


def test_the_row_space_ridge_choice_and_refit_equal_the_gram_ones():
    """Fewer rows than kept features: choose_lam_rows / ridge_refit_rows (an N x N system) choose the same
    ridge and give the same consumer as choose_lam / ridge_refit on the Grams, at every ridge."""
    from modelfold.calib.compensate import choose_lam, choose_lam_rows, ridge_refit_rows

    chosen = set()
    for related in (False, True):
        gen = torch.Generator().manual_seed(4)
        kept = torch.randn(36, 30, generator=gen, dtype=torch.float64)
        gone = kept @ torch.randn(30, 10, generator=gen, dtype=torch.float64) * 0.3 if related else \
            torch.randn(36, 10, generator=gen, dtype=torch.float64)
        h = torch.cat([kept, gone + 0.05 * torch.randn(36, 10, generator=gen, dtype=torch.float64)], 1)
        w = torch.randn(4, 40, generator=gen, dtype=torch.float64)
        idx = torch.randperm(40, generator=gen)[:30].sort().values
        g, gf = h.T @ h, h[:18].T @ h[:18]
        fit, val = (gf[idx][:, idx], gf[idx]), (g[idx][:, idx] - gf[idx][:, idx], g[idx] - gf[idx])
        lam = choose_lam_rows(w, h[:18], h[18:], idx)
        assert lam == choose_lam(w, fit, val, w[:, idx])
        chosen.add(lam)
        for lam in (1e-3, 0.1, 1.0, float("inf")):
            want, _ = ridge_refit(w, g[idx][:, idx], g[idx], lam=lam, prior=w[:, idx])
            assert torch.allclose(ridge_refit_rows(w, h, idx, lam), want, atol=1e-8, rtol=1e-6)
    assert float("inf") in chosen and len(chosen) == 2  # both kinds of choice were compared

"""Greedy structured Optimal Brain Surgeon: which features to remove when a least-squares refit follows.

A consumer ``W`` (d, n) reads features with Gram matrix ``G = H^T H``. Removing a set S of
features and refitting the rest by least squares raises the output error by

    tr(W_S [G^-1]_SS^-1 W_S^T)

(Hassibi & Stork's OBS, applied to whole columns as in ZipLM / SlimGPT). Greedy elimination
removes the cheapest unit (a feature, or a head's block of ``width`` columns), updates ``W`` and
``G^-1`` as if the refit had happened, and repeats. Unlike per-feature scores (``act``, ``wanda``)
it sees correlations: of two neurons that always fire together, it keeps one and lets the refit
carry the other. Units are removed in chunks (``steps`` updates in all) to bound the cost to
``O(steps * n^2 * chunk)``.
"""

from __future__ import annotations

import math

import torch


def obs_rank(weight: torch.Tensor, gram: torch.Tensor, lam: float = 1e-3, width: int = 1, steps: int = 64,
             protect: int = 0, n_remove: int | None = None) -> torch.Tensor:
    """(n_units,) float64 ranks, higher = keep longer: the order greedy OBS elimination removes units in.

    weight: (d, n_features [+ protect]) consumer; gram: its (square) input Gram matrix in the same
    feature order. The last ``protect`` features (e.g. the constant feature that fits a bias) are never
    removed. ``lam`` is relative to the mean diagonal, as in :func:`~modelfold.calib.compensate.ridge_refit`.
    Keeping the top-k ranks is the greedy OBS selection of k units, for any k >= units - ``n_remove``
    (default: all but one); units never removed are ranked by their final cost.
    """
    m = gram.shape[0]
    n = m - protect
    if weight.shape[1] != m or n % width:
        raise ValueError(f"obs_rank: weight {tuple(weight.shape)}, gram {tuple(gram.shape)}, width {width} and "
                         f"protect {protect} do not fit")
    units = n // width
    w = weight.double().clone()
    h = gram.double().clone()
    reg = lam * float(torch.diagonal(h)[:n].mean().clamp_min(1e-12))
    h.diagonal()[:n] += reg
    hinv = torch.cholesky_inverse(_chol(h))
    alive = torch.ones(units, dtype=torch.bool, device=w.device)
    rank = torch.empty(units, dtype=torch.float64, device=w.device)
    removed = 0
    n_remove = units - 1 if n_remove is None else max(0, min(n_remove, units - 1))
    chunk = max(1, math.ceil(n_remove / steps))
    while removed < n_remove:
        s = _costs(w, hinv, width, units)
        s[~alive] = math.inf
        take = torch.argsort(s)[:min(chunk, n_remove - removed)]
        rank[take] = removed + torch.arange(take.numel(), dtype=torch.float64, device=take.device)
        removed += take.numel()
        alive[take] = False
        cols = (take[:, None] * width + torch.arange(width, device=take.device)[None, :]).reshape(-1)
        x = torch.linalg.solve(hinv[cols][:, cols], hinv[cols])  # (|S|, m)
        w -= w[:, cols] @ x
        hinv -= hinv[:, cols] @ x
        hinv[cols] = 0.0
        hinv[:, cols] = 0.0
        w[:, cols] = 0.0
    s = _costs(w, hinv, width, units)[alive]
    rank[alive] = removed + torch.argsort(torch.argsort(s)).double()
    return rank


def _costs(w: torch.Tensor, hinv: torch.Tensor, width: int, units: int) -> torch.Tensor:
    """Error increase of removing each unit now (dead units give garbage; the caller masks them)."""
    n = units * width
    if width == 1:
        d = torch.diagonal(hinv)[:n].clamp_min(1e-300)
        return (w[:, :n] ** 2).sum(0) / d
    blocks = hinv[:n, :n].reshape(units, width, units, width)
    idx = torch.arange(units, device=hinv.device)
    hb = blocks[idx, :, idx, :]  # (units, width, width)
    hb = hb + 1e-300 * torch.eye(width, dtype=hb.dtype, device=hb.device)
    wb = w[:, :n].reshape(w.shape[0], units, width).permute(1, 0, 2)  # (units, d, width)
    sol = torch.linalg.lstsq(hb, wb.transpose(1, 2)).solution  # (units, width, d)
    return (wb.transpose(1, 2) * sol).sum((1, 2))


def _chol(h: torch.Tensor) -> torch.Tensor:
    """Cholesky factor, adding jitter to the diagonal until it exists (rank-deficient Gram matrices)."""
    jitter = 0.0
    base = float(torch.diagonal(h).abs().mean().clamp_min(1e-12))
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + jitter * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
        if int(info) == 0:
            return chol
        jitter = base * (1e-10 if jitter == 0 else jitter / base * 100)
    raise ValueError("obs_rank: the Gram matrix is not positive definite even with jitter")

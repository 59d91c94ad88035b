"""Importance scores of features (MLP neurons, head columns, channels) from calibration statistics.

All scores are "keep the largest". ``stats`` are per-feature sums over the calibration samples;
``weight`` is the consumer (d, n) that reads the features.

* ``"act"``   ||h_j|| * ||W[:, j]||_2  — the feature's contribution energy (default).
* ``"wanda"`` ||h_j|| * sum_i |W_ij|   — Wanda-sp (An et al. 2024's structured Wanda).
* ``"flap"``  Var(h_j) * ||W[:, j]||^2 — FLAP's fluctuation metric (An et al., AAAI 2024).
* ``"magnitude"`` ||W[:, j]||_2 only (no activations; for comparison).
* ``"obs"``   greedy structured Optimal Brain Surgeon on the Gram matrix (:mod:`modelfold.calib.obs`):
  the error a least-squares refit cannot undo, correlations included. Needs the Gram matrix, so
  it is a *selection* (:func:`unit_importance`) rather than a per-feature score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORES = ("act", "wanda", "flap", "magnitude", "obs")


@dataclass
class FeatureStats:
    """Per-feature first and second moments over ``n`` calibration samples."""

    sum: torch.Tensor  # (n_features,) float64
    sq: torch.Tensor  # (n_features,) float64
    n: int

    @classmethod
    def of(cls, h: torch.Tensor) -> FeatureStats:
        h = h.reshape(-1, h.shape[-1]).double()
        return cls(h.sum(0), (h * h).sum(0), h.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sq / max(self.n, 1) - self.mean ** 2).clamp_min(0.0)


def feature_scores(kind: str, stats: FeatureStats, weight: torch.Tensor) -> torch.Tensor:
    """(n,) float64 scores of the features read by ``weight`` (d, n)."""
    w = weight.detach().double()
    if kind == "act":
        return stats.sq.sqrt() * w.norm(dim=0)
    if kind == "wanda":
        return stats.sq.sqrt() * w.abs().sum(0)
    if kind == "flap":
        return stats.var * w.pow(2).sum(0)
    if kind == "magnitude":
        return w.norm(dim=0)
    if kind == "obs":
        raise ValueError("score 'obs' needs the Gram matrix: use unit_importance()")
    raise ValueError(f"unknown score {kind!r}; choose one of {SCORES}")


def unit_scores(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Sum feature scores over consecutive blocks of ``width`` features (e.g. the columns of a head)."""
    return scores.reshape(-1, width).sum(1)


def unit_importance(kind: str, stats: FeatureStats, weight: torch.Tensor, gram: torch.Tensor, width: int = 1,
                    lam: float = 1e-3, bias: torch.Tensor | None = None, keep: int | None = None) -> torch.Tensor:
    """(units,) keep-the-largest importance of blocks of ``width`` features read by ``weight`` (d, n).

    ``gram`` is the features' Gram matrix, with the constant feature last when ``bias`` is given
    (the refit then fits the bias too); only ``"obs"`` uses it, and with ``keep`` it ranks only as far
    as needed to pick the best ``keep`` or more units.
    """
    if kind == "obs":
        from .obs import obs_rank

        w = weight if bias is None else torch.cat([weight, bias[:, None].to(weight.dtype)], 1)
        return obs_rank(w, gram, lam, width, protect=0 if bias is None else 1,
                        n_remove=None if keep is None else weight.shape[1] // width - keep)
    return unit_scores(feature_scores(kind, stats, weight), width)

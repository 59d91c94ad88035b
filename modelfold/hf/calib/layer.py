"""Calibrated compression of one transformer block: activations in, smaller block out.

Pure functions of a block's tensors, a plan and that block's calibration activations, so the
in-memory and the layer-by-layer paths call the very same code:

* :func:`compress_mlp`: choose the neurons to keep by an activation-aware score (``method="select"``)
  or cluster them on activation-aware features and merge (``method="fold"``), then refit the
  consumer (down_proj / fc2) by least squares so the MLP's output on the calibration activations
  matches the original's (``modelfold.calib.compensate``).
* :func:`compress_attention`: the same for attention heads (query heads inside each KV group, or
  whole KV groups); o_proj is refit from the heads' context vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...calib.compensate import (
    Gram,
    choose_lam,
    choose_lam_rows,
    relative_output_error,
    ridge_refit,
    ridge_refit_rows,
    with_ones,
)
from ...calib.score import SCORES, FeatureStats, unit_importance
from ...cluster import kmeans
from ...errors import CalibrationError
from ..adapters.base import AttnSpec, MLPSpec
from ..adapters.refs import get, linear_like, put
from ..attention import apply_units, choose_heads, resolve_mode, units_k
from ..mlp import fold_mlp_with_labels, prune_mlp_keep

METHODS = ("select", "fold")


@dataclass(frozen=True)
class CalibOptions:
    """How calibrated compression chooses and repairs (see docs/calibration.md)."""

    method: str = "select"  # "select": keep by score; "fold": k-means on activation features + merge
    score: str = "act"  # see modelfold.calib.score
    compensate: str = "ls"  # "ls" (least squares), "bias" (mean shift into an existing bias) or "none"
    lam: float | str = "auto"  # ridge, relative to the mean diagonal of the Gram matrix; "auto": held out
    attention_mode: str = "auto"
    seed: int = 0
    n_init: int = 3
    feedback: bool = False  # refit MLP consumers towards the original model's residual stream
    weighting: str = "token"  # "token": each token's error relative to its residual norm; "none": plain sums
    round_to: int | None = None  # kept widths at multiples of it (checks.kept_width)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.score not in SCORES:
            raise CalibrationError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.weighting not in ("token", "none"):
            raise CalibrationError(f"weighting must be 'token' or 'none', got {self.weighting!r}")
        if self.compensate not in ("ls", "bias", "none"):
            raise CalibrationError(f"compensate must be 'ls', 'bias' or 'none', got {self.compensate!r}")
        if self.lam != "auto" and (isinstance(self.lam, str) or not self.lam >= 0):
            raise CalibrationError(f"lam must be 'auto' or a ridge >= 0 (inf: no refit), got {self.lam!r}")

    @property
    def ridge(self) -> float:
        """The ridge for scores and error curves: ``lam``, or ``DEFAULT_LAM`` with ``lam="auto"``."""
        return DEFAULT_LAM if self.lam == "auto" else float(self.lam)


DEFAULT_LAM = 1e-3  # the ridge where none is chosen on held-out rows (scores; feedback targets)


def gram(h: torch.Tensor, ones: bool, scale: torch.Tensor | None = None) -> torch.Tensor:
    g = Gram()
    g.add(with_ones(h, scale) if ones else h)
    return g.aa


def target_cross(h: torch.Tensor, target: torch.Tensor, ones: bool, block: int = 8192,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[h, 1]^T target`` (float64), block by block (rows already weighted by ``scale``, if given)."""
    g = Gram(square=False)
    g.add(with_ones(h.double(), scale) if ones else h, target, block)  # as float64: the bias column exact
    return g.ab


def refit(weight: torch.Tensor, bias: torch.Tensor | None, full: tuple[torch.Tensor, torch.Tensor],
          fit: tuple[torch.Tensor, torch.Tensor] | None, prior: torch.Tensor, opts: CalibOptions,
          tc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Least-squares refit of a consumer from the Grams ``full`` = (G', C) of all calibration rows, pulled
    towards ``prior`` (the plainly pruned/folded consumer); with ``lam="auto"`` the ridge is the one whose
    refit on ``fit`` (the Grams of the first half of the sequences) errs least on the other half
    (``calib.compensate.choose_lam``). Returns (weight', bias', the ridge used)."""
    fit_bias = bias is not None
    lam = opts.lam
    if lam == "auto":
        lam = DEFAULT_LAM if fit is None or tc is not None else choose_lam(
            weight, fit, (full[0] - fit[0], full[1] - fit[1]), prior, bias, fit_bias)
    new_w, new_b = ridge_refit(weight, full[0], full[1], float(lam), bias, fit_bias, prior=prior, target_cross=tc)
    return new_w, new_b, float(lam)


def refit_columns(weight: torch.Tensor, bias: torch.Tensor | None, g_full: torch.Tensor, idx: torch.Tensor,
                  opts: CalibOptions, stats: FeatureStats, tc: torch.Tensor | None = None,
                  g_fit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Consumer reading only the features ``idx`` of ``g_full`` (which ends with the ones feature iff bias).

    ``tc``: ``[h, 1]^T Y`` over all features, to fit target outputs Y instead of the original's.
    ``g_fit``: the same Gram over the fit rows only (``blocks.fit_rows``), to choose the ridge (see :func:`refit`).
    Returns (weight', bias', the ridge used; nan without a least-squares refit).
    """
    fit_bias = bias is not None
    if opts.compensate == "ls":
        sel = torch.cat([idx, torch.tensor([g_full.shape[0] - 1], device=idx.device)]) if fit_bias else idx
        fit = None if g_fit is None else (g_fit[sel][:, sel], g_fit[sel])
        return refit(weight, bias, (g_full[sel][:, sel], g_full[sel]), fit, weight[:, idx], opts,
                     None if tc is None else tc[sel])
    new_w = weight[:, idx]
    if opts.compensate == "bias" and fit_bias:  # FLAP: removed features' mean output into the bias
        gone = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
        gone[idx] = False
        shift = weight[:, gone].double() @ stats.mean[gone]
        return new_w, (bias.double() + shift).to(bias.dtype), math.nan
    return new_w, bias, math.nan


def compress_mlp(spec: MLPSpec, k: int, h: torch.Tensor, opts: CalibOptions,
                 rerun: Callable[[], torch.Tensor] | None = None, target: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, g: torch.Tensor | None = None,
                 split: int | None = None) -> tuple[float, float]:
    """Keep ``k`` neurons of the MLP whose consumer inputs on the calibration set are ``h`` (N, n).

    ``rerun`` recomputes the consumer's inputs after the producers changed (needed by "fold").
    ``target`` (N, d): the outputs the least-squares refit aims at (default: the consumer's own
    outputs on ``h``; feedback passes what the original model's residual stream needs).
    ``scale`` (N,): per-row weights (square roots), so every sum over samples is a weighted one.
    ``g``: the Gram matrix of the (weighted) ``h`` when the consumer has no bias, if already computed.
    ``split``: rows of ``h`` the ridge is fitted on when ``opts.lam="auto"`` (``blocks.fit_rows``; the rest
    choose it), default half of them.
    Returns (the relative output error of the MLP on the calibration activations, the ridge used).
    """
    cons = get(spec.consumer)
    w = cons.weight.detach()
    bias = None if cons.bias is None else cons.bias.detach()
    h_raw = h  # k-means features stay unweighted (weighted ones merge duplicates less reliably)
    if scale is not None:
        h = h * scale[:, None].to(h.dtype)
        target = None if target is None else target * scale[:, None].to(target.dtype)
    stats = FeatureStats.of(h)
    g = gram(h, bias is not None, scale) if g is None or bias is not None else g
    n = spec.width
    split = h.shape[0] // 2 if split is None else split
    held_out = opts.lam == "auto" and opts.compensate == "ls" and target is None and 0 < split < h.shape[0]
    ones = bias is not None
    if opts.method == "select":
        keep = torch.sort(torch.topk(unit_importance(opts.score, stats, w, g, 1, opts.ridge, bias, k),
                                     k).indices).values
        prune_mlp_keep(spec, keep)
        tc = None if target is None else target_cross(h, target, ones, scale=scale)
        if opts.compensate == "ls" and not ones and tc is None and h.shape[0] < k:  # fewer rows than features
            (new_w, lam), new_b = refit_rows(w, h, keep, opts, split), bias
        else:
            g_fit = fit_gram(h, ones, scale, opts, split) if tc is None else None
            new_w, new_b, lam = refit_columns(w, bias, g, keep, opts, stats, tc, g_fit)
        g_new, cross = g[keep][:, keep], g[keep][:, :n]
    else:
        if rerun is None:
            raise ValueError("method='fold' needs rerun= to measure the merged neurons")
        labels = kmeans(activation_features(h_raw, w), k, seed=opts.seed, n_init=opts.n_init).labels
        fold_mlp_with_labels(spec, labels, k)
        h2 = rerun()
        h2 = h2 if scale is None else h2 * scale[:, None].to(h2.dtype)
        a, b = (with_ones(h2, scale), with_ones(h, scale)) if ones else (h2, h)
        gx, cx = Gram(), Gram()
        gx.add(a[:split])
        cx.add(a[:split], b[:split])
        fit = (gx.aa.clone(), cx.ab.clone()) if held_out else None
        gx.add(a[split:])
        cx.add(a[split:], b[split:])
        folded = get(spec.consumer).weight.detach()
        if opts.compensate == "ls":
            tc = None if target is None else target_cross(h2, target, ones, scale=scale)
            new_w, new_b, lam = refit(w, bias, (gx.aa, cx.ab), fit, folded, opts, tc)
        else:
            new_w, new_b, lam = folded, bias, math.nan
        g_new, cross = gx.aa[:k][:, :k], cx.ab[:k][:, :n]
    put(spec.consumer, linear_like(new_w.to(w.dtype).contiguous(), new_b))
    return relative_output_error(w, g[:n][:, :n], new_w, g_new, cross), lam


def activation_features(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, N) per-neuron features for calibrated folding: its activations times its output norm."""
    return (h.T.float() * weight.detach().float().norm(dim=0)[:, None]).contiguous()


def attention_units(spec: AttnSpec, mode: str) -> tuple[int, int]:
    """(number of units, columns of o_proj per unit)."""
    if mode == "query":
        return spec.num_heads, spec.head_dim
    return spec.num_kv_heads, spec.n_rep * spec.head_dim


def compress_attention(spec: AttnSpec, ratio: float, a: torch.Tensor, adapter, opts: CalibOptions,
                       scale: torch.Tensor | None = None, split: int | None = None
                       ) -> tuple[int, int, float, float]:
    """Drop heads by score on the o_proj inputs ``a`` (N, heads*head_dim), then refit o_proj.

    ``scale`` (N,) and ``split``: per-row weights and fit rows, as in :func:`compress_mlp`.
    Returns (units before, units after, relative output error of o_proj on the calibration set, ridge).
    """
    mode = resolve_mode(spec, opts.attention_mode)
    n_units, width = attention_units(spec, mode)
    k = units_k(spec, mode, ratio, opts.round_to)
    o = get(spec.o)
    w = o.weight.detach()
    bias = None if o.bias is None else o.bias.detach()
    a = a if scale is None else a * scale[:, None].to(a.dtype)
    stats = FeatureStats.of(a)
    g = gram(a, bias is not None, scale)
    keep_units = choose_heads(spec, mode, k, unit_importance(opts.score, stats, w, g, width, opts.ridge, bias))
    cols = (keep_units[:, None] * width + torch.arange(width, device=keep_units.device)[None, :]).reshape(-1)
    apply_units(spec, mode, None, keep_units, k, adapter)
    new_w, new_b, lam = refit_columns(w, bias, g, cols, opts, stats, g_fit=fit_gram(a, bias is not None, scale,
                                                                                    opts, split))
    put(spec.o, linear_like(new_w.to(w.dtype).contiguous(), new_b))
    nf = w.shape[1]
    return n_units, int(keep_units.numel()), relative_output_error(w, g[:nf][:, :nf], new_w, g[cols][:, cols],
                                                                   g[cols][:, :nf]), lam


def refit_rows(weight: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, opts: CalibOptions,
               split: int | None) -> tuple[torch.Tensor, float]:
    """(consumer', ridge): :func:`refit` for a consumer without bias computed from the rows ``h`` (N, n)
    themselves, for fewer rows than kept features (``calib.compensate.choose_lam_rows``,
    ``ridge_refit_rows``): the same ridge choice and refit, in an N x N system."""
    split = h.shape[0] // 2 if split is None else split
    lam = opts.lam
    if lam == "auto":
        lam = choose_lam_rows(weight, h[:split], h[split:], keep) if 0 < split < h.shape[0] else DEFAULT_LAM
    return ridge_refit_rows(weight, h, keep, float(lam)), float(lam)


def fit_gram(h: torch.Tensor, ones: bool, scale: torch.Tensor | None, opts: CalibOptions,
             split: int | None) -> torch.Tensor | None:
    """The Gram matrix of the fit rows ``h[:split]`` (default half) when ``opts`` chooses the ridge on
    held-out rows, else None (``h`` already weighted by ``scale``)."""
    split = h.shape[0] // 2 if split is None else split
    if opts.lam != "auto" or opts.compensate != "ls" or not 0 < split < h.shape[0]:
        return None
    return gram(h[:split], ones, None if scale is None else scale[:split])

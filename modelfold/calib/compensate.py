"""Least-squares compensation: refit a consumer so it sees what it saw before compression.

A consumer (down_proj, o_proj, the next conv or linear) reads n input features ``h`` and computes
``W h``. After folding or pruning it reads k features ``h'`` instead (a subset of ``h`` for pruning,
merged features for folding). Given calibration samples, the refit is the ridge solution

    W' = argmin ||H' W'^T - H W^T||^2 + lam ||W'||^2  =  W C^T (G' + lam I)^-1,
    G' = H'^T H' (k, k),  C = H'^T H (k, n),

so only Gram matrices are needed, accumulated block by block (:class:`Gram`) in float64. With
``bias=True`` a constant feature is appended, so the consumer's bias absorbs the mean shift.
Conv consumers use the same algebra on im2col patches (:func:`conv_patches`).
Shared by the traced CNN engine and the transformers adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


class Gram:
    """Running ``A^T A``, ``A^T B`` and the sample count over blocks of rows (float64); with
    ``square=False`` only ``A^T B`` (a cross product with a target)."""

    def __init__(self, square: bool = True) -> None:
        self.aa: torch.Tensor | None = None
        self.ab: torch.Tensor | None = None
        self.n = 0
        self.square = square

    def add(self, a: torch.Tensor, b: torch.Tensor | None = None, block: int = 8192) -> None:
        """Accumulate rows of ``a`` (N, k) and ``b`` (N, n); ``b`` defaults to ``a``."""
        a = a.reshape(-1, a.shape[-1])
        b = a if b is None else b.reshape(-1, b.shape[-1])
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"Gram.add: {a.shape[0]} rows of a but {b.shape[0]} rows of b")
        for s in range(0, a.shape[0], block):
            ab = a[s:s + block].double()
            bb = ab if b is a else b[s:s + block].double()
            aa_ = ab.T @ ab if self.square or b is a else None
            abx = aa_ if b is a else ab.T @ bb
            if self.square:
                self.aa = aa_ if self.aa is None else self.aa + aa_
            self.ab = abx if self.ab is None else self.ab + abx
        self.n += a.shape[0]


def with_ones(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``h`` (N, k) with a constant-1 column appended (the bias feature); with row weights, the rows of
    ``h`` already scaled by ``scale`` (N,), the bias feature is ``scale`` itself."""
    col = torch.ones(h.shape[0], dtype=h.dtype, device=h.device) if scale is None else scale.to(h.dtype)
    return torch.cat([h, col[:, None]], dim=1)


def ridge_refit(weight: torch.Tensor, gram_new: torch.Tensor, cross: torch.Tensor | None, lam: float = 1e-3,
                bias: torch.Tensor | None = None, fit_bias: bool = False, prior: torch.Tensor | None = None,
                target_cross: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New consumer (weight', bias') that reads k features instead of n.

    weight: (d, n) original consumer and ``bias`` (d,) its bias or None. gram_new = H'^T H' and
    cross = H'^T H, both built from rows with a constant 1 appended to h' and h (:func:`with_ones`)
    when ``fit_bias``: then bias' absorbs the mean shift, else bias is kept as it is. ``lam`` is
    relative to the mean diagonal of the feature part of ``gram_new``. Float64 math, cast back.
    ``prior`` (d, k): weights the ridge term pulls towards (``lam ||W' - prior||^2``; default zero), e.g.
    the plainly pruned/folded consumer, so that few or unrepresentative samples cannot drag the refit
    far from it. ``target_cross`` = H'^T Y (k[+1], d) fits ``H' W'^T ~ Y`` for any target outputs Y
    (e.g. what the original model's residual stream needs) instead of ``H W^T``; ``cross`` is then unused.
    """
    d, n = weight.shape
    if math.isinf(lam):  # infinitely strong pull: the prior itself, no refit
        if prior is None:
            raise ValueError("ridge_refit: lam=inf needs a prior (the unrefitted consumer)")
        return prior.to(weight.dtype), bias
    w = weight.double()
    if fit_bias:
        b = torch.zeros(d, dtype=w.dtype, device=w.device) if bias is None else bias.double()
        w = torch.cat([w, b[:, None]], dim=1)
    if target_cross is not None:
        if target_cross.shape != (gram_new.shape[0], d):
            raise ValueError(f"ridge_refit: target_cross {tuple(target_cross.shape)} must be "
                             f"({gram_new.shape[0]}, {d})")
    elif cross.shape[1] != w.shape[1] or gram_new.shape[0] != cross.shape[0]:
        raise ValueError(f"ridge_refit: weight {tuple(weight.shape)}, gram {tuple(gram_new.shape)} and cross "
                         f"{tuple(cross.shape)} do not fit (fit_bias={fit_bias})")
    g = gram_new.double().clone()
    k = g.shape[0] - (1 if fit_bias else 0)
    diag = torch.diagonal(g)[:k]
    reg = lam * float(diag.mean().clamp_min(1e-12)) if k else 0.0
    idx = torch.arange(k, device=g.device)
    g[idx, idx] += reg
    rhs = target_cross.double().clone() if target_cross is not None else cross.double() @ w.T
    if prior is not None:
        if prior.shape != (d, k):
            raise ValueError(f"ridge_refit: prior {tuple(prior.shape)} must be ({d}, {k})")
        rhs[:k] += reg * prior.double().T.to(rhs.device)
    sol = _solve_psd(g, rhs).T  # (d, k[+1])
    if fit_bias:
        return sol[:, :k].to(weight.dtype), sol[:, k].to(weight.dtype if bias is None else bias.dtype)
    return sol.to(weight.dtype), bias


LAMS = (1e-3, 1e-2, 1e-1, 1.0, math.inf)  # the ridges ``choose_lam`` tries; inf: no refit at all


def choose_lam(weight: torch.Tensor, fit: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
               prior: torch.Tensor, bias: torch.Tensor | None = None, fit_bias: bool = False,
               lams: tuple[float, ...] = LAMS) -> float:
    """The ridge of ``lams`` whose refit (towards ``prior``) on the Grams ``fit`` = (G', C) of some
    calibration rows has the least output error on the Grams ``val`` of the other, held-out rows.

    A least-squares refit with fewer calibration rows than kept features interpolates them and can
    be far worse than no refit at all on new inputs (Qwen2.5-1.5B: 8,960 FFN features, 2,048 tokens);
    held-out rows show that, and ``inf`` (the prior itself: no refit) is among the choices. Ties go
    to the stronger ridge. Arguments as in :func:`ridge_refit` (with ``fit_bias``, the Grams end with
    the ones feature). The ridges are tried from the strongest down and the search stops at the first
    that errs more than the one before it (the held-out error of a ridge path is taken as unimodal), so
    where no refit wins one solve decides it."""
    w = weight.double()
    if fit_bias:
        b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if bias is None else bias.double()
        w = torch.cat([w, b[:, None]], dim=1)
    g_val, c_val = val[0].double(), val[1].double()
    cw = c_val @ w.T  # (k[+1], d): every candidate's cross term from one product

    def held_out_error(lam: float) -> float:  # ||H_val (W - V)^T||^2 less a constant
        v, vb = ridge_refit(weight, fit[0], fit[1], lam, bias, fit_bias, prior=prior)
        v = v.double()
        if fit_bias:
            vb = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device) if vb is None else vb.double()
            v = torch.cat([v, vb[:, None]], dim=1)
        return float((v @ g_val * v).sum() - 2 * (v * cw.T).sum())

    return first_minimum(lams, held_out_error)


def first_minimum(lams: tuple[float, ...], error: Callable[[float], float]) -> float:
    """The ridge of ``lams`` with the least ``error``, searched from the strongest down and stopped at the
    first that errs more than the one before it (ties go to the stronger ridge)."""
    best, best_lam = math.inf, max(lams)
    for lam in sorted(lams, reverse=True):
        err = error(lam)
        if not err < best - 1e-12 * abs(best if math.isfinite(best) else 0.0):
            break
        best, best_lam = err, lam
    return best_lam


def pruned_residual(weight: torch.Tensor, h: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the features not in ``idx`` contributed to the consumer's output on the rows ``h``, (N, d);
    the kept features ``h[:, idx]``), both float64: the residual a refit towards ``weight[:, idx]`` corrects."""
    w, hd = weight.double(), h.double()
    gone = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    gone[idx] = False
    return hd[:, gone] @ w[:, gone].T, hd[:, idx]


def choose_lam_rows(weight: torch.Tensor, h_fit: torch.Tensor, h_val: torch.Tensor, idx: torch.Tensor,
                    lams: tuple[float, ...] = LAMS) -> float:
    """:func:`choose_lam` for a consumer without bias refitted towards its kept columns ``weight[:, idx]``,
    from the activation rows ``h_fit`` (fit) and ``h_val`` (held out) instead of Grams: the same choice.

    Every ridge solution is the pruned consumer plus a correction in the span of the fit rows
    (:func:`ridge_refit_rows`), so one eigendecomposition of the fit rows' kernel (rows x rows) gives every
    ridge's held-out error; with fewer fit rows than kept features (Qwen2.5-1.5B: 1,024 against 7,168)
    that is far cheaper than a factorisation of the kept features' Gram matrix per ridge."""
    r, hk = pruned_residual(weight, h_fit, idx)  # (N_fit, d), (N_fit, k)
    rv, hvk = pruned_residual(weight, h_val, idx)
    s, u = torch.linalg.eigh(hk @ hk.T)
    a = (hvk @ hk.T) @ u  # (N_val, N_fit)
    b = u.T @ r  # (N_fit, d)
    mean_diag = max(float((hk * hk).sum()) / max(idx.numel(), 1), 1e-12)  # of the fit Gram, as ridge_refit

    def held_out_error(lam: float) -> float:
        e = rv if math.isinf(lam) else rv - a @ (b / (s + lam * mean_diag)[:, None])
        return float((e * e).sum())

    return first_minimum(lams, held_out_error)


def ridge_refit_rows(weight: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, lam: float) -> torch.Tensor:
    """:func:`ridge_refit` of a consumer without bias reading the features ``idx`` of ``h`` (N, n), pulled
    towards ``weight[:, idx]``, solved in the row space: W' = P + R^T (K + reg I)^-1 H_k with K = H_k H_k^T
    and R the pruned consumer's residual; an N x N system instead of k x k (cheaper when N < k)."""
    prior = weight.double()[:, idx]
    if math.isinf(lam):
        return prior.to(weight.dtype)
    r, hk = pruned_residual(weight, h, idx)  # (N, d), (N, k)
    reg = lam * max(float((hk * hk).sum()) / max(idx.numel(), 1), 1e-12)
    kern = hk @ hk.T
    kern.diagonal().add_(reg)
    return (prior + (hk.T @ _solve_psd(kern, r)).T).to(weight.dtype)


def output_energy(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||H W^T||^2 = tr(W G W^T) (float64, a 0-d tensor)."""
    w = weight.double()
    return (w @ gram.double() * w).sum()


def output_error(weight: torch.Tensor, gram: torch.Tensor, new_weight: torch.Tensor, gram_new: torch.Tensor,
                 cross: torch.Tensor, energy: torch.Tensor | None = None) -> float:
    """||H W^T - H' W'^T||^2 from Grams: tr(W G W^T) - 2 tr(W' C W^T) + tr(W' G' W'^T) (no bias);
    ``energy``: tr(W G W^T) if already computed (:func:`output_energy`)."""
    w, v = weight.double(), new_weight.double()
    a = output_energy(weight, gram) if energy is None else energy
    b = (v @ cross.double() * w).sum()
    c = (v @ gram_new.double() * v).sum()
    return float((a - 2 * b + c).clamp_min(0.0))


def relative_output_error(weight: torch.Tensor, gram: torch.Tensor, new_weight: torch.Tensor,
                          gram_new: torch.Tensor, cross: torch.Tensor) -> float:
    """``output_error`` relative to the layer's own output energy ||H W^T||^2 (0 when that is 0)."""
    a = output_energy(weight, gram)  # once: the d x n^2 product is most of the cost
    base = float(a.clamp_min(0.0))
    err = output_error(weight, gram, new_weight, gram_new, cross, energy=a)
    return err / base if base > 0 else 0.0


def _solve_psd(g: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``g x = rhs`` for a symmetric positive (semi)definite ``g``; Cholesky, else lstsq."""
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(g, rhs).solution


def conv_patches(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """im2col rows (N*L, C*kh*kw) of the input ``x`` (N, C, H, W) as ``conv`` sees it (groups=1)."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])

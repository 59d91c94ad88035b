"""Refit-aware sensitivity of a channel group (automatic CNN budget, ``calibration_kwargs={"budget_refit": True}``).

The plain sensitivity (``budget._silenced_error``) zeroes the consumer columns of a group's weakest
channels and measures the network's output error: pruning *without* the least-squares refit that
``compress`` applies afterwards. A group whose consumer the refit repairs well (a 1x1 projection with
thousands of im2col rows) and one it cannot repair (a classifier fitted on a few pooled samples) look
alike. Here the silenced columns are compensated as the refit would: each consumer's kept columns are
refitted by ridge regression towards the plain ones,

    W_K' = W_K + W_D G_DK (G_KK + reg I)^-1      (G = H^T H of the consumer's input rows, with a constant),

the constant going to the consumer's bias or the running mean of the BatchNorm after it. Cross-validated
so that a consumer with fewer samples than unknowns does not look free: the calibration inputs are split
in two halves, each half's error is measured with the correction fitted on the other half.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..calib.compensate import with_ones
from .calibrator import capture_input, refittable, rows
from .engine import CONSUMER, group_slices
from .groups import ChannelGroup


def consumer_grams(model: nn.Module, cg: ChannelGroup, halves: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Consumer name -> [G of half 0, G of half 1] (float64, inputs with a constant column appended),
    for the group's refittable consumers that run once."""
    out: dict[str, list[torch.Tensor]] = {}
    for sl, mod, _, _ in group_slices(model, cg, lambda sl, mod: sl.kind == CONSUMER and refittable(mod)):
        if sl.module in out:
            continue
        grams = []
        for h in halves:
            r = with_ones(rows(mod, capture_input(model, sl.module, h)).double())
            grams.append(r.T @ r)
        out[sl.module] = grams
    return out


def _columns(mod: nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """Columns of ``mod.weight.flatten(1)`` that input positions (channels or features) own."""
    if isinstance(mod, nn.Conv2d):
        per = mod.weight[0, 0].numel()
        return (positions[:, None] * per + torch.arange(per)).reshape(-1)
    return positions.reshape(-1)


def _corrections(model: nn.Module, cg: ChannelGroup, drop: torch.Tensor, grams: dict[str, list[torch.Tensor]],
                 lam: float) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Consumer -> per half: (new flattened weight with the dropped columns zeroed and the kept ones
    refitted on that half, constant shift of its outputs)."""
    out = {}
    for sl, mod, table, _ in group_slices(model, cg, lambda sl, _: sl.kind == CONSUMER and sl.module in grams):
        w = mod.weight.detach().double().flatten(1)
        n = w.shape[1]
        d_cols = _columns(mod, table[drop].reshape(-1))
        keep = torch.ones(n + 1, dtype=torch.bool)
        keep[d_cols] = False
        k_idx, d_idx = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
        per_half = []
        for g in grams[sl.module]:
            gkk = g[k_idx][:, k_idx].clone()
            diag = torch.diagonal(gkk)[:-1]  # the constant (last kept index) is not regularized
            reg = lam * float(diag.mean().clamp_min(1e-12))
            gkk[torch.arange(len(k_idx) - 1), torch.arange(len(k_idx) - 1)] += reg
            rhs = g[k_idx][:, d_idx] @ w[:, d_idx].T  # (|K|, out)
            delta = torch.linalg.lstsq(gkk, rhs).solution.T  # (out, |K|)
            new = w.clone()
            new[:, d_cols] = 0.0
            new[:, k_idx[:-1]] += delta[:, :-1]
            per_half.append((new, delta[:, -1]))
        out[sl.module] = per_half
    return out


def compensated_error(model: nn.Module, cg: ChannelGroup, drop: torch.Tensor, halves: list[torch.Tensor],
                      refs: list[torch.Tensor], grams: dict[str, list[torch.Tensor]], bns: dict[str, str],
                      output: Any, lam: float = 1e-3) -> float:
    """Mean squared output error (over both halves) of the network with ``drop`` silenced and each
    consumer refitted on the other half; consumers without a Gram are only silenced."""
    fixes = _corrections(model, cg, drop, grams, lam)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    total, count = 0.0, 0
    with torch.no_grad():
        plain = group_slices(model, cg, lambda sl, _: sl.kind == CONSUMER and sl.module not in fixes)
        for _, _, table, tensors in plain:  # plain silencing for consumers the refit does not reach
            pos = table[drop].reshape(-1)
            for _, dim, t in tensors:
                saved.append((t, t.data.clone()))
                t.data.index_fill_(dim, pos, 0.0)
        targets = []
        for name in fixes:
            mod = model.get_submodule(name)
            shift = mod.bias if mod.bias is not None else (
                model.get_submodule(bns[name]).running_mean if name in bns else None)
            saved.append((mod.weight, mod.weight.data.clone()))
            if shift is not None:
                saved.append((shift, shift.data.clone()))
            targets.append((name, mod, shift))
        try:
            for i, (x, ref) in enumerate(zip(halves, refs, strict=True)):
                for name, mod, shift in targets:
                    w, c = fixes[name][1 - i]  # fitted on the other half
                    mod.weight.data.copy_(w.view_as(mod.weight).to(mod.weight.dtype))
                    if shift is not None:
                        base = next(v for t, v in saved if t is shift)
                        sign = 1.0 if mod.bias is not None else -1.0  # a BN's running mean moves the other way
                        shift.data.copy_(base + sign * c.to(base.dtype))
                total += float((output(model, x) - ref).pow(2).sum())
                count += ref.numel()
        finally:
            for t, v in saved:
                t.data.copy_(v)
    return total / max(1, count)

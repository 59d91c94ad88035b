"""Neuron Merging (Kim et al., NeurIPS 2020): data-free compensation for pruned neurons.

Prune by magnitude, then, for every pruned neuron j, find the kept neuron i whose producer row is
most similar (cosine); if the similarity reaches ``threshold``, add ``(|w_j| / |w_i|) * z_j`` to the
consumer column ``z_i``. For a positively homogeneous activation (ReLU, leaky ReLU) a pruned neuron
that is a positive multiple ``s w_i`` of a kept one is removed exactly, since ``relu(s w_i x) =
s relu(w_i x)``. Pure functions on (producer rows, consumer columns), so any layer pair can use them
(a conv group in the traced engine, an MLP's up/down projections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MergePlan:
    """Kept neurons (sorted) and, per merged pruned neuron, ``dst[i] += scale[i] * src[i]``."""

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    scale: torch.Tensor
    similarity: torch.Tensor  # best cosine of every pruned neuron (merged or not)


def plan_merge(rows: torch.Tensor, k: int, threshold: float = 0.45,
               scores: torch.Tensor | None = None) -> MergePlan:
    """Which k neurons to keep and how to merge the others into them.

    rows: (n, d) producer rows (weights with bias appended, and any per-neuron scale folded in);
    scores: (n,) pruning importance, default the L2 norm of ``rows``; threshold: minimum cosine
    similarity for a pruned neuron to be merged (otherwise it is simply pruned).
    """
    n = rows.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, {n}]")
    r = rows.detach().double().reshape(n, -1)
    norm = r.norm(dim=1)
    score = norm if scores is None else scores.detach().double()
    keep = torch.sort(torch.topk(score, k, sorted=False).indices).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    pruned = torch.nonzero(mask).flatten()
    if pruned.numel() == 0:
        e = torch.zeros(0, dtype=torch.long)
        return MergePlan(keep, e, e, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    unit = r / norm.clamp_min(1e-30)[:, None]
    sim = unit[pruned] @ unit[keep].T  # (p, k)
    best, where = sim.max(dim=1)
    ok = (best >= threshold) & (norm[keep][where] > 0)
    src, dst = pruned[ok], keep[where[ok]]
    scale = norm[src] / norm[dst]
    return MergePlan(keep, src, dst, scale, best)


def merge_columns(cols: torch.Tensor, plan: MergePlan, dim: int = -1) -> torch.Tensor:
    """Consumer weights with the merged neurons' columns added and only the kept ones left.

    cols: a tensor whose axis ``dim`` indexes the n neurons (e.g. a down projection (d, n), dim=1).
    """
    out = cols.clone()
    if plan.src.numel():
        view = [1] * cols.ndim
        view[dim] = -1
        add = cols.index_select(dim, plan.src) * plan.scale.to(cols.dtype).view(view)
        out.index_add_(dim, plan.dst, add)
    return out.index_select(dim, plan.keep)

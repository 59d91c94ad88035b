"""Fold or prune the intermediate neurons of one transformer MLP."""

from __future__ import annotations

import torch

from ..cluster import kmeans
from ..merge import ar_scale, cluster_rho, merge_tensor, representatives
from .adapters.base import MLPSpec
from .adapters.refs import get, linear_like, put


def mlp_features(spec: MLPSpec) -> torch.Tensor:
    """Per-neuron vectors (n, d): [producer rows (+bias) of each producer ‖ consumer column]."""
    parts = []
    for ref in spec.producers:
        lin = get(ref)
        parts.append(lin.weight.detach())
        if lin.bias is not None:
            parts.append(lin.bias.detach()[:, None])
    parts.append(get(spec.consumer).weight.detach().T)
    out = torch.empty(spec.width, sum(p.shape[1] for p in parts), dtype=torch.float32, device=parts[0].device)
    col = 0
    for p in parts:  # filled part by part: no float copy of every part at once (large LLM layers)
        out[:, col:col + p.shape[1]] = p
        col += p.shape[1]
    return out


def fold_mlp_with_labels(spec: MLPSpec, labels: torch.Tensor, k: int, repair: str = "none") -> None:
    """Merge neurons by ``labels``: producer rows/biases averaged, consumer columns summed (in place)."""
    n = spec.width
    table = torch.arange(n, device=labels.device)[:, None]
    keep = torch.sort(representatives(labels, k)).values
    for ref in spec.producers:
        lin = get(ref)
        scale = ar_scale(cluster_rho([lin.weight.detach()], labels, k), labels, k) if repair == "ar" else None
        w = merge_tensor(lin.weight.detach(), 0, table, labels, k, "mean", scale=scale)
        b = None if lin.bias is None else merge_tensor(lin.bias.detach(), 0, table, labels, k, "mean")
        put(ref, linear_like(w[keep], None if b is None else b[keep]))
    cons = get(spec.consumer)
    w = merge_tensor(cons.weight.detach(), 1, table, labels, k, "sum")
    put(spec.consumer, linear_like(w[:, keep], None if cons.bias is None else cons.bias.detach()))
    _set_width(spec, k)


def prune_mlp_keep(spec: MLPSpec, keep: torch.Tensor) -> None:
    """Keep only neurons ``keep`` (sorted indices), in place."""
    for ref in spec.producers:
        lin = get(ref)
        put(ref, linear_like(lin.weight.detach()[keep], None if lin.bias is None else lin.bias.detach()[keep]))
    cons = get(spec.consumer)
    put(spec.consumer, linear_like(cons.weight.detach()[:, keep], None if cons.bias is None else cons.bias.detach()))
    _set_width(spec, int(keep.numel()))


def _set_width(spec: MLPSpec, k: int) -> None:
    for attr in spec.width_attrs if spec.owner is not None else ():
        if hasattr(spec.owner, attr):
            setattr(spec.owner, attr, k)


def fold_mlp(spec: MLPSpec, k: int, *, seed: int = 0, n_init: int = 3, repair: str = "none",
             device: torch.device | None = None) -> float:
    """Cluster the MLP's neurons into ``k`` (on ``device``) and merge; returns the k-means relative error."""
    feats = mlp_features(spec)
    res = kmeans(feats if device is None else feats.to(device), k, seed=seed, n_init=n_init)
    fold_mlp_with_labels(spec, res.labels.to(feats.device), k, repair)
    return res.relative_error


def prune_mlp(spec: MLPSpec, k: int, *, norm: int = 2) -> None:
    """Keep the ``k`` neurons whose concatenated slices have the largest Lp norm."""
    score = mlp_features(spec).norm(p=norm, dim=1)
    keep = torch.sort(torch.topk(score, k).indices).values
    prune_mlp_keep(spec, keep)

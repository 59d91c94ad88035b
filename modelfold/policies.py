"""Plans per group: which channels merge (folding) or survive (pruning baselines)."""

from __future__ import annotations

import torch

from .cluster import kmeans
from .engine import Plan, Planner
from .groups import PRODUCER, ChannelGroup


def _stack(feats: dict[str, torch.Tensor], kinds: tuple[str, ...] | None = None) -> torch.Tensor:
    blocks = [v for key, v in feats.items() if kinds is None or key.split(":")[-2] in kinds]
    if not blocks:
        raise ValueError("group has no feature slices")
    return torch.cat(blocks, dim=1)


def kmeans_planner(seed: int = 0, n_init: int = 3, max_dim: int = 256,
                   device: torch.device | None = None) -> Planner:
    """Fold: k-means over [producer rows | consumer columns | channel-wise filters] (paper §3).

    ``device``: where k-means runs (the labels come back to the features' device).
    """

    def plan(cg: ChannelGroup, feats: dict[str, torch.Tensor], k: int) -> Plan:
        x = _stack(feats)
        res = kmeans(x if device is None else x.to(device), k, seed=seed, n_init=n_init, max_dim=max_dim)
        return Plan(k, labels=res.labels.to(x.device), rel_error=res.relative_error)

    return plan


def magnitude_planner(norm: int = 2) -> Planner:
    """SP-L1/SP-L2: keep the k channels with the largest producer-row norm."""
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm}")

    def plan(cg: ChannelGroup, feats: dict[str, torch.Tensor], k: int) -> Plan:
        score = _stack(feats, (PRODUCER,)).norm(p=norm, dim=1)
        keep = torch.sort(torch.topk(score, k, sorted=False).indices).values
        return Plan(k, keep=keep)

    return plan


def first_k_planner(cg: ChannelGroup, feats: dict[str, torch.Tensor], k: int) -> Plan:
    """Keep the first k channels (used to count parameters at a given ratio)."""
    return Plan(k, keep=torch.arange(k))

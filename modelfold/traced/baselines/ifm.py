"""IFM: Iterative Feature Merging (Chen, Zhou, Yan, arXiv 2310.06756), data-free baseline.

Per channel group, IFM greedily merges the two most similar channels (cosine similarity
of their weight features), replaces them by their size-weighted average, and repeats until
k channels remain. The resulting partition is handed to the same engine as folding as a
cluster labelling, so producers are averaged and consumers summed exactly as in Fold-Naive;
only the clustering differs (greedy pairwise merging instead of k-means). No repair.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ...report import FoldReport
from ..engine import Plan, Planner
from ..groups import PRODUCER, ChannelGroup

FEATURES = ("producer", "all")


def ifm_labels(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy most-similar-pair merging of the rows of ``x`` (n, d) down to ``k`` clusters.

    Similarity is the cosine of the current (size-weighted mean) cluster vectors; ties go to
    the lowest indices. Returns labels in [0, k), numbered by first appearance.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, {n}]")
    v = x.double().clone()
    size = torch.ones(n, dtype=torch.float64)
    parent = torch.arange(n)
    alive = torch.ones(n, dtype=torch.bool)
    u = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = u @ u.T
    sim.fill_diagonal_(-float("inf"))
    for _ in range(n - k):
        flat = int(torch.argmax(sim))
        i, j = divmod(flat, n)
        i, j = min(i, j), max(i, j)
        v[i] = (size[i] * v[i] + size[j] * v[j]) / (size[i] + size[j])
        size[i] += size[j]
        alive[j] = False
        parent[parent == j] = i
        ui = v[i] / v[i].norm().clamp_min(1e-12)
        u[i] = ui
        row = u @ ui
        row[~alive] = -float("inf")
        row[i] = -float("inf")
        sim[i], sim[:, i] = row, row
        sim[j], sim[:, j] = -float("inf"), -float("inf")
    _, labels = torch.unique(parent, return_inverse=True)
    # renumber by first appearance so that labels are deterministic and dense
    order = {int(c): t for t, c in enumerate(dict.fromkeys(labels.tolist()))}
    return torch.tensor([order[int(c)] for c in labels], dtype=torch.long)


def ifm_planner(features: str = "producer") -> Planner:
    """Planner producing IFM labels. ``features``: "producer" (weight rows + bias of the
    channel's producers, IFM's filter similarity) or "all" (also consumer columns)."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")

    def plan(cg: ChannelGroup, feats: dict[str, torch.Tensor], k: int) -> Plan:
        blocks = [v for key, v in feats.items() if features == "all" or key.split(":")[-2] == PRODUCER]
        return Plan(k, labels=ifm_labels(torch.cat(blocks, dim=1), k))

    return plan


def ifm(model: nn.Module, example_inputs: Any, ratio: float | None = None, *, sparsity: float | None = None,
        features: str = "producer", ignore: Iterable[nn.Module | str] = (), strict: bool = False, seed: int = 0,
        verify: bool = True, progress: bool = False,
        return_report: bool = False) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Compress ``model`` with IFM on the same channel groups as :func:`modelfold.fold`."""
    from ..pipeline import TracedRun, run_traced

    run = TracedRun(ratio=ratio, sparsity=sparsity, ignore=ignore, strict=strict, verify=verify, seed=seed, progress=progress)
    out, report = run_traced(model, example_inputs, ifm_planner(features), "ifm", run)
    return (out, report) if return_report else out

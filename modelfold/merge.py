"""Folding as a linear map on tensors: pure functions of a tensor and a plan.

A *position table* ``T`` (n, m) lists, for each of the n channels of a group, the m
positions it owns along one axis of one tensor (m = 1 for a conv row; m = H*W for the
input features of a Linear behind a flatten). A *plan* is a cluster label per channel.
Merging writes each cluster's aggregate (mean for producers and per-channel parameters,
sum for consumers) into the positions of the cluster's representative (its
lowest-index member); the other members' positions are then removed by pruning.
"""

from __future__ import annotations

import torch


def representatives(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Lowest channel index of each cluster, shape (k,)."""
    n = labels.numel()
    rep = torch.full((k,), n, dtype=torch.long, device=labels.device)
    return rep.scatter_reduce(0, labels, torch.arange(n, device=labels.device), reduce="amin")


def position_table(idxs: list[int], root_idxs: list[int], n: int) -> torch.Tensor:
    """Arrange slice positions as (n, m): row c holds the positions owned by channel c.

    Raises ValueError if channels do not own equally many positions.
    """
    pos = torch.as_tensor(idxs, dtype=torch.long)
    root = torch.as_tensor(root_idxs, dtype=torch.long)
    if pos.numel() == 0 or pos.numel() != root.numel():
        raise ValueError("empty or inconsistent slice")
    if int(root.min()) < 0 or int(root.max()) >= n:
        raise ValueError(f"root index outside [0, {n})")
    key = root * (int(pos.max()) + 1) + pos
    order = torch.argsort(key)
    counts = torch.bincount(root, minlength=n)
    m = int(counts[0])
    if m == 0 or not bool((counts == m).all()):
        raise ValueError("channels own unequal numbers of positions")
    return pos[order].view(n, m)


def merge_tensor(
    tensor: torch.Tensor,
    dim: int,
    table: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    mode: str,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return a copy of ``tensor`` whose representative positions hold cluster aggregates.

    mode: "mean" (producers, per-channel parameters) or "sum" (consumers).
    scale: optional (k,) factor applied to each merged cluster (used by repairs).
    """
    if mode not in ("mean", "sum"):
        raise ValueError(f"unknown merge mode {mode!r}")
    n, m = table.shape
    table = table.to(tensor.device)
    labels = labels.to(tensor.device)
    rep = representatives(labels, k)
    slots = (labels[:, None] * m + torch.arange(m, device=tensor.device)[None, :]).reshape(-1)
    vals = tensor.index_select(dim, table.reshape(-1))
    shape = list(tensor.shape)
    shape[dim] = k * m
    acc = torch.zeros(shape, dtype=torch.float64 if tensor.is_floating_point() else tensor.dtype,
                      device=tensor.device)
    acc.index_add_(dim, slots, vals.to(acc.dtype))
    view = [1] * tensor.ndim
    view[dim] = k * m
    if mode == "mean":
        size = torch.bincount(labels, minlength=k).to(acc.dtype)
        acc = acc / size.repeat_interleave(m).view(view)
    if scale is not None:
        acc = acc * scale.to(acc).repeat_interleave(m).view(view)
    out = tensor.clone()
    out.index_copy_(dim, table[rep].reshape(-1), acc.to(tensor.dtype))
    return out


def gather_features(tensor: torch.Tensor, dim: int, table: torch.Tensor) -> torch.Tensor:
    """Per-channel feature rows (n, m * rest) of the slices ``table`` selects."""
    n = table.shape[0]
    vals = tensor.detach().index_select(dim, table.reshape(-1).to(tensor.device))
    return vals.movedim(dim, 0).reshape(n, -1).to(torch.float32)


def cluster_rho(blocks: list[torch.Tensor], labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean pairwise cosine similarity ρ̄_c of each cluster's members, averaged over ``blocks``.

    Each block is (n, d): one weight vector per channel. For unit rows u_i,
    Σ_{i≠j∈c} cos(u_i, u_j) = ‖Σ_{i∈c} u_i‖² − n_c. Singletons get ρ̄ = 1 (no correction).
    Computed in float64 on the blocks' device.
    """
    device = blocks[0].device if blocks else labels.device
    labels = labels.to(device)
    size = torch.bincount(labels, minlength=k).double()
    pairs = (size * (size - 1)).clamp_min(1.0)
    rho = torch.zeros(k, dtype=torch.float64, device=device)
    for b in blocks:
        u = b.double()
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        s = torch.zeros(k, u.shape[1], dtype=torch.float64, device=device).index_add_(0, labels, u)
        rho += ((s * s).sum(1) - size) / pairs
    rho = rho / max(len(blocks), 1)
    return torch.where(size > 1, rho, torch.ones_like(rho))


def ar_scale(rho: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Approximate-REPAIR factor per cluster, sqrt(n_c / (1 + (n_c − 1) ρ̄_c)), ρ̄ clamped to [0, 1].

    It undoes the norm shrinkage of averaging n_c equal-norm vectors whose mean pairwise cosine is
    ρ̄ (factor in [1, √n_c]); used by Fold-AR on CNNs and by the MLP fold of transformers.
    """
    size = torch.bincount(labels.to(rho.device), minlength=k).double()
    rho = rho.clamp(0.0, 1.0)
    return (size / (1.0 + (size - 1.0) * rho)).sqrt().float()

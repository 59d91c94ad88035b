"""Plans per group: which channels merge (folding) or survive (pruning baselines)."""

from __future__ import annotations

import torch

from ..cluster import kmeans
from .engine import NORM, Plan, Planner
from .groups import CHANNEL, CONSUMER, PRODUCER, ChannelGroup

WEIGHT_KINDS = (PRODUCER, CONSUMER, CHANNEL)
ACTIVATION = "activation"


def _stack(feats: dict[str, torch.Tensor], kinds: tuple[str, ...] = WEIGHT_KINDS) -> torch.Tensor:
    blocks = [v for key, v in feats.items() if key.split(":")[-2] in kinds]
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


def _activation_blocks(feats: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(consumer, per-position energy (n, m), per-position column norm^2 (n, m)) per consumer."""
    out = []
    for key, sq in feats.items():
        module, kind, attr = key.rsplit(":", 2)
        w = feats.get(f"{module}:{CONSUMER}:weight")
        if kind != ACTIVATION or attr != "sq" or w is None:
            continue
        n, m = sq.shape
        out.append((module, sq.double(), w.double().view(n, m, -1).pow(2).sum(-1)))
    return out


def activation_scores(feats: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Channel importance sqrt(sum over consumers and positions of ||a_p||^2 ||W[:, p]||^2), or None
    without activation features. ||a_p|| is the channel's activation norm on the calibration inputs as
    its consumer sees it, W[:, p] the consumer's column (the norm of the channel's output contribution
    would be ||W[:, p] a_p||; this product is its upper bound, as in Wanda)."""
    blocks = _activation_blocks(feats)
    if not blocks:
        return None
    return sum((sq * col).sum(1) for _, sq, col in blocks).sqrt()


def activation_planner() -> Planner:
    """Calibrated selection: keep the k channels with the largest :func:`activation_scores`
    (falls back to the producer-row L2 norm for a group without a measurable consumer)."""

    def plan(cg: ChannelGroup, feats: dict[str, torch.Tensor], k: int) -> Plan:
        score = activation_scores(feats)
        if score is None:
            score = _stack(feats, (PRODUCER,)).norm(dim=1).double()
        keep = torch.sort(torch.topk(score, k, sorted=False).indices).values
        return Plan(k, keep=keep)

    return plan


def activation_kmeans_planner(seed: int = 0, n_init: int = 3, max_dim: int = 256, weighted: bool = True) -> Planner:
    """Calibrated folding: k-means over the channels' activation samples (per consumer; scaled by
    the consumer column norm when ``weighted``), so channels that behave alike on the calibration
    inputs merge. Falls back to weight k-means without activation features."""

    def plan(cg: ChannelGroup, feats: dict[str, torch.Tensor], k: int) -> Plan:
        blocks = []
        for module, _sq, col in _activation_blocks(feats):
            s = feats[f"{module}:{ACTIVATION}:samples"].double()
            n, m = col.shape
            if weighted:
                s = (s.view(n, m, -1) * col.sqrt()[:, :, None]).view(n, -1)
            blocks.append(s)
        x = torch.cat(blocks, 1).float() if blocks else _stack(feats)
        res = kmeans(x, k, seed=seed, n_init=n_init, max_dim=max_dim)
        return Plan(k, labels=res.labels, rel_error=res.relative_error)

    return plan


def effective_rows(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Producer rows with bias appended, seen through the group's first BatchNorm (if any):
    ``[W γ/σ, (b - μ) γ/σ + β]`` — the pre-activation each channel really computes, so that a
    positive multiple of a channel has a positively scaled row. Several producers are concatenated."""
    blocks = []
    prods = sorted({k.rsplit(":", 2)[0] for k in feats if k.rsplit(":", 2)[1] == PRODUCER})
    bns = [k.rsplit(":", 2)[0] for k in feats if k.endswith(f":{NORM}:running_var")]
    for mod in prods:
        w = feats[f"{mod}:{PRODUCER}:weight"].double()
        b = feats.get(f"{mod}:{PRODUCER}:bias")
        b = torch.zeros(w.shape[0], 1, dtype=w.dtype) if b is None else b.double()
        if len(prods) == 1 and bns:
            bn = bns[0]
            g = feats.get(f"{bn}:{NORM}:weight")
            g = torch.ones_like(b) if g is None else g.double()
            beta = feats.get(f"{bn}:{NORM}:bias")
            beta = torch.zeros_like(b) if beta is None else beta.double()
            scale = g / (feats[f"{bn}:{NORM}:running_var"].double() + feats[f"{bn}:{NORM}:eps"].double()).sqrt()
            w, b = w * scale, (b - feats[f"{bn}:{NORM}:running_mean"].double()) * scale + beta
        blocks += [w, b]
    return torch.cat(blocks, 1)


def neuron_merging_planner(threshold: float = 0.45) -> Planner:
    """Neuron Merging (Kim et al. 2020): L2-magnitude pruning of the effective producer rows, each
    pruned channel's consumer columns added to its most similar kept channel's (scaled by the norm
    ratio) when the cosine similarity reaches ``threshold``. Data-free."""
    from .baselines.neuron_merging import plan_merge

    def plan(cg: ChannelGroup, feats: dict[str, torch.Tensor], k: int) -> Plan:
        mp = plan_merge(effective_rows(feats), k, threshold)
        return Plan(k, keep=mp.keep, absorb=(mp.src, mp.dst, mp.scale))

    return plan

"""Shared machinery of the repairs: data batches, conv→BN pairs, BN resets, plan logs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ...checks import forward
from ...merge import representatives
from ..engine import Plan, Planner, resolve
from ..groups import PRODUCER, ChannelGroup
from . import RepairError

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def as_batches(data: Any, batch_size: int = 256, limit: int | None = None) -> list[torch.Tensor]:
    """Input batches from a tensor of inputs, a DataLoader/iterable of ``x`` or ``(x, y, ...)``.

    ``limit`` caps the number of samples taken.
    """
    if data is None:
        raise RepairError("repair='data' (Fold-R) needs data=: a tensor of inputs or a DataLoader of "
                             "training batches (a few hundred to 1024 samples suffice). For a data-free "
                             "repair use repair='ar' or repair='dir'.")
    if isinstance(data, torch.Tensor):
        data = data[:limit] if limit is not None else data
        out = list(data.split(batch_size))
    else:
        out, seen = [], 0
        for item in data:
            x = item[0] if isinstance(item, list | tuple) else item
            if not isinstance(x, torch.Tensor):
                raise RepairError(f"data= yielded {type(x).__name__}; expected tensors or (inputs, labels) "
                                     "tuples")
            if limit is not None:
                x = x[: limit - seen]
            out.append(x)
            seen += x.shape[0]
            if limit is not None and seen >= limit:
                break
    if not out or sum(b.shape[0] for b in out) == 0:
        raise RepairError("data= is empty; pass at least one batch of inputs")
    return out


def conv_bn_pairs(model: nn.Module, example_inputs: Any) -> list[tuple[str, str]]:
    """(conv/linear name, BatchNorm name) for every BN whose input is exactly a conv/linear output.

    Found by tracing one forward pass with hooks (tensor identity), so BNs behind pooling,
    activations or additions are not paired. Modules called more than once are skipped.
    """
    outs: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    handles = []

    def producer_hook(name: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                outs[id(out)] = (name, out)
        return hook

    def bn_hook(name: str):
        def hook(mod: nn.Module, inp: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            hit = outs.get(id(inp[0])) if inp and isinstance(inp[0], torch.Tensor) else None
            if hit is not None and hit[1] is inp[0]:
                pairs.append((hit[0], name))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, LINEAR_TYPES) and not getattr(m, "transposed", False):
            handles.append(m.register_forward_hook(producer_hook(name)))
        elif isinstance(m, BN_TYPES):
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    try:
        forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return [(c, b) for c, b in pairs if calls.get(c) == 1 and calls.get(b) == 1]




def reset_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean/var on ``batches`` (cumulative average).

    Only the BN layers run in train mode; the model is returned to eval mode. Returns the
    number of BN layers reset.
    """
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.eval()
    return len(bns)


@dataclass
class FoldedGroup:
    """What the planner decided for one group (kept for repairs that run after the fold)."""

    cg: ChannelGroup
    labels: torch.Tensor
    k: int


class PlanLog:
    """Wraps a planner and records every labelling plan (folded groups)."""

    def __init__(self) -> None:
        self.groups: list[FoldedGroup] = []

    def wrap(self, planner: Planner) -> Planner:
        def plan(cg: ChannelGroup, feats: dict[str, torch.Tensor], k: int) -> Plan:
            p = planner(cg, feats, k)
            if p.labels is not None:
                self.groups.append(FoldedGroup(cg, p.labels.clone(), p.k))
            return p

        return plan


def group_has_bn(model: nn.Module, cg: ChannelGroup) -> bool:
    """True if a BatchNorm layer normalizes the group's channels."""
    return any(isinstance(safe_resolve(model, s.module), BN_TYPES) for s in cg.slices)


def safe_resolve(model: nn.Module, name: str) -> nn.Module | torch.Tensor | None:
    try:
        return resolve(model, name)
    except AttributeError:
        return None


def producers(cg: ChannelGroup) -> list[str]:
    return [s.module for s in cg.slices if s.kind == PRODUCER]


def folded_cluster_ids(table: torch.Tensor, labels: torch.Tensor, k: int, n_left: int) -> torch.Tensor:
    """Cluster label of each output row left in a folded producer whose rows ``table`` (n,) held
    the group's channels (the rows of dropped cluster members are gone, order is preserved)."""
    reps = representatives(labels, k)
    kept_rows = table[reps]
    order = torch.argsort(kept_rows)
    if n_left != k:
        raise RepairError(f"producer has {n_left} rows left, expected {k}")
    return torch.arange(k)[order]

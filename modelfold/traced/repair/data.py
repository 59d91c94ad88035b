"""Fold-R: REPAIR on real data (Jordan et al. 2022), the data-driven upper reference.

After the fold, every BatchNorm's running statistics are re-estimated on the data. Folded
groups that have no BatchNorm get REPAIR's per-channel correction instead: each merged
output channel of the group's producers is rescaled and shifted so that its mean/std on
the data equal the average mean/std of the cluster members in the original model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

from ...checks import forward
from ...merge import representatives
from ..engine import Planner
from . import Repair, RepairError
from .stats import BN_TYPES, PlanLog, as_batches, group_has_bn, reset_bn_stats


def _channel_dim(mod: nn.Module, out: torch.Tensor) -> int:
    return out.ndim - 1 if isinstance(mod, nn.Linear) else 1


def channel_stats(model: nn.Module, names: list[str], batches: list[torch.Tensor]
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-output-channel (mean, std) of modules ``names`` of ``model`` on ``batches`` (eval mode)."""
    acc: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name: str):
        def fn(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            d = _channel_dim(mod, out)
            y = out.detach().movedim(d, -1).reshape(-1, out.shape[d]).double()
            s = acc.setdefault(name, [torch.zeros(y.shape[1], dtype=torch.float64),
                                      torch.zeros(y.shape[1], dtype=torch.float64), torch.zeros(1)])
            s[0] += y.sum(0)
            s[1] += (y * y).sum(0)
            s[2] += y.shape[0]
        return fn

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            forward(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, (s1, s2, n) in acc.items():
        mean = s1 / n.double()
        var = (s2 / n.double() - mean * mean).clamp_min(0.0)
        out[name] = (mean, var.sqrt())
    return out


def _execution_order(model: nn.Module, names: set[str], x: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        forward(model, x[:1])
    finally:
        for h in handles:
            h.remove()
    return order


def _targets(log: PlanLog, original: nn.Module, folded: nn.Module, skip_bn: bool
             ) -> dict[str, list[torch.Tensor]]:
    """Folded producer name -> list over its output channels of the original member positions."""
    targets: dict[str, list[torch.Tensor]] = {}
    for fg in log.groups:
        if skip_bn and group_has_bn(folded, fg.cg):
            continue
        reps = representatives(fg.labels, fg.k)
        for sl in fg.cg.slices:
            if sl.kind != "producer":
                continue
            mod = original.get_submodule(sl.module)
            if getattr(mod, "transposed", False) or not isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d
                                                                     | nn.Linear):
                warnings.warn(f"REPAIR skips producer {sl.module} ({type(mod).__name__})", stacklevel=3)
                continue
            table = sl.table(fg.cg.size)[:, 0]
            n_out = mod.weight.shape[0]
            owner = torch.full((n_out,), -1, dtype=torch.long)
            owner[table] = torch.arange(fg.cg.size)
            dropped = set(table.tolist()) - set(table[reps].tolist())
            members = []
            for q in range(n_out):
                if q in dropped:
                    continue
                c = int(owner[q])
                members.append(torch.tensor([q]) if c < 0 else table[fg.labels == fg.labels[c]])
            targets[sl.module] = members
    return targets


def _rescale_(mod: nn.Module, alpha: torch.Tensor, shift: torch.Tensor) -> None:
    """y <- alpha * y + shift on the module's output channels (weight rows and bias)."""
    with torch.no_grad():
        w = mod.weight
        view = [-1] + [1] * (w.ndim - 1)
        w.mul_(alpha.to(w).view(view))
        if mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        mod.bias.mul_(alpha.to(w)).add_(shift.to(w))


def repair_channels(folded: nn.Module, original: nn.Module, log: PlanLog, batches: list[torch.Tensor],
                    skip_bn: bool = True) -> list[str]:
    """REPAIR's per-channel mean/std correction of the folded producers; returns corrected names.

    Producers are corrected one at a time in execution order, so each sees its
    already-corrected inputs. Targets: average of the cluster members' original mean and std.
    """
    targets = _targets(log, original, folded, skip_bn)
    if not targets:
        return []
    ref = channel_stats(original, list(targets), batches)
    done = []
    for name in _execution_order(folded, set(targets), batches[0]):
        mu_o, sd_o = ref[name]
        mu_t = torch.stack([mu_o[m].mean() for m in targets[name]])
        sd_t = torch.stack([sd_o[m].mean() for m in targets[name]])
        mu_f, sd_f = channel_stats(folded, [name], batches)[name]
        if mu_f.numel() != mu_t.numel():
            raise RepairError(f"REPAIR: {name} has {mu_f.numel()} channels, expected {mu_t.numel()}")
        alpha = torch.where(sd_f > 1e-8, sd_t / sd_f.clamp_min(1e-8), torch.ones_like(sd_f))
        _rescale_(folded.get_submodule(name), alpha, mu_t - alpha * mu_f)
        done.append(name)
    return done


def restore_statistics(folded: nn.Module, original: nn.Module, log: PlanLog,
                       batches: list[torch.Tensor]) -> dict[str, Any]:
    """Reset BN statistics on ``batches``, then REPAIR the folded groups that have no BN."""
    n_bn = reset_bn_stats(folded, batches) if any(isinstance(m, BN_TYPES) for m in folded.modules()) else 0
    corrected = repair_channels(folded, original, log, batches)
    return {"bn_reset": n_bn, "repair_corrected": corrected}


class FoldR(Repair):
    """Fold-R: BN statistics re-estimated on data; REPAIR correction for groups without BN."""

    name = "data"

    def __init__(self, original: nn.Module, batches: list[torch.Tensor]) -> None:
        self.original = original
        self.batches = batches
        self.log = PlanLog()
        self.summary: dict[str, Any] = {}

    @classmethod
    def from_kwargs(cls, model: nn.Module | None = None, data: Any = None, batch_size: int = 256,
                    max_samples: int | None = None, **kwargs: Any) -> FoldR:
        reject_options(kwargs, "data")
        if model is None:
            raise RepairError("repair='data' needs the original model")
        return cls(model, as_batches(data, batch_size, max_samples))

    def wrap(self, planner: Planner) -> Planner:
        return self.log.wrap(planner)

    def after(self, model: nn.Module) -> nn.Module:
        self.summary = restore_statistics(model, self.original, self.log, self.batches)
        return model


def reject_options(kwargs: dict[str, Any], name: str) -> None:
    extra = {k for k, v in kwargs.items() if k not in ("example_inputs", "seed", "progress") and v is not None}
    if extra:
        raise RepairError(f"repair={name!r} got unknown options {sorted(extra)}")

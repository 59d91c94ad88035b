"""Automatic per-group budgets for ``sparsity=`` with calibration (traced CNN engine).

Sensitivity of a group at a ratio r = the relative output error of the whole network when the
group's lowest-scoring channels (activation scores, ``policies.activation_scores``) are silenced,
i.e. their consumer columns zeroed, on the calibration inputs: a pruning of that one group without
compensation, measured end to end without re-tracing the model. ``calib.budget.allocate`` then
spreads the parameter target over the groups (Lagrangian, fragile groups keep more), and the target
handed to it is bisected so that the measured sparsity of the compressed model reaches ``sparsity``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..checks import forward
from ..engine import CONSUMER, group_features, mark_user_kept, resolve
from ..errors import InvalidRatioError
from ..groups import ChannelGroup, build_graph, iter_groups
from ..policies import activation_scores
from .budget import allocate

CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7)


def _channel_params(model: nn.Module, cg: ChannelGroup) -> int:
    """Parameters one channel of the group owns (rows, columns, per-channel vectors)."""
    total = 0
    for sl in cg.slices:
        owner = resolve(model, sl.module)
        m = sl.table(cg.size).shape[1]
        for attr, dim in sl.tensors:
            t = owner if attr == "" else getattr(owner, attr, None)
            if isinstance(t, nn.Parameter):
                total += t.numel() // t.shape[dim] * m
    return total


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = forward(model, x)
    out = out if isinstance(out, torch.Tensor) else getattr(out, "logits", out[0])
    return out.detach().double()


def sensitivity_curves(model: nn.Module, example_inputs: Any, calib: Any, ignore: set[str],
                       keep_outputs: set[str], candidates: tuple[float, ...] = CANDIDATES, samples: int = 64
                       ) -> tuple[dict[str, list[tuple[float, float, float]]], dict[str, int]]:
    """Per foldable group root: [(ratio, parameters removed, relative output error)], incl. (0, 0, 0);
    and the group sizes."""
    x = torch.cat(calib.batches)[:samples]
    ref = _output(model, x)
    denom = float(ref.pow(2).mean().clamp_min(1e-30))
    dg = build_graph(model, example_inputs)
    ignored = [m for n, m in model.named_modules() if n in ignore]
    curves: dict[str, list[tuple[float, float, float]]] = {}
    sizes: dict[str, int] = {}
    for _, cg in iter_groups(dg, ignored):
        mark_user_kept(cg, ignore, keep_outputs)
        if not cg.foldable:
            continue
        feats = group_features(model, cg)
        feats.update(calib.activation_features(model, cg))
        score = activation_scores(feats)
        if score is None:
            continue
        order = torch.argsort(score)  # weakest first
        per = _channel_params(model, cg)
        n = cg.size
        curve = [(0.0, 0.0, 0.0)]
        for r in candidates:
            k = max(1, round(n * (1 - r)))
            drop = order[: n - k]
            err = _silenced_error(model, cg, drop, x, ref) / denom
            curve.append((r, float(per * (n - k)), err))
        curves[cg.root] = curve
        sizes[cg.root] = n
    return curves, sizes


def _silenced_error(model: nn.Module, cg: ChannelGroup, drop: torch.Tensor, x: torch.Tensor,
                    ref: torch.Tensor) -> float:
    saved = []
    with torch.no_grad():
        for sl in cg.slices:
            if sl.kind != CONSUMER:
                continue
            owner = resolve(model, sl.module)
            pos = sl.table(cg.size)[drop].reshape(-1)
            for attr, dim in sl.tensors:
                t = getattr(owner, attr, None)
                if isinstance(t, torch.Tensor):
                    saved.append((t, dim, pos, t.data.index_select(dim, pos).clone()))
                    t.data.index_fill_(dim, pos, 0.0)
        try:
            return float((_output(model, x) - ref).pow(2).mean())
        finally:
            for t, dim, pos, vals in saved:
                t.data.index_copy_(dim, pos, vals)


def auto_budget(model: nn.Module, example_inputs: Any, calib: Any, sparsity: float, ignore: set[str],
                keep_outputs: set[str], count: Callable[[dict[str, float]], float], steps: int = 10
                ) -> tuple[dict[str, float], dict[str, Any]]:
    """Ratio per group root whose compressed model (``count(plan)`` = measured sparsity) removes at
    least ``sparsity`` of the parameters, spread by :func:`sensitivity_curves`."""
    curves, _ = sensitivity_curves(model, example_inputs, calib, ignore, keep_outputs)
    if not curves:
        raise InvalidRatioError("no group could be measured for an automatic budget; pass ratio= instead")
    total = sum(p.numel() for p in model.parameters())
    reach = sum(max(c[1] for c in curve) for curve in curves.values())
    best = {r: max(c[0] for c in curve) for r, curve in curves.items()}
    if count(best) < sparsity:
        raise InvalidRatioError(f"sparsity={sparsity:.3f} is not reachable with per-group ratios up to "
                                f"{max(CANDIDATES)}: at most {count(best):.1%}; lower the sparsity")
    lo, hi = 0.0, min(reach, total)
    plan = best
    for _ in range(steps):
        mid = (lo + hi) / 2
        cand = allocate(curves, mid)
        if count(cand) >= sparsity:
            hi, plan = mid, cand
        else:
            lo = mid
    info = {"budget": "auto", "plan": {k: v for k, v in plan.items()}}
    return plan, info


def counter(work: nn.Module, example_inputs: Any, ignore: set[str], keep_outputs: set[str]
            ) -> Callable[[dict[str, float]], float]:
    """Measured parameter sparsity of ``work`` compressed with a per-group ratio plan (first-k)."""
    from ..engine import compress
    from ..policies import first_k_planner

    total = sum(p.numel() for p in work.parameters())
    memo: dict[tuple, float] = {}

    def count(plan: dict[str, float]) -> float:
        key = tuple(sorted(plan.items()))
        if key not in memo:
            m = copy.deepcopy(work)
            compress(m, example_inputs, plan, first_k_planner, ignore=ignore, keep_outputs=keep_outputs,
                     verify=False)
            memo[key] = 1.0 - sum(p.numel() for p in m.parameters()) / total
        return memo[key]

    return count

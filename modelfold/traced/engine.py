"""The one engine behind fold and prune: discover groups, choose a plan, merge, remove.

For each channel group a *plan* is either a cluster labelling (folding: merge each
cluster into its representative) or a keep-set (pruning: a selection). Both end with
Torch-Pruning physically removing the non-kept channels from every coupled tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..checks import forward, kept_width
from ..errors import UnsupportedModelError
from ..merge import gather_features, merge_tensor, representatives
from ..report import GroupReport
from .groups import CHANNEL, CONSUMER, PRODUCER, ChannelGroup, Slice, build_graph, grad_enabled, iter_groups

NORM = "norm"  # feature kind of BatchNorm parameters (never clustered)
IGNORED = "ignored by the user"
KEPT_OUTPUTS = "output channels kept by the user (keep_outputs)"
USER_REASONS = (IGNORED, KEPT_OUTPUTS)


def mark_user_kept(cg: ChannelGroup, ignore: Container[str], keep_outputs: Container[str]) -> None:
    """Mark ``cg`` kept if it touches an ignored module or is produced by a keep_outputs module."""
    if cg.foldable and any(s.module in ignore for s in cg.slices):
        cg.foldable, cg.reason = False, IGNORED
    if cg.foldable and any(s.kind == PRODUCER and s.module in keep_outputs for s in cg.slices):
        cg.foldable, cg.reason = False, KEPT_OUTPUTS


@dataclass
class Plan:
    """How to reduce one group: ``labels`` (fold, k clusters) or ``keep`` (prune)."""

    k: int
    labels: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    rel_error: float | None = None
    channel_scale: torch.Tensor | None = None  # (k,) factor on merged norm scales (repairs)
    module_scale: dict[str, torch.Tensor] | None = None  # per-norm-module (k,) factor, overrides channel_scale
    absorb: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (src, dst, scale): see apply_absorb


Planner = Callable[[ChannelGroup, dict[str, torch.Tensor], int], Plan]


def resolve(model: nn.Module, name: str) -> nn.Module | torch.Tensor:
    """Module or parameter of ``model`` by qualified name."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_parameter(name)


def _tensor(owner: nn.Module | torch.Tensor, attr: str) -> torch.Tensor | None:
    t = owner if attr == "" else getattr(owner, attr, None)
    return t if isinstance(t, torch.Tensor) else None


def group_slices(model: nn.Module, cg: ChannelGroup, keep: Callable[[Slice, Any], bool] | None = None
                 ) -> Iterator[tuple[Slice, Any, torch.Tensor, list[tuple[str, int, torch.Tensor]]]]:
    """Walk a group's slices (those ``keep(slice, owner)`` accepts): slice, owner, position table and the
    [(attr, dim, tensor)] of the slice that exist in ``model``."""
    for sl in cg.slices:
        owner = resolve(model, sl.module)
        if keep is not None and not keep(sl, owner):
            continue
        table = sl.table(cg.size)
        yield sl, owner, table, [(attr, dim, t) for attr, dim in sl.tensors if (t := _tensor(owner, attr)) is not None]


def _is_bn(sl: Slice, owner: Any) -> bool:
    return sl.kind == CHANNEL and isinstance(owner, nn.modules.batchnorm._BatchNorm)


def _is_feature(sl: Slice, owner: Any) -> bool:
    conv_channel = sl.kind == CHANNEL and isinstance(owner, nn.modules.conv._ConvNd)
    return sl.kind in (PRODUCER, CONSUMER) or conv_channel or _is_bn(sl, owner)


def group_features(model: nn.Module, cg: ChannelGroup) -> dict[str, torch.Tensor]:
    """Per-channel feature blocks (n, d_i) of a group, keyed "module:kind:attr".

    Producers (weight rows and bias), consumers (weight columns) and channel-wise
    convolution filters (depthwise) are weight features; BatchNorm parameters come as kind
    ``"norm"`` (not clustered; read by neuron merging).
    """
    feats: dict[str, torch.Tensor] = {}
    for sl, owner, table, tensors in group_slices(model, cg, _is_feature):
        is_bn = _is_bn(sl, owner)
        kind = NORM if is_bn else sl.kind
        for attr, dim, t in tensors:
            feats[f"{sl.module}:{kind}:{attr}"] = gather_features(t, dim, table)
        if is_bn:
            feats[f"{sl.module}:{NORM}:eps"] = torch.full((cg.size, 1), float(owner.eps))
    return feats


def apply_labels(model: nn.Module, cg: ChannelGroup, plan: Plan) -> None:
    """Merge every slice of the group in place: producers/channels averaged, consumers summed."""
    assert plan.labels is not None
    with torch.no_grad():
        for sl, owner, table, tensors in group_slices(model, cg):
            mode = "sum" if sl.kind == CONSUMER else "mean"
            is_norm = isinstance(owner, nn.modules.batchnorm._NormBase | nn.LayerNorm)
            for attr, dim, t in tensors:
                scale = None
                if is_norm and attr == "weight":
                    scale = (plan.module_scale or {}).get(sl.module, plan.channel_scale)
                t.data.copy_(merge_tensor(t.data, dim, table, plan.labels, plan.k, mode, scale))


def apply_absorb(model: nn.Module, cg: ChannelGroup, plan: Plan) -> None:
    """Neuron-merging step: consumer column dst += scale * column src, in every consumer slice."""
    assert plan.absorb is not None
    src, dst, scale = plan.absorb
    if src.numel() == 0:
        return
    with torch.no_grad():
        for _, _, table, tensors in group_slices(model, cg, lambda sl, _: sl.kind == CONSUMER):
            m = table.shape[1]
            for _, dim, t in tensors:
                s_pos, d_pos = table[src].reshape(-1).to(t.device), table[dst].reshape(-1).to(t.device)
                view = [1] * t.ndim
                view[dim] = -1
                vals = t.data.index_select(dim, s_pos) * scale.to(t).repeat_interleave(m).view(view)
                t.data.index_add_(dim, d_pos, vals)


def permute(model: nn.Module, cg: ChannelGroup, perm: torch.Tensor) -> None:
    """Permute the group's channels in every slice (new channel c = old channel perm[c])."""
    with torch.no_grad():
        for _, _, table, tensors in group_slices(model, cg):
            for _, dim, t in tensors:
                src = t.data.index_select(dim, table[perm].reshape(-1).to(t.device))
                t.data.index_copy_(dim, table.reshape(-1).to(t.device), src)


def model_outputs(model: nn.Module, inputs: object) -> list[torch.Tensor]:
    out = forward(model, inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [o for o in (out if isinstance(out, list | tuple) else [getattr(out, "logits", out)])
            if isinstance(o, torch.Tensor)]


def outputs_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        scale = float(x.abs().max()) if x.numel() else 0.0
        if x.shape != y.shape or float((x - y).abs().max()) > 1e-4 * (1.0 + scale):
            return False
    return True


def verify_coupling(model: nn.Module, cg: ChannelGroup, inputs: object, seed: int,
                    ref: list[torch.Tensor] | None = None) -> bool:
    """Check a group's coupling: permuting its channels must leave the function unchanged.

    A missed consumer or a channel-mixing op the tracer took for element-wise (e.g. a
    channel shuffle) breaks the equality. The model is restored exactly afterwards.
    """
    ref = model_outputs(model, inputs) if ref is None else ref
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(cg.size, generator=gen)
    permute(model, cg, perm)
    ok = outputs_close(ref, model_outputs(model, inputs))
    permute(model, cg, torch.argsort(perm))  # restore exactly (pure index moves)
    return ok


def compress(
    model: nn.Module,
    example_inputs: object,
    ratio: float | Mapping[str, float],
    planner: Planner,
    *,
    ignore: Sequence[str] = (),
    keep_outputs: Sequence[str] = (),
    verify: bool = True,
    seed: int = 0,
    progress: bool = False,
    on_kept: Callable[[ChannelGroup], None] | None = None,
    calib: Any = None,
    round_to: int | None = None,
) -> list[GroupReport]:
    """Compress ``model`` in place; returns one report per group.

    ``ratio`` is one fraction for every group, or a mapping from group root to its ratio (groups
    not named are left unchanged). ``ignore`` are qualified module names whose slices must stay
    intact; ``keep_outputs`` names modules whose output channels must stay intact (their input
    channels may still fold). ``calib`` (a :class:`modelfold.traced.calibrator.CNNCalibrator`) adds
    activation features for the planner and refits consumers by least squares at the end.
    ``round_to``: kept widths rounded to a multiple of it (``checks.kept_width``).
    """
    dg = build_graph(model, example_inputs)
    ignore_set = set(ignore)
    ignored_mods = [m for name, m in model.named_modules() if name in ignore_set]
    reports: list[GroupReport] = []

    # Pass 1: describe and verify every group on the unmodified copy.
    accepted: dict[str, ChannelGroup] = {}
    described = [cg for _, cg in iter_groups(dg, ignored_mods)]
    ref = model_outputs(model, example_inputs) if verify else None  # restored bit-exactly after each check
    for i, cg in enumerate(described):
        mark_user_kept(cg, ignore_set, keep_outputs)
        if cg.foldable and verify and not verify_coupling(model, cg, example_inputs, seed + i, ref):
            cg.foldable, cg.reason = False, "coupling not verified: an op mixes channels in a way the tracer missed"
        if cg.foldable:
            accepted[cg.root] = cg
        else:
            if on_kept is not None:
                on_kept(cg)
            reports.append(GroupReport(cg.root, cg.members, cg.size, cg.size, "kept", cg.reason))

    # Pass 2: fold/prune lazily, so that each group sees the sizes left by the previous.
    if calib is not None:
        calib.start(model)
    bar = tqdm(total=len(accepted), desc="folding groups", disable=not progress, leave=False)
    with grad_enabled():
        for group, cg in iter_groups(dg, ignored_mods):
            if cg.root not in accepted:
                continue
            bar.update(1)
            r = ratio.get(cg.root, 0.0) if isinstance(ratio, Mapping) else ratio
            reports.append(_compress_group(model, group, cg, kept_width(cg.size, r, round_to), planner, calib))
    bar.close()
    if calib is not None:
        calib.finish(model)
    return reports


def _compress_group(model: nn.Module, group: Any, cg: ChannelGroup, k: int, planner: Planner,
                    calib: Any) -> GroupReport:
    """Fold or prune one group to ``k`` channels (its Torch-Pruning ``group`` removes the others)."""
    n = cg.size
    if k >= n:
        return GroupReport(cg.root, cg.members, n, n, "unchanged")
    feats = group_features(model, cg)
    if calib is not None:
        feats.update(calib.activation_features(model, cg))
    plan = planner(cg, feats, k)
    if plan.absorb is not None:
        apply_absorb(model, cg, plan)
    if plan.labels is not None:
        apply_labels(model, cg, plan)
        keep = representatives(plan.labels, plan.k)
        status = "folded"
    else:
        assert plan.keep is not None
        keep = plan.keep
        status = "pruned"
    drop = sorted(set(range(n)) - {int(i) for i in keep})
    if calib is not None and drop:
        calib.record(model, cg, torch.as_tensor(keep), plan.labels, plan.k)
    if drop:
        try:
            group.prune(idxs=drop)
        except Exception as e:  # noqa: BLE001 - failures inside the dependency tracer
            raise UnsupportedModelError(
                f"removing channels of group '{cg.root}' failed inside the dependency tracer "
                f"({type(e).__name__}: {e}); pass ignore=['{cg.root}'] to keep it intact") from e
    return GroupReport(cg.root, cg.members, n, n - len(drop), status, "", plan.rel_error)

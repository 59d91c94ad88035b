"""Fold-AR: data-free approximate REPAIR (paper §5).

``before`` absorbs each BatchNorm's running statistics into the conv/linear that feeds it,
so every such channel is standardized (mean 0, variance 1) and the BN keeps only γ, β.
``wrap`` then scales each merged cluster's γ by sqrt(n_c / (1 + (n_c - 1) ρ̄_c)), where ρ̄_c
is the mean pairwise cosine similarity of the members' weight vectors (a data-free proxy
for the correlation of their activations). By default (``rho="pooled"``) a conv filter's
spatial taps are summed per input channel first: real feature maps vary slowly across a
kernel window, so two filters' outputs co-vary like their spatially summed filters.
``after`` moves the bias that absorption had to create back into BN's β, so the folded
model has the original layer structure.

Groups without an absorbed BatchNorm (no BN, a BN not directly behind a conv/linear, a
BN without affine weight, or a LayerNorm) cannot be corrected this way: they are folded
without correction (as Fold-Naive) and listed in ``FoldAR.uncorrected`` with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn

from ...merge import ar_scale, cluster_rho
from ..engine import Plan, Planner, model_outputs, outputs_close
from ..groups import CONSUMER, PRODUCER, ChannelGroup
from . import Repair, RepairError
from .stats import BN_TYPES, conv_bn_pairs, safe_resolve

RHO_MODES = ("pooled", "producer", "all", "bn")
NO_BN = "no BatchNorm in the group"
NO_BN_MODES = ("naive", "rows")


def spatial_taps(module: nn.Module | None) -> int:
    """Number of spatial taps of a conv's filter per input channel (1 for linear layers)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.weight[0, 0].numel())
    return 1


def pool_spatial(block: torch.Tensor, taps: int) -> torch.Tensor:
    """(n, c_in * taps) flattened filter rows -> (n, c_in): each input channel's taps summed."""
    if taps <= 1 or block.shape[1] % taps:
        return block
    return block.view(block.shape[0], -1, taps).sum(-1)


def rho_blocks(feats: dict[str, torch.Tensor], mode: str, model: nn.Module | None = None) -> list[torch.Tensor]:
    """Weight blocks entering ρ̄.

    "producer": the producer rows; "pooled" (default): the producer rows with each conv
    filter's spatial taps summed per input channel (needs ``model`` to read kernel sizes);
    "all": every weight slice (producer rows, consumer columns, channel-wise filters).
    Biases never enter: after absorption a bias only carries the channel's mean, not the
    direction that decides how two channels co-vary.
    """
    kinds = (PRODUCER, CONSUMER, "channel") if mode == "all" else (PRODUCER,)
    blocks = []
    for key, v in feats.items():
        module, kind, attr = key.rsplit(":", 2)
        if kind not in kinds or attr != "weight":
            continue
        if mode == "pooled" and model is not None:
            v = pool_spatial(v, spatial_taps(safe_resolve(model, module)))
        blocks.append(v)
    return blocks


class FoldAR(Repair):
    """Fold-AR (see module docstring). ``rho``: which slices enter ρ̄ — "pooled" (default: producer
    rows with conv taps summed per input channel), "producer" (all producer rows of the group,
    one γ factor per cluster), "all" (every weight slice) or "bn" (each
    BatchNorm's γ gets the factor of the conv/linear absorbed into it; differs from
    "producer" only in groups with several producers, e.g. residual streams)."""

    name = "ar"

    def __init__(self, example_inputs: Any, rho: str = "pooled", no_bn: str = "naive") -> None:
        if rho not in RHO_MODES:
            raise RepairError(f"ar_rho must be one of {RHO_MODES}, got {rho!r}")
        if no_bn not in NO_BN_MODES:
            raise RepairError(f"ar_no_bn must be one of {NO_BN_MODES}, got {no_bn!r}")
        self.no_bn = no_bn
        self.row_scaled: list[tuple[ChannelGroup, torch.Tensor, int, torch.Tensor]] = []
        self.example_inputs = example_inputs
        self.rho = rho
        self.absorbed: dict[str, str] = {}  # BN name -> conv name
        self.created_bias: set[str] = set()
        self.uncorrected: list[tuple[str, str]] = []  # (group root, reason)
        self._model: nn.Module | None = None

    @classmethod
    def from_kwargs(cls, model: nn.Module | None = None, example_inputs: Any = None, ar_rho: str | None = None,
                    ar_no_bn: str | None = None, **kwargs: Any) -> FoldAR:
        from .data import reject_options

        reject_options(kwargs, "ar")
        return cls(example_inputs, ar_rho or "pooled", ar_no_bn or "naive")

    def before(self, model: nn.Module) -> nn.Module:
        ref = model_outputs(model, self.example_inputs)
        for conv_name, bn_name in conv_bn_pairs(model, self.example_inputs):
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            if bn.running_mean is None or bn.weight is None or conv.weight.shape[0] != bn.num_features:
                continue
            saved = {k: v.clone() for k, v in list(conv.state_dict().items()) + list(bn.state_dict().items())}
            had_bias = conv.bias is not None
            _absorb(conv, bn)
            if outputs_close(ref, model_outputs(model, self.example_inputs)):
                self.absorbed[bn_name] = conv_name
                if not had_bias:
                    self.created_bias.add(conv_name)
            else:  # the conv output is also used elsewhere: undo
                if not had_bias:
                    conv.bias = None
                conv.load_state_dict({k: v for k, v in saved.items() if k in conv.state_dict()})
                bn.load_state_dict({k: v for k, v in saved.items() if k in bn.state_dict()})
        self._model = model
        return model

    @property
    def _row_mode(self) -> str:
        return "producer" if self.rho == "bn" else self.rho

    def _reason(self, cg: ChannelGroup) -> str:
        assert self._model is not None
        mods = {s.module: safe_resolve(self._model, s.module) for s in cg.slices}
        if any(isinstance(m, nn.LayerNorm) for m in mods.values()):
            return "LayerNorm in the group"
        bns = [n for n, m in mods.items() if isinstance(m, BN_TYPES)]
        if not bns:
            return NO_BN
        missing = [n for n in bns if n not in self.absorbed]
        if missing:
            return f"BatchNorm {missing[0]} not directly behind a conv/linear (statistics not absorbed)"
        return ""

    def wrap(self, planner: Planner) -> Planner:
        def plan(cg: ChannelGroup, feats: dict[str, torch.Tensor], k: int) -> Plan:
            p = planner(cg, feats, k)
            if p.labels is None:
                return p
            reason = self._reason(cg)
            if reason == NO_BN and self.no_bn == "rows":
                rho = cluster_rho(rho_blocks(feats, self._row_mode, self._model), p.labels, k)
                self.row_scaled.append((cg, p.labels.clone(), k, ar_scale(rho, p.labels, k)))
                return p
            if reason:
                self.uncorrected.append((cg.root, reason))
                warnings.warn(f"Fold-AR: group {cg.root} folded without correction ({reason})", stacklevel=2)
                return p
            rho = cluster_rho(rho_blocks(feats, self._row_mode, self._model), p.labels, k)
            p.channel_scale = ar_scale(rho, p.labels, k)
            if self.rho == "bn":
                p.module_scale = {}
                for sl in cg.slices:
                    key = f"{self.absorbed.get(sl.module)}:{PRODUCER}:weight"
                    if key in feats:
                        own = cluster_rho([feats[key]], p.labels, k)
                        p.module_scale[sl.module] = ar_scale(own, p.labels, k)
            return p

        return plan

    def after(self, model: nn.Module) -> nn.Module:
        """Move created conv biases into BN's β (BN is the identity normalization after absorption);
        with ``no_bn="rows"`` scale the merged producer rows of BN-free groups (biases untouched)."""
        from .stats import folded_cluster_ids

        with torch.no_grad():
            for cg, labels, k, scale in self.row_scaled:
                for sl in cg.slices:
                    if sl.kind == PRODUCER:
                        w = model.get_submodule(sl.module).weight
                        ids = folded_cluster_ids(sl.table(cg.size)[:, 0], labels, k, w.shape[0])
                        w.mul_(scale[ids].to(w).view([-1] + [1] * (w.ndim - 1)))
            for bn_name, conv_name in self.absorbed.items():
                if conv_name not in self.created_bias:
                    continue
                conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
                inv = (bn.running_var + bn.eps).rsqrt()
                bn.bias.add_(bn.weight * inv * (conv.bias - bn.running_mean))
                bn.running_mean.zero_()
                conv.bias = None
        return model


def _absorb(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """conv <- (conv - μ) / sqrt(var + eps); BN running_mean 0, running_var 1 - eps."""
    with torch.no_grad():
        s = (bn.running_var.double() + bn.eps).sqrt()
        w = conv.weight
        view = [-1] + [1] * (w.ndim - 1)
        w.copy_((w.double() / s.view(view)).to(w.dtype))
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
        new_b = ((b - bn.running_mean.double()) / s).to(w.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b)
        else:
            conv.bias.copy_(new_b)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)

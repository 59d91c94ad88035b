"""Sequential calibrated compression of transformers models (in memory and layer by layer).

The calibration token ids are embedded once; the inputs of the first block (hidden states and
the keyword arguments the model passes to every block: masks, rotary embeddings) are caught there.
Then block by block: record the activations that the block's consumers read, compress the block
(:mod:`modelfold.hf.calib_layer`), and run the *compressed* block to get the next block's inputs,
so every block is calibrated on what the already-compressed blocks before it produce.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..calib.budget import allocate
from ..calib.compensate import output_error
from ..calib.score import FeatureStats, feature_scores, unit_scores
from ..errors import UnsupportedModelError
from ..report import GroupReport
from .adapters import Adapter
from .adapters.base import MLPSpec, get, hook_module
from .attention import resolve_mode, units_k
from .calib_layer import CalibOptions, attention_units, choose_heads, compress_attention, compress_mlp, gram
from .plan import Plan, parse_targets
from .sizing import attention_removed, mlp_removed


class _Caught(Exception):
    pass


def _mlp(adapter: Adapter, model: nn.Module, i: int) -> MLPSpec:
    """Layer ``i``'s one MLP; mixture-of-experts layers are refused (no module shows an expert's input)."""
    specs = adapter.mlps(model, i)
    if len(specs) > 1:
        raise UnsupportedModelError(
            f"calibrated compression of mixture-of-experts MLPs ({specs[0].name.rsplit('.', 2)[0]}: "
            f"{len(specs)} experts) is not supported; use the data-free fold/prune for targets='mlp', or "
            "calibrate only the attention (targets='attention')")
    return specs[0]


@dataclass
class BlockInputs:
    """What flows between blocks: hidden states per micro-batch and the blocks' keyword arguments."""

    xs: list[torch.Tensor]
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def capture(model: nn.Module, adapter: Adapter, ids: torch.Tensor, micro_batch: int = 4) -> BlockInputs:
    """Inputs of block 0 for each micro-batch of ``ids`` (the model runs only up to block 0)."""
    first = adapter.layers(model)[0]
    got: list[tuple[torch.Tensor, dict]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.pop("hidden_states")
        kw = dict(kwargs)
        if len(args) > 1:  # positional extras (BERT's attention mask in some versions)
            kw["__args__"] = args[1:]
        got.append((x.detach(), kw))
        raise _Caught

    h = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in range(0, ids.shape[0], micro_batch):
                try:
                    model(input_ids=ids[s:s + micro_batch], use_cache=False)
                except _Caught:
                    pass
    finally:
        h.remove()
    return BlockInputs([x for x, _ in got], [kw for _, kw in got])


def _call(block: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    kw = dict(kw)
    extra = kw.pop("__args__", ())
    out = block(x, *extra, **kw)
    return out[0] if isinstance(out, tuple | list) else out


def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs: the next block's inputs."""
    with torch.no_grad():
        return BlockInputs([_call(block, x, kw) for x, kw in zip(inputs.xs, inputs.kwargs, strict=True)],
                           inputs.kwargs)


def record(block: nn.Module, inputs: BlockInputs, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Inputs (N, features) that ``modules`` of ``block`` read when the block runs on ``inputs``."""
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args, k=k: acc[k].append(
        args[0].detach().reshape(-1, args[0].shape[-1]).float())) for k, m in modules.items()]
    try:
        with torch.no_grad():
            for x, kw in zip(inputs.xs, inputs.kwargs, strict=True):
                _call(block, x, kw)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in acc.items()}


class Calibrated:
    """The per-layer step of calibrated compression (a LayerFn), carrying the activations along."""

    def __init__(self, ids: torch.Tensor, opts: CalibOptions, micro_batch: int = 4) -> None:
        self.ids, self.opts, self.micro_batch = ids, opts, micro_batch
        self.inputs: BlockInputs | None = None

    def start(self, model: nn.Module, adapter: Adapter) -> None:
        self.inputs = capture(model, adapter, self.ids, self.micro_batch)

    def __call__(self, work: nn.Module, adapter: Adapter, i: int, p: dict[str, float]) -> list[GroupReport]:
        if self.inputs is None:
            self.start(work, adapter)
        block = adapter.layers(work)[i]
        out = []
        if p.get("attention", 0) > 0:
            spec = adapter.attention(work, i)
            a = record(block, self.inputs, {"o": hook_module(spec.o)})["o"]
            before, after, err = compress_attention(spec, p["attention"], a, adapter, self.opts)
            out.append(GroupReport(spec.name, spec.names, before, after,
                                   "pruned" if after < before else "kept", "", err))
        if p.get("mlp", 0) > 0:
            spec = _mlp(adapter, work, i)
            n = spec.width
            k = max(1, round(n * (1.0 - p["mlp"])))
            if k < n:
                h = record(block, self.inputs, {"c": hook_module(spec.consumer)})["c"]

                def rerun() -> torch.Tensor:
                    return record(block, self.inputs, {"c": hook_module(spec.consumer)})["c"]

                err = compress_mlp(spec, k, h, self.opts, rerun)
                out.append(GroupReport(spec.name, spec.member_names(), n, k,
                                       "folded" if self.opts.method == "fold" else "pruned", "", err))
        self.inputs = run_block(block, self.inputs)
        return out


RATIO_GRID = tuple(round(0.05 * i, 2) for i in range(17))  # 0 .. 0.8


def _mlp_curve(spec, h: torch.Tensor, opts: CalibOptions, energy: float, grid: Iterable[float]) -> list:
    cons = get(spec.consumer)
    w = cons.weight.detach()
    stats = FeatureStats.of(h)
    g = gram(h, False)
    order = torch.argsort(feature_scores(opts.score, stats, w), descending=True)
    n = spec.width
    curve = []
    for r in grid:
        k = max(1, round(n * (1.0 - r)))
        if k >= n:
            curve.append((0.0, 0.0, 0.0))
            continue
        keep = torch.sort(order[:k]).values
        opts_nb = opts
        from .calib_layer import _refit

        new_w, _ = _refit(w, None, g, keep, opts_nb, stats)
        err = output_error(w, g, new_w, g[keep][:, keep], g[keep])
        curve.append((r, float(mlp_removed(spec, r)), err / energy))
    return curve


def _attn_curve(spec, a: torch.Tensor, opts: CalibOptions, energy: float, grid: Iterable[float]) -> list:
    from .calib_layer import _refit

    mode = resolve_mode(spec, opts.attention_mode)
    _, width = attention_units(spec, mode)
    w = get(spec.o).weight.detach()
    stats = FeatureStats.of(a)
    g = gram(a, False)
    scores = unit_scores(feature_scores(opts.score, stats, w), width)
    curve, seen = [], set()
    for r in grid:
        k = units_k(spec, mode, r)
        n_units = spec.n_rep if mode == "query" else spec.num_kv_heads
        if k >= n_units:
            curve.append((0.0, 0.0, 0.0))
            continue
        if k in seen:
            continue
        seen.add(k)
        keep = choose_heads(spec, mode, k, scores)
        cols = (keep[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
        new_w, _ = _refit(w, None, g, cols, opts, stats)
        err = output_error(w, g, new_w, g[cols][:, cols], g[cols])
        curve.append((r, float(attention_removed(spec, r, opts.attention_mode)), err / energy))
    return curve


class Sensitivity:
    """Per-layer step measuring each unit's error curve on the original model's activations.

    Each unit's error at each candidate ratio is its output error after score selection and a
    least-squares refit, relative to the energy of the block's input (the residual stream).
    """

    def __init__(self, opts: CalibOptions, targets: str | Iterable[str] = "mlp", max_ratio: float = 0.8) -> None:
        self.opts, self.targets = opts, parse_targets(targets)
        self.grid = [r for r in RATIO_GRID if r <= max_ratio + 1e-9]
        self.curves: dict[str, list] = {}
        self.inputs: BlockInputs | None = None

    def step(self, model: nn.Module, adapter: Adapter, i: int) -> None:
        block = adapter.layers(model)[i]
        energy = float(sum((x.double() ** 2).sum() for x in self.inputs.xs)) or 1.0
        mods = {}
        if "mlp" in self.targets:
            mods["mlp"] = hook_module(_mlp(adapter, model, i).consumer)
        if "attention" in self.targets:
            mods["attention"] = hook_module(adapter.attention(model, i).o)
        acts = record(block, self.inputs, mods)
        if "mlp" in acts:
            self.curves[f"{i}:mlp"] = _mlp_curve(_mlp(adapter, model, i), acts["mlp"], self.opts, energy, self.grid)
        if "attention" in acts:
            self.curves[f"{i}:attention"] = _attn_curve(adapter.attention(model, i), acts["attention"], self.opts,
                                                        energy, self.grid)
        self.inputs = run_block(block, self.inputs)

    def plan(self, target: float) -> Plan:
        """Ratios removing ``target`` parameters with the least total error (``calib.budget.allocate``)."""
        plan: Plan = {}
        for key, r in allocate(self.curves, target).items():
            i, t = key.split(":")
            if r > 0:
                plan.setdefault(int(i), {})[t] = r
        return plan


def sensitivity_plan(model: nn.Module, adapter: Adapter, ids: torch.Tensor, target: float, opts: CalibOptions,
                     targets: str | Iterable[str] = "mlp", micro_batch: int = 4, max_ratio: float = 0.8,
                     progress: bool = False) -> tuple[Plan, dict[str, list]]:
    """Per-layer ratios removing ``target`` parameters with the least calibrated output error (in memory)."""
    from tqdm.auto import tqdm

    s = Sensitivity(opts, targets, max_ratio)
    s.inputs = capture(model, adapter, ids, micro_batch)
    for i in tqdm(range(len(adapter.layers(model))), desc="measuring sensitivity", disable=not progress,
                  leave=False):
        s.step(model, adapter, i)
    return s.plan(target), s.curves

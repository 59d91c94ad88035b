"""How sensitive each layer is to compression: the automatic per-layer budget of calibrated compression.

``Sensitivity`` walks the blocks once with the calibration activations, measures for every layer the
relative output error of its MLP and attention at each ratio of ``RATIO_GRID`` (least-squares refit
included), probes the whole model at one ratio to weigh the layers, and ``plan`` allocates the
parameter budget (``calib.budget``) so that the asked sparsity is removed within ``SPARSITY_TOL``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ...calib.budget import SPARSITY_TOL, fill, ratio_grid, refine, settle, unreachable
from ...calib.compensate import choose_lam, choose_lam_rows, output_energy, output_error
from ...calib.score import FeatureStats, unit_importance
from ...checks import kept_width
from ...report import count_params
from ..adapters import Adapter
from ..adapters.refs import get, hook_module
from ..attention import choose_heads, resolve_mode, units_k
from ..plan import Plan, parse_targets
from ..sizing import attention_removed, mlp_removed
from .blocks import BlockInputs, Seen, capture, fit_rows, layer_mlp, observe, run_block, scale_of
from .layer import CalibOptions, attention_units, fit_gram, gram, refit_columns
from .step import Calibrated

RATIO_GRID = ratio_grid(0.05, 0.8)  # 0, 0.05, .., 0.8


def _mlp_curve(spec, h: torch.Tensor, opts: CalibOptions, energy: float, grid: Iterable[float],
               grams: dict | None = None, split: int | None = None) -> tuple[list, float]:
    """(error at each ratio of ``grid`` (see :func:`nested_errors`), the ridge); ``grams["c"]`` receives the
    Gram matrix. The ridge is the one the step would choose at ``PROBE_RATIO`` (``h[:split]`` fit, the
    rest held out)."""
    grid = list(grid)
    w = get(spec.consumer).weight.detach()
    stats = FeatureStats.of(h)
    g = gram(h, False)
    if grams is not None:
        grams["c"] = g
    least = max(1, round(spec.width * (1.0 - max(grid))))
    order = torch.argsort(unit_importance(opts.score, stats, w, g, 1, opts.ridge, keep=least), descending=True)
    n = spec.width
    ks = {r: kept_width(n, r, opts.round_to) for r in grid}
    lam = curve_ridge(w, g, h, order, kept_width(n, PROBE_RATIO, opts.round_to), opts, split)
    errs = nested_errors(w, g, order, lam, ks.values(), prior=True)
    curve = []
    for r in grid:
        k = ks[r]
        if k >= n:
            curve.append((0.0, 0.0, 0.0))
            continue
        curve.append((r, float(mlp_removed(spec, r, opts.round_to)), errs[k] / energy))
    return curve, lam


def curve_ridge(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, order: torch.Tensor, k: int, opts: CalibOptions,
                split: int | None) -> float:
    """The ridge of an error curve: inf without a least-squares refit, ``opts.lam`` if fixed, else the one
    chosen on held-out rows (``calib.compensate.choose_lam``) for the first ``k`` features of ``order``."""
    if opts.compensate != "ls":
        return math.inf
    split = h.shape[0] // 2 if split is None else split
    if opts.lam == "auto" and 0 < split < min(k, h.shape[0]):  # fewer fit rows than features: in the row space
        return choose_lam_rows(w, h[:split], h[split:], torch.sort(order[:k]).values)
    g_fit = fit_gram(h, False, None, opts, split)
    if g_fit is None or k >= g.shape[0]:
        return opts.ridge
    idx = torch.sort(order[:k]).values
    return choose_lam(w, (g_fit[idx][:, idx], g_fit[idx]), (g[idx][:, idx] - g_fit[idx][:, idx], g[idx] - g_fit[idx]),
                      w[:, idx])


def nested_errors(weight: torch.Tensor, g: torch.Tensor, order: torch.Tensor, lam: float,
                  ks: Iterable[int], prior: bool = False) -> dict[int, float]:
    """{k: e_k} for the widths ``ks``: e_k = J_k - J_n, J_k = min over W' of ||H W^T - H_k W'^T||^2 + reg ||W'||^2 the
    least-squares (ridge) objective of the consumer ``weight`` (d, n) refitted to read only the first ``k``
    features of ``order``; ``g`` = H^T H (n, n), reg = ``lam`` x the mean diagonal of ``g``. So e_k is
    the output error the removal adds, the ridge's own share (reg ||W'||^2, about the same at every k)
    taken out; e_n = 0.

    Every e_k from one Cholesky factorisation: with the features in ``order``, L L^T = G + reg I and
    Y = L^-1 G W^T, the leading k x k block of L is the factor of the first k features and the first k
    rows of Y are their solve, so J_k = tr(W G W^T) - ||Y[:k]||^2: one O(n^3) step where a refit per
    ratio took one each (SmolLM2, one MLP: 4.7 s -> 0.8 s of CPU; errors within 4% of the per-ratio
    refits, whose ridge was relative to the kept features' mean diagonal), and monotone in k.

    ``prior``: the ridge pulls towards the plainly pruned consumer (its first k columns) instead of zero,
    ``reg ||W' - W_k||^2``, as the step's refit does: then J_n = 0 and e_k = J_k is at most the error of
    no refit, which ``lam=inf`` gives (``||H_tail W_tail^T||^2``, the removed features' output)."""
    gd = g.double()
    w = weight.double()
    n = gd.shape[0]
    ks = sorted({min(max(int(k), 0), n) for k in ks} | {n})
    if math.isinf(lam):  # no refit: e_k = sum over the removed i, j of G_ij (W^T W)_ij
        q = (gd * (w.T @ w))[order][:, order]
        tail = q.flip((0, 1)).cumsum(0).cumsum(1).flip((0, 1))  # tail[i, j] = q[i:, j:].sum()
        return {k: float(tail[k, k].clamp_min(0.0)) if k < n else 0.0 for k in ks}
    reg = lam * float(torch.diagonal(gd).mean().clamp_min(1e-12))
    gp = gd[order][:, order]
    diag = torch.arange(n, device=gd.device)
    gp[diag, diag] += reg
    chol, info = torch.linalg.cholesky_ex(gp)
    gw = (gd @ w.T)[order]  # (n, d)
    if prior:
        gw = gw + reg * w.T[order]
    if int(info) != 0:  # not positive definite even with the ridge: one solve per width
        explained = {k: float((gw[:k] * torch.linalg.lstsq(gp[:k, :k], gw[:k]).solution).sum()) if k else 0.0
                     for k in ks}
    else:
        y = torch.linalg.solve_triangular(chol, gw, upper=False)
        cum = torch.cat([torch.zeros(1, dtype=y.dtype, device=y.device), y.pow(2).sum(1).cumsum(0)])
        explained = {k: float(cum[k]) for k in ks}
    if prior:  # J_k = tr(W G W^T) + reg ||W_k||^2 - explained_k; J_n = 0 up to rounding
        pen = torch.cat([torch.zeros(1, dtype=w.dtype, device=w.device), (w.T[order] ** 2).sum(1).cumsum(0)]) * reg
        base = float(output_energy(w, gd))
        j = {k: base + float(pen[k]) - e for k, e in explained.items()}
        return {k: max(v - j[n], 0.0) for k, v in j.items()}
    return {k: max(explained[n] - e, 0.0) for k, e in explained.items()}


def _attn_curve(spec, a: torch.Tensor, opts: CalibOptions, energy: float, grid: Iterable[float],
                split: int | None = None) -> list:
    mode = resolve_mode(spec, opts.attention_mode)
    _, width = attention_units(spec, mode)
    w = get(spec.o).weight.detach()
    stats = FeatureStats.of(a)
    g = gram(a, False)
    g_fit = fit_gram(a, False, None, opts, split)
    scores = unit_importance(opts.score, stats, w, g, width, opts.ridge)
    base = output_energy(w, g)  # tr(W G W^T), the same at every ratio
    curve, seen = [], set()
    for r in grid:
        k = units_k(spec, mode, r, opts.round_to)
        n_units = spec.n_rep if mode == "query" else spec.num_kv_heads
        if k >= n_units:
            curve.append((0.0, 0.0, 0.0))
            continue
        if k in seen:
            continue
        seen.add(k)
        keep = choose_heads(spec, mode, k, scores)
        cols = (keep[:, None] * width + torch.arange(width, device=keep.device)[None, :]).reshape(-1)
        new_w, _, _ = refit_columns(w, None, g, cols, opts, stats, g_fit=g_fit)
        err = output_error(w, g, new_w, g[cols][:, cols], g[cols], energy=base)
        curve.append((r, float(attention_removed(spec, r, opts.attention_mode, opts.round_to)), err / energy))
    return curve


PROBE_RATIO = 0.5
PROBE_SHAPE = (2, 256)  # calibration sequences x tokens the global probe runs


def _rms_normed(inputs: BlockInputs) -> torch.Tensor:
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs.xs]).double()
    return x / x.pow(2).mean(1, keepdim=True).clamp_min(1e-30).sqrt()


class Sensitivity:
    """Per-layer step measuring each unit's error curve on the original model's activations.

    Local curves: each unit's output error at each candidate ratio after score selection and a
    least-squares refit (per token relative to the token's residual norm with ``weighting="token"``,
    else relative to the residual energy). Local errors do not say how an error grows through the
    layers after it, so a *global probe* (``probe=True``) compresses each unit alone at
    ``PROBE_RATIO`` on a copy of its block, runs the remaining original layers on a few calibration
    sequences, and measures the error of the last layer's RMS-normalised output; each local curve is
    scaled so that it agrees with the global error at the probe ratio. The probe streams advance
    layer by layer with the rest, so it needs one block in memory at a time too.
    """

    def __init__(self, opts: CalibOptions, targets: str | Iterable[str] = "mlp", max_ratio: float = 0.8,
                 probe: bool = True) -> None:
        self.opts, self.targets = opts, parse_targets(targets)
        self.grid = [r for r in RATIO_GRID if r <= max_ratio + 1e-9]
        self.curves: dict[str, list] = {}
        self.inputs: BlockInputs | None = None
        self.probe = probe and PROBE_RATIO in self.grid
        self.ref: BlockInputs | None = None  # original stream of the probe sequences
        self.streams: dict[str, BlockInputs] = {}  # probe streams, one unit compressed in each
        self.levels: dict[str, list[tuple[float, int]]] = {}  # unit -> [(ratio, parameters removed)]
        self.lams: dict[str, float] = {}  # unit -> the ridge its curve used (the probe reuses it)
        self.total: int | None = None  # parameters of the whole model

    def start(self, model: nn.Module, adapter: Adapter, ids: torch.Tensor, micro_batch: int = 4) -> None:
        """Capture the inputs of block 0 for the calibration ids (and the probe's first few)."""
        self.inputs = capture(model, adapter, ids, micro_batch)
        if self.probe:
            n, length = PROBE_SHAPE
            self.ref = capture(model, adapter, ids[:n, :length], micro_batch)

    def step(self, model: nn.Module, adapter: Adapter, i: int) -> None:
        block = adapter.layers(model)[i]
        mods = {}
        if "mlp" in self.targets:
            mods["c"] = hook_module(layer_mlp(adapter, model, i).consumer)
        if "attention" in self.targets:
            mods["o"] = hook_module(adapter.attention(model, i).o)
        token = self.opts.weighting == "token"
        # one run of the block: token weights, the consumers' inputs and the next block's inputs
        seen = observe(block, self.inputs, mods, sums=token, at=adapter.mlp_sum(model, i), outputs=True)
        scale = None
        if token:  # relative errors per token: the normaliser is the token count
            scale = scale_of(seen.sums)
            energy = float(scale.numel())
        else:
            energy = float(sum((x.double() ** 2).sum() for x in self.inputs.xs)) or 1.0
        acts = seen.acts if scale is None else {k: v * scale[:, None] for k, v in seen.acts.items()}
        if self.total is None:
            self.total = count_params(model)  # every tensor (meta ones too): what sparsity= is a fraction of
        if "c" in acts:
            spec = layer_mlp(adapter, model, i)
            self.curves[f"{i}:mlp"], self.lams[f"{i}:mlp"] = _mlp_curve(spec, acts["c"], self.opts, energy,
                                                                        self.grid, seen.grams, fit_rows(self.inputs))
            self.levels[f"{i}:mlp"] = _levels(spec.width, lambda r: mlp_removed(spec, r, self.opts.round_to),
                                              max(self.grid))
        if "o" in acts:
            spec = adapter.attention(model, i)
            mode = resolve_mode(spec, self.opts.attention_mode)
            self.levels[f"{i}:attention"] = _levels(
                spec.n_rep if mode == "query" else spec.num_kv_heads,
                lambda r: attention_removed(spec, r, self.opts.attention_mode, self.opts.round_to), max(self.grid))
            self.curves[f"{i}:attention"] = _attn_curve(adapter.attention(model, i), acts["o"], self.opts,
                                                        energy, self.grid, fit_rows(self.inputs))
        del acts
        if self.ref is not None:
            self._probe(model, adapter, i, block, seen)
        self.inputs = seen.out

    def _probe(self, model: nn.Module, adapter: Adapter, i: int, block: nn.Module, seen: Seen) -> None:
        self.streams = {k: run_block(block, v) for k, v in self.streams.items()}
        for unit in mods_of(self.targets):
            if not any(r > 0 for r, _, e in self.curves.get(f"{i}:{unit}", [])):
                continue
            snapshot = copy.deepcopy(block)
            lam = self.lams.get(f"{i}:{unit}")
            opts = self.opts if lam is None or self.opts.lam != "auto" else dataclasses.replace(self.opts, lam=lam)
            fn = Calibrated(torch.empty(0, dtype=torch.long, device="cpu"), opts)  # the curve's ridge, not again
            fn.inputs, fn.carry = self.inputs, False
            with torch.no_grad():
                fn(model, adapter, i, {unit: PROBE_RATIO}, seen=seen)  # the original block's run, reused
                self.streams[f"{i}:{unit}"] = run_block(adapter.layers(model)[i], self.ref)
            block.__dict__.update(snapshot.__dict__)  # the original block, exactly
        self.ref = run_block(block, self.ref)

    def global_errors(self) -> dict[str, float]:
        """Error of the final RMS-normalised hidden states with each unit alone compressed at PROBE_RATIO."""
        if self.ref is None:
            return {}
        want = _rms_normed(self.ref)
        return {k: float((_rms_normed(v) - want).pow(2).sum(1).mean()) for k, v in self.streams.items()}

    def scaled_curves(self) -> dict[str, list]:
        """Local curves scaled to agree with the global probe at PROBE_RATIO (unchanged without it)."""
        g = self.global_errors()
        out = {}
        for key, curve in self.curves.items():
            local = next((e for r, _, e in curve if abs(r - PROBE_RATIO) < 1e-9), 0.0)
            f = g[key] / local if key in g and local > 0 else 1.0
            out[key] = [(r, p, e * f) for r, p, e in curve]
        return out

    def plan(self, target: float, total: int | None = None) -> Plan:
        """Ratios removing ``target`` parameters (of ``total``, default: the measured model's) with the
        least total error: the curves' continuous allocation (``calib.budget.fill``), each unit snapped to
        a width it can have, bisected against the exact count of the removed parameters, then single
        units corrected (``budget.refine``). The plan removes ``target`` within ``SPARSITY_TOL * total``,
        else InvalidRatioError names the nearest reachable sparsity."""
        curves = self.scaled_curves()
        total = total or self.total or 1
        sparsity = target / total
        removal = {u: dict(lv) for u, lv in self.levels.items()}

        def at(t: float) -> dict[str, float]:
            out = {}
            for u, r in fill(curves, t).items():
                lv = self.levels.get(u)
                out[u] = r if lv is None else max(x for x, _ in lv if x <= r + 1e-9)
            return out

        def count(p: dict[str, float]) -> float:
            return sum(removal[u][r] for u, r in p.items() if u in removal) / total

        if not curves or target <= 0:
            return {}
        reach = sum(max(c[1] for c in curve) for curve in curves.values())
        top = count(at(reach))
        if top < sparsity - SPARSITY_TOL:
            raise unreachable(sparsity, top, f"per-layer ratios up to max_ratio={max(self.grid)} of the targeted "
                              "units remove no more")
        t, got = settle(lambda t: count(at(t)), 0.0, reach, sparsity, steps=64, tight=0.0)
        p = at(t)
        if abs(got - sparsity) > SPARSITY_TOL / 4:
            p, got = refine(p, got, count, {u: [x for x, _ in lv] for u, lv in self.levels.items() if u in p},
                            sparsity, SPARSITY_TOL / 4, rounds=64)
        if abs(got - sparsity) > SPARSITY_TOL:
            raise unreachable(sparsity, got, "the targeted neurons/heads are too coarse")
        plan: Plan = {}
        for key, r in p.items():
            i, t_ = key.split(":")
            if r > 0:
                plan.setdefault(int(i), {})[t_] = r
        return plan


def _levels(n: int, removed: Any, max_ratio: float) -> list[tuple[float, int]]:
    """[(ratio, parameters removed)] for every distinct width a unit of ``n`` neurons/heads can keep at
    ratios up to ``max_ratio`` (ratio ``1 - k/n``, the smallest giving that removal), ascending."""
    out: dict[int, float] = {0: 0.0}
    for k in range(n, 0, -1):
        r = 1.0 - k / n
        if r > max_ratio + 1e-9:
            break
        out.setdefault(removed(r), r)
    return sorted((r, p) for p, r in out.items())


def mods_of(targets: Iterable[str]) -> list[str]:
    return [t for t in ("attention", "mlp") if t in targets]


def sensitivity_plan(model: nn.Module, adapter: Adapter, ids: torch.Tensor, target: float, opts: CalibOptions,
                     targets: str | Iterable[str] = "mlp", micro_batch: int = 4, max_ratio: float = 0.8,
                     progress: bool = False) -> tuple[Plan, dict[str, list]]:
    """Per-layer ratios removing ``target`` parameters with the least calibrated output error (in memory)."""
    from tqdm.auto import tqdm

    s = Sensitivity(opts, targets, max_ratio)
    s.start(model, adapter, ids, micro_batch)
    for i in tqdm(range(len(adapter.layers(model))), desc="measuring sensitivity", disable=not progress,
                  leave=False):
        s.step(model, adapter, i)
    return s.plan(target), s.scaled_curves()
